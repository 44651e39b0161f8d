"""An optimizer with state, linearised around the recorded trajectory: scores validation-first and as embeddings.

The state per block (a layer, or the whole model) is ``s = (theta, m)`` or ``(theta, m, v)``, D coordinates each.
Step t, with c its clip factor, H_t the curvature model and ``dd = c H dtheta + lam dtheta`` the change of the
direction the optimizer receives (the gradient plus coupled decay), maps the linearised state by::

    m' = b1 m + k1 dd            v' = b2 v + k2 dd
    theta' = decay theta - a dd - b1 P m + b2 S v

and removing occurrence (t, z) adds ``-c g_z`` to dd. Every coefficient is a [D] vector of the step
(:class:`StepCoef`): AdamW (dvemb.embed.adam) has ``k1 = 1 - beta1``, ``k2 = 2 (1 - beta2) g``, ``P = lr D / bc1``,
``S = lr S / bc1``, ``a = P k1 - S k2``; SGD with momentum (dvemb.embed.momentum) has no v, ``b1 = mu``,
``k1 = 1 - dampening``, ``P = lr`` (Nesterov: ``P = lr mu``, ``a = P k1 + lr``), ``lam`` the coupled decay.
``H x = rho (.) sum_j beta_j f_j <f_j, x>`` with rho each stored coordinate's sampling ratio (a coordinate
subsample's inner products scaled to the full ones; 1 otherwise).

Two equal ways to the scores (positive = the occurrence helped):

* validation-first (:func:`state_direct_scores`): the adjoint ``(u_theta, u_m, u_v)`` starts at
  ``(grad f(theta_T), 0, 0)``; step t scores ``-c <rho g_z, ubar>`` with ``ubar = -a u_theta + k1 u_m + k2 u_v``,
  then ``u_theta <- decay u_theta + c H^T ubar + lam ubar``, ``u_m <- b1 (u_m - P u_theta)``,
  ``u_v <- b2 (u_v + S u_theta)``;
* embeddings (:class:`StatePropagator`): a segment processed backwards from ``Q = I`` ([nD, nD] per block,
  n = 2 or 3); with Q's column blocks and ``W = -Q_theta diag(a) + Q_m diag(k1) + Q_v diag(k2)``, the local
  embedding is ``e_z = -c W (rho g_z)`` (the segment-end state the removal changes) and
  ``Q <- Q Phi_t``: ``Q_theta <- Q_theta diag(decay) + c W H + W diag(lam)``, ``Q_m <- b1 (Q_m - Q_theta P)``,
  ``Q_v <- b2 (Q_v + Q_theta S)``. A score is ``<(v_val, 0, 0), K_{m-1} … K_{j+1} e_z>``.
Storage of the embeddings: nD floats per occurrence and nD x nD per block and segment.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

from dvemb.embed.blocks import MODEL, check_blocks, merge_curvature, merge_layers, merge_step
from dvemb.embed.clipping import project_columns, project_rows
from dvemb.embed.propagator import Curvature, Vectors, empirical_fisher
from dvemb.types import LayerProjection, StepGrads

StepCoef = dict[str, dict[str, torch.Tensor]]  # block -> coefficient name -> [D]
CurvatureFn = Callable[[StepGrads], Curvature]


def sampling_ratio(spec: LayerProjection) -> float:
    """Parameters per stored coordinate of a coordinate subsample (its inner products scale by it); 1 for the
    gradient's own coordinates and for a Gaussian projection (which preserves inner products in expectation)."""
    return spec.d_in * spec.d_out / spec.dim if spec.kind in ("subsample", "rowwise") else 1.0


