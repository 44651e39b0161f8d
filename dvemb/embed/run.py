"""Stage ``embed``: one segment's local embeddings and propagator K_j (segments are independent).

The stage writes only what a later stage reads: with ``embed.write: auto`` (the default) embeddings
and propagators are written when ``score.mode`` is ``embedding``; the exact and direct modes need
none, and the stage then writes nothing. Runs whose optimizer has state get embeddings of the linearised state
(dvemb.embed.linear_state): AdamW with a store of the gradients' own coordinates (theta, m, v), SGD with
momentum (theta, b).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from typing import TypeVar, overload

import torch
from safetensors import safe_open

from dvemb.checks import finite, finite_records
from dvemb.config import EmbedConfig, writes_embeddings
from dvemb.embed.curvature import curvature_fn
from dvemb.embed.linear_state import StatePropagator, state_embed_steps
from dvemb.embed.propagator import Propagator
from dvemb.embed.recorded_state import state_coefficients, state_kind
from dvemb.embed.segments import embed_steps
from dvemb.errors import StoreError
from dvemb.store import integrity
from dvemb.store.gc import check_not_dropped
from dvemb.store.gradstore import SegmentWriter, read_segment
from dvemb.store.rundir import RunDir, load_tensors, save_tensors
from dvemb.store.trajectory import read_schedule
from dvemb.types import StepGrads

log = logging.getLogger(__name__)
DTYPES = {"float32": torch.float32, "float64": torch.float64}
T = TypeVar("T")


def recorded_score_mode(run: RunDir) -> str:
    """``score.mode`` of the run's recorded config (the default, exact, when absent)."""
    return ((run.meta().get("config") or {}).get("score") or {}).get("mode", "exact")


def embed_segment(
    run: RunDir, segment: int, embed: EmbedConfig | None = None, score_mode: str | None = None
) -> tuple[str, ...]:
    """Embed segment ``segment`` of ``run``; writes its embeddings file and propagator. Returns both paths,
    or () when ``embed.write`` says the scoring mode needs no embeddings (nothing is read or written).

    embed: dtype, device, curvature (its vectors must have been captured in training), blocks, write;
    None = the ``embed`` section recorded in run.json. score_mode: None = the recorded ``score.mode``.
    """
    embed = embed or EmbedConfig.model_validate(run.meta()["config"]["embed"])
    b = run.boundaries
    if not 0 <= segment < len(b) - 1:
        raise ValueError(f"segment {segment}: the run has segments 0..{len(b) - 2}")
    mode = score_mode or recorded_score_mode(run)
    if not writes_embeddings(embed.write, mode):
        log.info(
            "embed: segment %d not embedded (embed.write=%s; score.mode=%s needs no embeddings)",
            segment,
            embed.write,
            mode,
        )
        return ()
    check_not_dropped(run, [run.grads(segment)], "embed")
    records = read_segment(run.grads(segment), expected_steps=range(b[segment], b[segment + 1]), kind="grads")
    curv = curvature_fn(run, embed.curvature, [segment])
    dtype = DTYPES[embed.dtype]
    if state_kind(run):  # AdamW (theta, m, v) / momentum (theta, b); a Gaussian AdamW store: SGD proxy (warned)
        coef, clip, rho = state_coefficients(run, records, dtype)
        emb, prop = state_embed_steps(records, coef, clip, rho, dtype, embed.device, curv, embed.blocks)
    else:
        emb, prop = embed_steps(
            records, read_schedule(run), dtype=dtype, device=embed.device, curvature=curv, blocks=embed.blocks
        )
    finite_records(emb, f"segment {segment} embeddings")
    finite(prop.state_dict(), f"segment {segment} propagator")
    dims = {n: g.shape[1] for n, g in emb[0].grads.items()}
    with SegmentWriter(run.embeddings(segment), dims, dtype=embed.dtype, kind="embeddings") as w:
        w.write_steps(emb)
    built = {"segment": segment, "curvature": embed.curvature, "blocks": embed.blocks}
    save_tensors(run.propagator(segment), prop.state_dict(), metadata={"embedding": json.dumps(built, sort_keys=True)})
    return str(run.embeddings(segment)), str(run.propagator(segment))


class PerSegment(Sequence[T]):
    """``load(j)`` for segment j, called on every access and never kept: a pass over the segments
    holds one at a time."""

    def __init__(self, n: int, load: Callable[[int], T]):
        self._n, self._load = n, load

    def __len__(self) -> int:
        return self._n

    @overload
    def __getitem__(self, j: int) -> T: ...

    @overload
    def __getitem__(self, j: slice) -> list[T]: ...

    def __getitem__(self, j: int | slice) -> T | list[T]:
        if isinstance(j, slice):
            return [self._load(i) for i in range(*j.indices(self._n))]
        if j < 0:
            j += self._n
        if not 0 <= j < self._n:
            raise IndexError(f"segment {j} outside 0..{self._n - 1}")
        return self._load(j)


def load_propagator(state: dict[str, torch.Tensor], device: str = "cpu") -> Propagator | StatePropagator:
    """A segment propagator from its file's tensors: the SGD one (``M.<layer>``) or an optimizer state's
    (``Q.<block>``: AdamW, SGD with momentum)."""
    if any(k.startswith("Q.") for k in state):
        return StatePropagator.from_state_dict(state, device)
    return Propagator.from_state_dict(state, device)


def embedded_settings(run: RunDir) -> dict[str, str]:
    """``curvature`` and ``blocks`` the run's embeddings were built with (from segment 0's propagator; empty when
    there are none or the files predate the record)."""
    path = run.propagator(0)
    if not path.exists():
        return {}
    with safe_open(str(path), "pt") as f:
        meta = json.loads((f.metadata() or {}).get("embedding", "{}"))
    return {k: meta[k] for k in ("curvature", "blocks") if k in meta}


def load_embeddings(
    run: RunDir, device: str = "cpu"
) -> tuple[PerSegment[list[StepGrads]], PerSegment[Propagator | StatePropagator]]:
    """Every segment's local embeddings and propagator, indexed by segment and read when indexed (one
    segment in memory at a time). StoreError when the embed stage did not write them (saying how to),
    DamagedFileError naming a damaged file."""
    run.require("train")
    b = run.boundaries
    k = len(b) - 1
    paths = [p for j in range(k) for p in (run.embeddings(j), run.propagator(j))]
    missing = [p for p in paths if not p.exists()]
    if missing:
        names = ", ".join(str(p.relative_to(run.root)) for p in missing[:4])
        more = f" and {len(missing) - 4} more" if len(missing) > 4 else ""
        raise StoreError(
            f"{run.root}: score.mode=embedding needs the embeddings, missing {names}{more}: embed the run with "
            f"`dvemb embed {run.root} --set embed.write=always` (embed.write=auto writes them only for "
            "score.mode=embedding), or score with score.mode=exact or direct"
        )
    integrity.check_files(run.root, paths)
    local = PerSegment(k, lambda j: read_segment(run.embeddings(j), range(b[j], b[j + 1]), kind="embeddings"))
    props = PerSegment(k, lambda j: load_propagator(load_tensors(run.propagator(j)), device))
    return local, props
