"""Stage ``embed``: one segment's local embeddings and propagator K_j (segments are independent)."""

from __future__ import annotations

import torch

from dvemb.checks import finite, finite_records
from dvemb.config import EmbedConfig
from dvemb.embed.curvature import curvature_fn
from dvemb.embed.propagator import Propagator
from dvemb.embed.segments import embed_steps
from dvemb.store.gradstore import SegmentWriter, read_segment
from dvemb.store.rundir import RunDir, load_tensors, save_tensors
from dvemb.store.trajectory import read_schedule

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def embed_segment(run: RunDir, segment: int, embed: EmbedConfig | None = None) -> tuple[str, str]:
    """Embed segment ``segment`` of ``run``; writes its embeddings file and propagator. Returns both paths.

    embed: dtype, device, curvature (its vectors must have been captured in training) and blocks;
    None = the ``embed`` section recorded in run.json.
    """
    embed = embed or EmbedConfig.model_validate(run.meta()["config"]["embed"])
    b = run.boundaries
    if not 0 <= segment < len(b) - 1:
        raise ValueError(f"segment {segment}: the run has segments 0..{len(b) - 2}")
    records = read_segment(run.grads(segment), expected_steps=range(b[segment], b[segment + 1]), kind="grads")
    curv = curvature_fn(run, embed.curvature, [segment])
    emb, prop = embed_steps(
        records, read_schedule(run), dtype=DTYPES[embed.dtype], device=embed.device, curvature=curv, blocks=embed.blocks
    )
    finite_records(emb, f"segment {segment} embeddings")
    finite(prop.state_dict(), f"segment {segment} propagator")
    dims = {n: g.shape[1] for n, g in emb[0].grads.items()}
    with SegmentWriter(run.embeddings(segment), dims, dtype=embed.dtype, kind="embeddings") as w:
        w.write_steps(emb)
    save_tensors(run.propagator(segment), prop.state_dict(), metadata={"segment": str(segment)})
    return str(run.embeddings(segment)), str(run.propagator(segment))


def load_embeddings(run: RunDir, device: str = "cpu"):
    """All segments' local embeddings and propagators (lists indexed by segment)."""
    run.require("embed")
    b = run.boundaries
    local = [read_segment(run.embeddings(j), range(b[j], b[j + 1]), kind="embeddings") for j in range(len(b) - 1)]
    props = [Propagator.from_state_dict(load_tensors(run.propagator(j)), device) for j in range(len(b) - 1)]
    return local, props
