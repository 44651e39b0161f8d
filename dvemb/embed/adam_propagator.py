"""Adam-aware data value embeddings: the linearised AdamW step (dvemb.embed.adam) as a propagator on (theta, m, v).

In stored coordinates the linearised state is ``s = (theta, m, v)``, 3D per block, and step t maps it by::

    theta' = decay theta - c a (.) H theta - b1 c1d (.) m + b2 c1s (.) v
    m'     = b1 m + (1 - b1) c H theta
    v'     = b2 v + 2 (1 - b2) c g (.) H theta

with ``a = (1 - b1) c1d - 2 (1 - b2) c1s (.) g``, c the clip factor and ``H x = rho (.) sum_j beta_j f_j <f_j, x>``
(rho: each stored coordinate's sampling ratio, as in adam_direct_scores). Removing occurrence (t, z) pushes
``s_{t+1}`` by ``rho (.) (c a (.) g_z, -(1 - b1) c g_z, -2 (1 - b2) c g (.) g_z)``.

A segment's steps are processed backwards from ``Q = I`` ([3D, 3D] per block); before step t is folded in,
``Q = Phi_{end-1} … Phi_{t+1}``. With Q's column blocks ``Q_theta, Q_m, Q_v`` ([3D, D] each)::

    W   = -Q_theta diag(a) + (1 - b1) Q_m + 2 (1 - b2) Q_v diag(g)                    [3D, D]
    e_z = -c W (rho (.) g_z)             the local embedding: z's push carried to the segment's end state
    Q  <- Q Phi_t:   Q_theta <- Q_theta diag(decay) + c W H,
                     Q_m <- b1 (Q_m - Q_theta diag(c1d)),   Q_v <- b2 (Q_v + Q_theta diag(c1s))

A score at checkpoint b_m is ``<(v_val, 0, 0), K_{m-1} … K_{j+1} e_z>``: the validation gradient padded with
zeros for the moments (:meth:`AdamPropagator.seed`). The numbers are those of adam_direct_scores; embeddings
answer a new validation table with one pass over the segments instead of one over the gradient store.
Storage: 3D floats per occurrence and a [3D, 3D] propagator per block and segment (3x and 9x the SGD ones).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

from dvemb.embed.adam import AdamRun, StoredCoordinates, adam_coefficients
from dvemb.embed.blocks import MODEL, check_blocks, merge_curvature, merge_step
from dvemb.embed.propagator import Curvature, Vectors, empirical_fisher
from dvemb.types import StepGrads


class AdamPropagator:
    """Q [3D, 3D] per block (one per layer, or ``model``), acting on column states (theta; m; v)."""

    def __init__(self, dims: Mapping[str, int], dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        """dims: block -> 3D (the state's length). Starts as the identity."""
        for n, d in dims.items():
            if d % 3:
                raise ValueError(f"block {n!r}: an AdamW state has 3D coordinates, got {d}")
        self.dims = dict(dims)
        self.dtype, self.device = dtype, torch.device(device)
        self.Q = {n: torch.eye(d, dtype=dtype, device=self.device) for n, d in self.dims.items()}

    def seed(self, validation: Vectors) -> Vectors:
        """Validation rows [V, D] as states [V, 3D]: the moments' parts zero (a score reads theta only)."""
        out = {}
        for n, x in validation.items():
            d = self.dims[n] // 3
            if x.shape[1] != d:
                raise ValueError(f"block {n!r}: validation vectors of width {x.shape[1]}, the state holds {d}")
            x = x.to(self.device, self.dtype)
            out[n] = torch.cat([x, x.new_zeros(x.shape[0], 2 * d)], dim=1)
        return out

    def apply(self, vecs: Vectors, transpose: bool = False) -> Vectors:
        """Rows x -> Q x (or Q^T x). ``vecs`` may hold a subset of the blocks."""
        return {
            n: x.to(self.device, self.dtype) @ (self.Q[n] if transpose else self.Q[n].T)
            for n, x in vecs.items()
            if n in self.Q
        }

    def step(
        self,
        rec: StepGrads,
        coef: Mapping[str, Mapping[str, torch.Tensor]],
        clip: float,
        betas: tuple[float, float],
        rho: Mapping[str, torch.Tensor],
        curvature: Curvature | None = None,
    ) -> Vectors:
        """Embed step ``rec`` (block -> [B, 3D]), then fold its Phi_t into Q.

        coef: block -> the step's adam_coefficients ([D] each); rho: block -> [D] sampling ratios."""
        b1, b2 = betas
        curv = curvature or empirical_fisher(rec)
        beta = curv.coef.to(self.device, self.dtype)
        out = {}
        for n, q in self.Q.items():
            d = q.shape[0] // 3
            k = {key: x.to(self.device, self.dtype) for key, x in coef[n].items()}
            r = rho[n].to(self.device, self.dtype)
            qt, qm, qv = q[:, :d], q[:, d : 2 * d], q[:, 2 * d :]
            a = (1 - b1) * k["c1d"] - 2 * (1 - b2) * k["c1s"] * k["g"]
            w = (1 - b1) * qm + 2 * (1 - b2) * qv * k["g"] - qt * a
            out[n] = (-clip) * (rec.grads[n].to(self.device, self.dtype) * r) @ w.T
            f = curv.vectors[n].to(self.device, self.dtype)
            wh = (((w * r) @ f.T) * beta) @ f  # W H, H = diag(rho) F^T diag(beta) F
            self.Q[n] = torch.cat(
                [qt * k["decay"] + clip * wh, b1 * (qm - qt * k["c1d"]), b2 * (qv + qt * k["c1s"])], 1
            )
        return out

    def compose(self, other: AdamPropagator) -> None:
        """self <- self @ other."""
        self.Q = {n: q @ other.Q[n] for n, q in self.Q.items()}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Flat tensors for safetensors: per block its [3D, 3D] Q (``Q.<block>``)."""
        return {f"Q.{n}": q.contiguous() for n, q in self.Q.items()}

    @classmethod
    def from_state_dict(cls, state: Mapping[str, torch.Tensor], device: str | torch.device = "cpu") -> AdamPropagator:
        qs = {k[2:]: v for k, v in state.items() if k.startswith("Q.")}
        prop = cls({n: q.shape[0] for n, q in qs.items()}, next(iter(qs.values())).dtype, device)
        prop.Q = {n: q.to(prop.device) for n, q in qs.items()}
        return prop


def adam_embed_steps(
    records: Sequence[StepGrads],
    run: AdamRun,
    coords: StoredCoordinates,
    params: Mapping[str, torch.Tensor],
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    curvature: Callable[[StepGrads], Curvature] | None = None,
    blocks: str = "layer",
) -> tuple[list[StepGrads], AdamPropagator]:
    """Local Adam-aware embeddings of consecutive ``records`` (from a boundary, whose optimizer state ``run``
    holds) and the propagator of the whole run of steps. Embedding rows: block -> [B, 3D], the state
    (theta, m, v) at the end of ``records`` that removing the occurrence would change (blocks: "layer" |
    "model", the curvature's block structure as in adam_direct_scores)."""
    check_blocks(blocks)
    coef = adam_coefficients(records, run, coords, params)
    rho = {n: torch.full((s.dim,), coords.ratio(n), dtype=torch.float64) for n, s in coords.specs.items()}
    if blocks == "model":
        order = sorted(coords.specs)

        def cat(vecs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            return {MODEL: torch.cat([vecs[n] for n in order])}

        records, curvature = [merge_step(r) for r in records], merge_curvature(curvature)
        coef = [{MODEL: {key: cat({n: c[n][key] for n in order})[MODEL] for key in c[order[0]]}} for c in coef]
        rho = cat(rho)
    prop = AdamPropagator({n: 3 * len(x) for n, x in rho.items()}, dtype, device)
    out = []
    for rec, c in zip(reversed(records), reversed(coef)):
        emb = prop.step(rec, c, float(run.clip[rec.step]), run.betas, rho, curvature(rec) if curvature else None)
        out.append(StepGrads(rec.step, rec.sample_ids, rec.weights, emb))
    out.reverse()
    return out, prop
