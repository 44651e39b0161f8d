"""Flow ``curate``: the next run's training table and plan, from the per-sample values."""

from __future__ import annotations

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from dvemb.config import RunConfig
from dvemb.curate.run import curate as curate_run
from dvemb.store.rundir import RunDir
from flows.common import IO_RETRIES, IO_RETRY_DELAY_S, resolve_out, transient


@task(
    name="curate-data",
    cache_policy=NO_CACHE,
    retries=IO_RETRIES,
    retry_delay_seconds=IO_RETRY_DELAY_S,
    retry_condition_fn=transient,
)
def curate_data(config: RunConfig, out: str) -> str:
    """curation/curated.parquet and curation/plan.json (path of the former)."""
    return curate_run(RunDir(out), config)


@flow(name="curate")
def curate(config: RunConfig, out: str) -> str:
    """Curate the scored run ``out`` (drop what hurt, order by value); returns the run directory."""
    out = resolve_out(out)
    curate_data(config, out)
    return out
