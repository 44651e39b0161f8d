"""Flow ``train``: a config -> a trained run directory (data, trajectory, grads, checkpoints, run.json)."""

from __future__ import annotations

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from dvemb.config import RunConfig
from dvemb.pipeline import log_stage
from dvemb.progress import shown
from dvemb.store.remote import staged
from dvemb.store.rundir import RunDir
from dvemb.train.run import train as train_run
from flows.common import own_partial_run, resolve_out


@task(name="train-model", cache_policy=NO_CACHE)
def train_model(config: RunConfig, out: str, force: bool, resume: bool = False) -> str:
    """Lightning training with gradient capture. No task retries; a retry of the flow run (or ``resume``)
    continues the run's own interrupted training from its last boundary checkpoint (dvemb.train.resume)."""
    resume = resume or own_partial_run(out)
    force = force and not resume
    with staged(out, new=True, force=force, resume=resume, force_name="force=true (the CLI: --force)") as root:
        # Lightning's progress bar only where a console shows it (dvemb run), not in a worker's log
        train_run(config, RunDir(root), force=force, progress=shown(), resume=resume)
        RunDir(root).require("train")
        log_stage(RunDir(root), "train")
    return out


@flow(name="train")
def train(config: RunConfig, out: str, force: bool = False) -> str:
    """Train ``config`` into ``out`` (refuses a directory holding a run unless ``force``); returns the run directory.

    Args:
        config: the resolved run config.
        out: run directory to create.
        force: overwrite ``out`` if it already holds a run.
    """
    return train_model(config, resolve_out(out), force)
