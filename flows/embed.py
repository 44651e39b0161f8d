"""Flow ``embed``: every segment's local embeddings and propagator, in parallel, then a completeness check."""

from __future__ import annotations

from prefect import flow, task, unmapped
from prefect.cache_policies import NO_CACHE

from dvemb.config import EmbedConfig, RunConfig
from dvemb.embed.run import embed_segment as embed_segment_run
from dvemb.pipeline import log_stage
from dvemb.store.rundir import RunDir
from flows.common import io_task, resolve_out


@task(name="count-segments", cache_policy=NO_CACHE)
def count_segments(out: str) -> int:
    """Number of segments recorded at training time (``len(boundaries) - 1``)."""
    run = RunDir(out)
    run.require("train")
    return len(run.boundaries) - 1


@io_task("embed-segment", task_run_name="embed-segment-{segment}")
def embed_segment(out: str, segment: int, embed: EmbedConfig) -> list[str]:
    """One segment: its embeddings file and propagator K_j (paths)."""
    paths = list(embed_segment_run(RunDir(out), segment, embed))
    log_stage(RunDir(out), "embed", segment)
    return paths


@task(name="compose-embeddings", cache_policy=NO_CACHE)
def compose(out: str, paths: list[list[str]]) -> str:
    """Check that every segment left its embeddings and propagator."""
    RunDir(out).require("embed")
    return out


@flow(name="embed")
def embed(config: RunConfig, out: str) -> str:
    """Embed all segments of the trained run ``out`` in parallel; returns the run directory."""
    out = resolve_out(out)
    k = count_segments(out)
    futures = embed_segment.map(unmapped(out), range(k), unmapped(config.embed))
    return compose(out, futures.result())
