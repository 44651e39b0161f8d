"""Shared bits of the flows: run-directory path resolution and the retry policy of I/O-bound tasks."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from dvemb.errors import DvembError

IO_RETRIES = 2
IO_RETRY_DELAY_S = 2


def resolve_out(out: str) -> str:
    """Absolute run-directory path; ``{now:%Y%m%d}``-style placeholders are filled (scheduled runs)."""
    return str(Path(out.format(now=datetime.now())).expanduser().resolve())


def transient(task: Any, task_run: Any, state: Any) -> bool:
    """Retry condition: retry I/O hiccups, never dvemb's own errors (bad input stays bad on retry)."""
    try:
        state.result()
    except (DvembError, ValueError, TypeError, KeyError):
        return False
    except Exception:
        return True
    return True


def io_task(name: str, **kwargs: Any):
    """``@task`` for an I/O-bound stage: no result caching, retried on transient errors only."""
    return task(
        name=name,
        cache_policy=NO_CACHE,
        retries=IO_RETRIES,
        retry_delay_seconds=IO_RETRY_DELAY_S,
        retry_condition_fn=transient,
        **kwargs,
    )
