"""Shared bits of the flows: config parameters, run-directory paths, dvemb's logs in the run's Logs tab,
and the retry policy (retry I/O hiccups, never an error that a retry cannot change)."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.context import FlowRunContext, TaskRunContext
from prefect.logging.handlers import APILogHandler
from pydantic import Field

from dvemb.errors import DvembError
from dvemb.pipeline import config_files
from dvemb.store import remote

IO_RETRIES = 2
IO_RETRY_DELAY_S = 2
DEFAULT_CONFIG = "configs/digits_mlp.yaml"

# The deployment form shows the shipped configs as a dropdown; any other path (absolute, or relative to
# the worker's working directory) is accepted too.
_SHIPPED = tuple(config_files()) or (DEFAULT_CONFIG,)
ConfigFile = Annotated[Literal[_SHIPPED], Field(title="configs/")] | Annotated[str, Field(title="path")]  # type: ignore[valid-type]


class RunLogHandler(APILogHandler):
    """Prefect's API log handler, for records made inside a flow or task run only (no warning outside)."""

    def emit(self, record: logging.LogRecord) -> None:
        if FlowRunContext.get() or TaskRunContext.get():
            super().emit(record)


def forward_dvemb_logs() -> None:
    """dvemb's own log records (``dvemb.*``, INFO and up: stage progress, loss, counts, paths) go to the
    flow run's Logs tab, whatever process runs the flow (serve, a worker, the CLI)."""
    logger = logging.getLogger("dvemb")
    if not any(isinstance(h, RunLogHandler) for h in logger.handlers):
        logger.addHandler(RunLogHandler())
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)


forward_dvemb_logs()


def run_time() -> datetime:
    """When the current flow run was due (its scheduled time; the same on every retry), else now."""
    ctx = FlowRunContext.get()
    when = getattr(getattr(ctx, "flow_run", None), "expected_start_time", None)
    return when or datetime.now(UTC)


def resolve_out(out: str, **fields: Any) -> str:
    """Absolute run-directory path, or a remote run's URI (``s3://…``, dvemb.store.remote);
    ``{now:%Y%m%d}``-style placeholders take the flow run's scheduled time (a retry resolves to the same
    folder), ``{name}`` etc. come from ``fields``."""
    out = out.format(now=run_time(), **fields)
    return out if remote.is_remote(out) else str(remote.local_path(out).expanduser().resolve())


def own_partial_run(out: str) -> bool:
    """This flow run is a retry (UI Retry, or a retry after a crash/cancel) and ``out`` was written by its
    earlier attempt: run.json changed after the flow run first started."""
    ctx = FlowRunContext.get()
    fr = getattr(ctx, "flow_run", None)
    if fr is None or fr.run_count <= 1 or fr.start_time is None:
        return False
    if remote.is_remote(out):
        changed = remote.Remote.open(out).modified("run.json")
    else:
        run_json = Path(out) / "run.json"
        changed = datetime.fromtimestamp(run_json.stat().st_mtime, UTC) if run_json.exists() else None
    return changed is not None and changed >= fr.start_time


def permanent(exc: BaseException) -> bool:
    """Errors that stay the same on retry: dvemb's own (bad config, data, paths, RunExists), bad values
    and types, and a missing accelerator (CUDA not compiled / no device / bad ordinal)."""
    if isinstance(exc, DvembError | ValueError | TypeError | KeyError | AssertionError | NotImplementedError):
        return True
    msg = str(exc)
    return (
        isinstance(exc, RuntimeError)
        and ("CUDA" in msg or "cuda" in msg or "MPS" in msg)
        and "out of memory" not in msg
    )


def transient(task: Any, task_run: Any, state: Any) -> bool:
    """Retry condition: retry I/O hiccups, never :func:`permanent` errors (bad input stays bad on retry)."""
    try:
        state.result()
    except Exception as e:
        return not permanent(e)
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
