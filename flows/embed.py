"""Flow ``embed``: every segment's local embeddings and propagator, in parallel, then a completeness check."""

from __future__ import annotations

from prefect import flow, task, unmapped
from prefect.cache_policies import NO_CACHE

from dvemb.config import EmbedConfig, RunConfig
from dvemb.embed.run import embed_segment as embed_segment_run
from dvemb.pipeline import log_stage
from dvemb.store.remote import commit, entries, staged, upload
from dvemb.store.rundir import RunDir
from flows.common import io_task, resolve_out


@task(name="count-segments", cache_policy=NO_CACHE)
def count_segments(out: str) -> int:
    """Number of segments recorded at training time (``len(boundaries) - 1``)."""
    with staged(out, read_only=True) as root:
        run = RunDir(root)
        run.require("train")
        return len(run.boundaries) - 1


@io_task("embed-segment", task_run_name="embed-segment-{segment}")
def embed_segment(out: str, segment: int, embed: EmbedConfig) -> dict[str, dict]:
    """One segment: its embeddings file and propagator K_j. Returns their manifest entries (relative path
    -> size, sha256). A remote run: the files are uploaded, and :func:`compose` (one writer) records them in
    the remote manifest.json — segments in parallel never race on it."""
    with staged(out, read_only=True, prune=False) as root:
        paths = list(embed_segment_run(RunDir(root), segment, embed))
        log_stage(RunDir(root), "embed", segment)
        written = entries(root, paths)
        upload(out, root, written)
    return written


@task(name="compose-embeddings", cache_policy=NO_CACHE)
def compose(out: str, written: list[dict[str, dict]]) -> str:
    """Record every segment's files (a remote run's manifest.json); check that each left its embeddings
    and propagator."""
    commit(out, {rel: e for part in written for rel, e in part.items()})
    with staged(out, read_only=True) as root:
        RunDir(root).require("embed")
    return out


@flow(name="embed")
def embed(config: RunConfig, out: str) -> str:
    """Embed all segments of the trained run ``out`` in parallel; returns the run directory."""
    out = resolve_out(out)
    k = count_segments(out)
    futures = embed_segment.map(unmapped(out), range(k), unmapped(config.embed))
    return compose(out, futures.result())
