"""Flow ``score``: occurrence scores at every checkpoint and per-sample values."""

from __future__ import annotations

from prefect import flow

from dvemb.config import RunConfig
from dvemb.pipeline import log_stage
from dvemb.score.run import score as score_run
from dvemb.store.remote import staged
from dvemb.store.rundir import RunDir
from flows.common import io_task, resolve_out


@io_task("score-occurrences")
def score_occurrences(config: RunConfig, out: str) -> str:
    """scores/occurrences.parquet and scores/samples.parquet (path of the former)."""
    with staged(out) as root:
        path = score_run(RunDir(root), config)
        log_stage(RunDir(root), "score")
    return path


@flow(name="score")
def score(config: RunConfig, out: str) -> str:
    """Score every (sample, step) occurrence of the embedded run ``out``; returns the run directory."""
    out = resolve_out(out)
    score_occurrences(config, out)
    return out
