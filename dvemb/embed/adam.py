"""Adam-aware scores from the gradient store: the AdamW step linearised around the recorded trajectory.

AdamW's state is (theta, m, v). Removing occurrence (t, z) perturbs step t's gradient by
``dg = -c_t g_{t,z}`` (c_t: the clip factor) and the perturbation then travels through every later step
of the LINEARISED optimizer (per coordinate, with ``D = 1/(sqrt(v'/bc2) + eps)``,
``S = m' / (2 sqrt(v') sqrt(bc2) (sqrt(v'/bc2) + eps)^2)``, ``c1 = lr / bc1``)::

    dm' = b1 dm + (1 - b1) dg             dv' = b2 dv + 2 (1 - b2) g (.) dg
    dtheta' = (1 - lr wd) dtheta - c1 [D (.) dm' - S (.) dv']          dg_k = c_k H_k dtheta_k

with H_k the curvature model of the embedding modes (empirical Fisher or GGN vectors from the store).
In the form of :mod:`dvemb.embed.linear_state` (which scores validation-first and forms embeddings): the
adjoint ``(u_theta, u_m, u_v)`` starts at ``(grad f(theta_T), 0, 0)`` and runs backwards through the transposed
map; the occurrence's score (first-order TSLOO, positive = helped) is ``-c_t <ubar_g, g_{t,z}>`` with
``ubar_g = (1 - b1)(u_m - c1 D u_theta) + 2 (1 - b2) g (.) (u_v + c1 S u_theta)``.

Elementwise D and S need the stored coordinates to be the gradient's own: unprojected capture, or
``capture.kind: subsample`` (a fixed random subset of each layer's coordinates). ``m`` and ``v`` are
rebuilt per step from the recorded boundary states and the captured batch gradients ``g_t = sum_z g_{t,z}``
(exact on the stored coordinates). Inner products over a coordinate subset are scaled by the layer's
sampling ratio rho = (d_in d_out) / (k_a k_s), which makes them unbiased estimates of the full ones. Under a
Gaussian projection the elementwise state has no image; a scalar stand-in for D (frozen per layer and
segment) was measured to anti-correlate with TSLOO (the m and v paths of Adam nearly cancel and cannot
be separated there), so such stores are scored with the SGD proxy instead (dvemb.embed.recorded_state).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from dvemb.capture.layers import kind_of
from dvemb.capture.projection import Projector
from dvemb.embed.linear_state import StepCoef, state_direct_scores
from dvemb.embed.propagator import Curvature, Vectors
from dvemb.errors import CaptureError
from dvemb.types import LayerProjection, StepGrads

SEP = "::"


@dataclass(frozen=True)
class AdamRun:
    """What the linearised AdamW needs besides the gradients: the optimizer as recorded.

    lr / weight_decay: per step, per parameter group; clip: per step; group_of: parameter -> group;
    states: boundary step -> optimizer state (``"{param}::exp_avg" | "::exp_avg_sq" | "::step"``).
    """

    betas: tuple[float, float]
    eps: float
    lr: Sequence[Sequence[float]]
    weight_decay: Sequence[Sequence[float]]
    clip: Sequence[float]
    group_of: Mapping[str, int]
    states: Mapping[int, Mapping[str, torch.Tensor]]


class StoredCoordinates:
    """Maps parameter-shaped tensors of each captured layer to its stored (projected) coordinates."""

    def __init__(self, model: nn.Module, specs: Mapping[str, LayerProjection], dtype: torch.dtype):
        modules = dict(model.named_modules())
        self.specs, self.dtype = specs, dtype
        self.modules = {n: modules[n] for n in specs}
        self.proj = {n: Projector(s, torch.float64) for n, s in specs.items()}
        for n, s in specs.items():
            if len(s.params) > 2 or kind_of(self.modules[n]) is None:
                raise CaptureError(
                    f"layer {n!r}: the Adam-aware mode and embed.curvature=hessian need untied layers of a known kind"
                )

    def ratio(self, name: str) -> float:
        """Parameters per stored coordinate of layer ``name`` (1 unprojected; d / k for a subsample)."""
        s = self.specs[name]
        return s.d_in * s.d_out / s.dim

    def rho(self) -> dict[str, torch.Tensor]:
        """layer -> [dim] float64: :meth:`ratio` per stored coordinate."""
        return {n: torch.full((s.dim,), self.ratio(n), dtype=torch.float64) for n, s in self.specs.items()}

    def exact(self) -> bool:
        """True when every stored coordinate is a coordinate of the parameters (identity, subsample, rowwise)."""
        return all(s.own_coordinates for s in self.specs.values())

    def to_stored(self, per_param: Callable[[str], torch.Tensor]) -> Vectors:
        """layer -> [dim]: ``per_param(parameter name)`` (parameter-shaped) in stored coordinates."""
        out = {}
        for n, s in self.specs.items():
            module = self.modules[n]
            local = {p.rsplit(".", 1)[-1]: per_param(p).to(torch.float64) for p in s.params}
            x = kind_of(module).grad_matrix(module, local)  # [d_out, d_in]
            out[n] = self.proj[n].project_matrices(x).to(self.dtype)
        return out

    def from_stored(self, rows: Vectors) -> dict[str, torch.Tensor]:
        """The transpose of :meth:`to_stored`, row by row: layer -> [V, dim] to parameter -> [V, *shape] float64
        (the parameters of the layers in ``rows``; a coordinate store scatters, a Gaussian one multiplies by P^T)."""
        out = {}
        with torch.enable_grad():
            for n, x in rows.items():
                module = self.modules[n]
                local = {
                    p: torch.zeros((len(x), *getattr(module, p.rsplit(".", 1)[-1]).shape), dtype=torch.float64)
                    for p in self.specs[n].params
                }
                for leaf in local.values():
                    leaf.requires_grad_(True)
                y = self.proj[n].project_matrices(
                    kind_of(module).grad_matrix(module, {p.rsplit(".", 1)[-1]: v for p, v in local.items()})
                )
                out.update(zip(local, torch.autograd.grad(y, list(local.values()), x.to(y.dtype))))
        return out


def adam_coefficients(
    records: Sequence[StepGrads], run: AdamRun, coords: StoredCoordinates, params: Mapping[str, torch.Tensor]
) -> list[dict[str, dict[str, torch.Tensor]]]:
    """Per step and layer (stored coordinates, [dim] each): ``c1`` = lr / bc1, ``c1d`` = c1 D, ``c1s`` = c1 S,
    ``g`` the clipped batch gradient, ``decay`` = 1 - lr wd."""
    b1, b2 = run.betas
    if not coords.exact():
        raise CaptureError(
            "the Adam-aware recursion needs stored coordinates of the gradient's own (unprojected "
            "or capture.kind subsample)"
        )
    bounds = sorted(run.states)
    groups = sorted(set(run.group_of.values()))
    member = {  # group i -> layer -> [dim] 1 where the stored coordinate belongs to a parameter of group i
        i: coords.to_stored(lambda p, i=i: torch.full_like(params[p], float(run.group_of[p] == i))) for i in groups
    }

    def per_group(values: Sequence[float]) -> Vectors:
        return {n: sum(values[i] * member[i][n] for i in groups) for n in coords.specs}

    out = []
    state: dict[str, Vectors] = {}
    count = 0.0
    for rec in records:
        t = rec.step
        lr, wd = per_group(run.lr[t]), per_group(run.weight_decay[t])
        if t in bounds:  # restart from the recorded state: no drift across segments
            st = run.states[t]

            def get(p: str, key: str, st=st) -> torch.Tensor:
                return st.get(f"{p}{SEP}{key}", torch.zeros_like(params[p]))

            count = max((float(v) for k, v in st.items() if k.endswith(SEP + "step")), default=0.0)
            state = {key: coords.to_stored(lambda p, key=key: get(p, key)) for key in ("exp_avg", "exp_avg_sq")}
        count += 1
        bc1, bc2 = 1 - b1**count, 1 - b2**count
        clip = float(run.clip[t])
        step: dict[str, dict[str, torch.Tensor]] = {}
        for n in coords.specs:
            g = clip * rec.grads[n].to(coords.dtype).sum(0)
            c1 = lr[n] / bc1
            m = b1 * state["exp_avg"][n] + (1 - b1) * g
            v = b2 * state["exp_avg_sq"][n] + (1 - b2) * g * g
            state["exp_avg"][n], state["exp_avg_sq"][n] = m, v
            root = torch.sqrt(v)
            denom = root / bc2**0.5 + run.eps
            s = torch.where(root > 0, m / (2 * root.clamp_min(1e-300) * bc2**0.5 * denom**2), torch.zeros_like(m))
            step[n] = {
                "c1": c1 * torch.ones_like(m),
                "c1d": c1 / denom,
                "c1s": c1 * s,
                "g": g,
                "decay": 1 - lr[n] * wd[n],
            }
        out.append(step)
    return out


def adam_step_coefficients(
    coef: list[dict[str, dict[str, torch.Tensor]]], betas: tuple[float, float]
) -> list[StepCoef]:
    """:func:`adam_coefficients` in the form of dvemb.embed.linear_state (state (theta, m, v))."""
    b1, b2 = betas
    out = []
    for step in coef:
        lin = {}
        for n, k in step.items():
            one = torch.ones_like(k["c1d"])
            k2 = 2 * (1 - b2) * k["g"]
            lin[n] = {
                "b1": b1 * one,
                "k1": (1 - b1) * one,
                "b2": b2 * one,
                "k2": k2,
                "P": k["c1d"],
                "S": k["c1s"],
                "a": (1 - b1) * k["c1d"] - k2 * k["c1s"],
                "lam": 0 * one,
                "decay": k["decay"] * one,
            }
        out.append(lin)
    return out


def adam_direct_scores(
    records: Sequence[StepGrads],
    run: AdamRun,
    coords: StoredCoordinates,
    params: Mapping[str, torch.Tensor],
    validation: Vectors,
    curvature: Callable[[StepGrads], Curvature] | None = None,
    blocks: str = "layer",
    coef: list[dict[str, dict[str, torch.Tensor]]] | None = None,
) -> list[torch.Tensor]:
    """Per-step scores [B_t, V] at the checkpoint right after ``records`` (consecutive steps from a boundary).

    params: parameter name -> a tensor of its shape (for the per-parameter LR / decay / state maps);
    validation: layer -> [V, D] projected validation gradients at that checkpoint;
    coef: :func:`adam_coefficients` of ``records`` (None: computed here).
    """
    coef = coef if coef is not None else adam_coefficients(records, run, coords, params)
    clip = [float(run.clip[r.step]) for r in records]
    return state_direct_scores(
        records,
        adam_step_coefficients(coef, run.betas),
        clip,
        coords.rho(),
        validation,
        curvature,
        blocks,
        coords.dtype,
    )
