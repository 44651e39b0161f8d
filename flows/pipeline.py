"""Flow ``pipeline``: train -> embed (segments in parallel) -> score -> curate, then publish the run's artifacts."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from prefect import flow

from dvemb.config import RunConfig
from flows.common import io_task, resolve_out
from flows.curate import curate
from flows.embed import embed
from flows.report import publish as publish_run
from flows.score import score
from flows.train import train


@io_task("publish-artifacts")
def publish(out: str, timings: dict[str, float]) -> dict[str, str]:
    """Influence plot + report.md in the run; summary, top-samples and plot artifacts in Prefect."""
    return publish_run(out, timings)


@contextmanager
def stopwatch(timings: dict[str, float], stage: str) -> Iterator[None]:
    """Record the wall time of the ``with`` block as ``timings[stage]`` (seconds)."""
    start = time.perf_counter()
    yield
    timings[stage] = time.perf_counter() - start


@flow(name="pipeline")
def pipeline(config: RunConfig, out: str, force: bool = False) -> str:
    """Train, embed, score and curate one run into ``out``; returns the run directory."""
    timings: dict[str, float] = {}
    with stopwatch(timings, "train"):
        run = train(config, resolve_out(out), force)
    with stopwatch(timings, "embed"):
        run = embed(config, run)
    with stopwatch(timings, "score"):
        run = score(config, run)
    with stopwatch(timings, "curate"):
        run = curate(config, run)
    publish(run, timings)
    return run
