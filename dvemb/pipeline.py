"""The whole chain in one process, without Prefect (the CLI's ``--engine local``; tests)."""

from __future__ import annotations

from pathlib import Path

from rich.progress import track

from dvemb.config import RunConfig, load_config
from dvemb.curate.run import curate
from dvemb.embed.run import embed_segment
from dvemb.report import write_report
from dvemb.score.run import score
from dvemb.store.rundir import RunDir
from dvemb.train.run import train


def config_of(run: RunDir, overrides: list[str] = ()) -> RunConfig:
    """The config recorded in ``run``/run.json, with ``--set`` overrides applied."""
    return load_config(None, list(overrides), base=run.meta()["config"])


def run_local(cfg: RunConfig, out: str | Path, force: bool = False, progress: bool = True) -> RunDir:
    """train -> embed (every segment) -> score -> curate, sequentially."""
    run = train(cfg, RunDir(out), force=force, progress=progress)
    segments = range(len(run.boundaries) - 1)
    for j in track(segments, description="embedding segments", disable=not progress, transient=True):
        embed_segment(run, j, cfg.embed)
    score(run, cfg)
    curate(run, cfg)
    write_report(run)
    return run