def _merge(
    records: Sequence[StepGrads], coef: Sequence[StepCoef], rho: Mapping[str, torch.Tensor], curvature, blocks: str
):
    """Everything in the layout of ``blocks`` (``model``: each layer's [D] laid end to end in sorted order)."""
    check_blocks(blocks)
    if blocks != "model":
        return list(records), list(coef), dict(rho), curvature
    order = sorted(rho)

    def cat(vecs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([vecs[n] for n in order])

    merged = [{MODEL: {k: cat({n: c[n][k] for n in order}) for k in c[order[0]]}} for c in coef]
    return [merge_step(r) for r in records], merged, {MODEL: cat(rho)}, merge_curvature(curvature)


def curvature_times(curv: Curvature, x: Vectors, dtype: torch.dtype) -> Vectors:
    """H x for columns x (block -> [D, V]) under ``curv``'s layout: its vectors (``F^T diag(beta) F x``) or its
    product (the exact Hessian)."""
    if curv.product is not None:
        return curv.product(x)
    beta = curv.coef.to(dtype)[:, None]
    out = {}
    for n, cols in x.items():
        f = curv.vectors[n].to(cols.device, dtype)
        out[n] = f.T @ ((f @ cols) * beta.to(cols.device))
    return out


def state_direct_scores(
    records: Sequence[StepGrads],
    coef: Sequence[StepCoef],
    clip: Sequence[float],
    rho: Mapping[str, torch.Tensor],
    validation: Vectors,
    curvature: CurvatureFn | None = None,
    blocks: str = "layer",
    dtype: torch.dtype = torch.float64,
) -> list[torch.Tensor]:
    """Per-step scores [B_t, V] at the checkpoint right after ``records`` (consecutive steps).

    coef / clip: per record, its step's coefficients and clip factor; rho: layer -> [D] sampling ratios;
    validation: layer -> [V, D] projected validation gradients at that checkpoint."""
    records, coef, rho, curvature = _merge(records, coef, rho, curvature, blocks)
    validation = merge_layers(validation) if blocks == "model" else validation
    names = list(rho)
    u = {n: validation[n].to(dtype).T.contiguous() for n in names}  # [D, V]
    has_v = "k2" in coef[0][names[0]]
    um = {(k, n): torch.zeros_like(u[n]) for k in ("m", "v") for n in names}
    out: list[torch.Tensor] = []
    for rec, c, cl in zip(reversed(records), reversed(coef), reversed(clip)):
        ubar = {}
        for n in names:
            k = {key: x.to(dtype)[:, None] for key, x in c[n].items()}
            ubar[n] = -k["a"] * u[n] + k["k1"] * um["m", n]
            if has_v:
                ubar[n] += k["k2"] * um["v", n]
                um["v", n] = k["b2"] * (um["v", n] + k["S"] * u[n])
            um["m", n] = k["b1"] * (um["m", n] - k["P"] * u[n])
        r = {n: rho[n].to(dtype)[:, None] for n in names}
        # clipping's derivative (dvemb.embed.clipping): the gradient's perturbations reach dd through P
        pu = {n: project_columns(ubar[n], c[n]["q"].to(dtype), r[n][:, 0]) if "q" in c[n] else ubar[n] for n in names}
        out.append(-cl * sum(rec.grads[n].to(dtype) @ (r[n] * pu[n]) for n in names))  # [B, V]
        curv = curvature(rec) if curvature else empirical_fisher(rec)
        hu = curvature_times(curv, {n: r[n] * pu[n] for n in names}, dtype)  # H (rho P ubar)
        for n in names:
            k = c[n]
            u[n] = k["decay"].to(dtype)[:, None] * u[n] + cl * hu[n] + k["lam"].to(dtype)[:, None] * ubar[n]
    out.reverse()
    return out


class StatePropagator:
    """Q [nD, nD] per block (n = 2: theta, m; n = 3: theta, m, v), acting on column states."""

    def __init__(self, dims: Mapping[str, int], dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        """dims: block -> nD (the state's length). Starts as the identity."""
        self.dims = dict(dims)
        self.dtype, self.device = dtype, torch.device(device)
        self.Q = {n: torch.eye(d, dtype=dtype, device=self.device) for n, d in self.dims.items()}

    def apply(self, vecs: Vectors, transpose: bool = False) -> Vectors:
        """Rows x -> Q x (or Q^T x). ``vecs`` may hold a subset of the blocks."""
        return {
            n: x.to(self.device, self.dtype) @ (self.Q[n] if transpose else self.Q[n].T)
            for n, x in vecs.items()
            if n in self.Q
        }

    def step(
        self, rec: StepGrads, coef: StepCoef, clip: float, rho: Mapping[str, torch.Tensor], curvature: Curvature | None
    ) -> Vectors:
        """Embed step ``rec`` (block -> [B, nD]), then fold its Phi_t into Q. coef: the step's coefficients."""
        out, w, rw, parts, k = {}, {}, {}, {}, {}
        for n, q in self.Q.items():
            k[n] = {key: x.to(self.device, self.dtype) for key, x in coef[n].items()}
            d = len(k[n]["a"])
            r = rho[n].to(self.device, self.dtype)
            qt, qm = q[:, :d], q[:, d : 2 * d]
            w[n] = qm * k[n]["k1"] - qt * k[n]["a"]
            parts[n] = [qt, k[n]["b1"] * (qm - qt * k[n]["P"])]
            if q.shape[0] == 3 * d:
                qv = q[:, 2 * d :]
                w[n] = w[n] + qv * k[n]["k2"]
                parts[n].append(k[n]["b2"] * (qv + qt * k[n]["S"]))
            rw[n] = w[n] * r  # W diag(rho), then clipping's P on the right: W diag(rho) (I - q (rho q)^T)
            if "q" in k[n]:
                rw[n] = project_rows(rw[n], k[n]["q"], r)
            out[n] = (-clip) * rec.grads[n].to(self.device, self.dtype) @ rw[n].T
        # W diag(rho) P H = (H (W diag(rho) P)^T)^T, H symmetric
        wh = curvature_times(curvature or empirical_fisher(rec), {n: x.T for n, x in rw.items()}, self.dtype)
        for n, (qt, *rest) in parts.items():
            self.Q[n] = torch.cat([qt * k[n]["decay"] + clip * wh[n].T + w[n] * k[n]["lam"], *rest], dim=1)
        return out

    def compose(self, other: StatePropagator) -> None:
        """self <- self @ other."""
        self.Q = {n: q @ other.Q[n] for n, q in self.Q.items()}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Flat tensors for safetensors: per block its [nD, nD] Q (``Q.<block>``)."""
        return {f"Q.{n}": q.contiguous() for n, q in self.Q.items()}

    @classmethod
    def from_state_dict(cls, state: Mapping[str, torch.Tensor], device: str | torch.device = "cpu") -> StatePropagator:
        qs = {k[2:]: v for k, v in state.items() if k.startswith("Q.")}
        prop = cls({n: q.shape[0] for n, q in qs.items()}, next(iter(qs.values())).dtype, device)
        prop.Q = {n: q.to(prop.device) for n, q in qs.items()}
        return prop


def state_embed_steps(
    records: Sequence[StepGrads],
    coef: Sequence[StepCoef],
    clip: Sequence[float],
    rho: Mapping[str, torch.Tensor],
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    curvature: CurvatureFn | None = None,
    blocks: str = "layer",
) -> tuple[list[StepGrads], StatePropagator]:
    """Local embeddings of consecutive ``records`` (block -> [B, nD]: the state at the end of ``records`` that
    removing the occurrence would change) and the propagator of the whole run of steps."""
    records, coef, rho, curvature = _merge(records, coef, rho, curvature, blocks)
    n_state = 3 if "k2" in coef[0][next(iter(rho))] else 2
    prop = StatePropagator({n: n_state * len(x) for n, x in rho.items()}, dtype, device)
    out = []
    for rec, c, cl in zip(reversed(records), reversed(coef), reversed(clip)):
        emb = prop.step(rec, c, float(cl), rho, curvature(rec) if curvature else None)
        out.append(StepGrads(rec.step, rec.sample_ids, rec.weights, emb))
    out.reverse()
    return out, prop
