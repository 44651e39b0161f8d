"""Flow ``curate``: the next run's training table and plan, from the per-sample values."""

from __future__ import annotations

from prefect import flow

from dvemb.config import RunConfig
from dvemb.curate.run import curate as curate_run
from dvemb.pipeline import log_stage
from dvemb.store.remote import staged
from dvemb.store.rundir import RunDir
from flows.common import io_task, resolve_out


@io_task("curate-data")
def curate_data(config: RunConfig, out: str) -> str:
    """curation/curated.parquet and curation/plan.json (path of the former)."""
    with staged(out) as root:
        path = curate_run(RunDir(root), config)
        log_stage(RunDir(root), "curate")
    return path


@flow(name="curate")
def curate(config: RunConfig, out: str) -> str:
    """Curate the scored run ``out`` (drop what hurt, order by value); returns the run directory."""
    out = resolve_out(out)
    curate_data(config, out)
    return out
