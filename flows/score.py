"""Flow ``score``: occurrence scores at every checkpoint and per-sample values."""

from __future__ import annotations

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from dvemb.config import RunConfig
from dvemb.score.run import score as score_run
from dvemb.store.rundir import RunDir
from flows.common import IO_RETRIES, IO_RETRY_DELAY_S, resolve_out, transient


@task(
    name="score-occurrences",
    cache_policy=NO_CACHE,
    retries=IO_RETRIES,
    retry_delay_seconds=IO_RETRY_DELAY_S,
    retry_condition_fn=transient,
)
def score_occurrences(config: RunConfig, out: str) -> str:
    """scores/occurrences.parquet and scores/samples.parquet (path of the former)."""
    return score_run(RunDir(out), config)


@flow(name="score")
def score(config: RunConfig, out: str) -> str:
    """Score every (sample, step) occurrence of the embedded run ``out``; returns the run directory."""
    out = resolve_out(out)
    score_occurrences(config, out)
    return out
