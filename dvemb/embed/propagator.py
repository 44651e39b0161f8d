"""The propagator ``Q = C - M`` per layer, and one step of the backward recursion.

Per layer (block-diagonal curvature), processing steps t = T-1 … 0 (docs/DESIGN.md §4), with
``E_t = diag(eta_t)`` the LR of each stored coordinate's own parameter (its param group; a scalar when the
layer is one group) and ``D_t = diag(c_t)``, ``c_t = 1 - eta_t (.) lambda_t`` its decay factor, so that the
linearised step is ``A_t = D_t - E_t H_t``:
    e_z = (C - M) E_t g_z                  the data value embeddings of step t
    C <- C (.) c_t,  M <- M D_t + sum_j beta_j e^f_j f_j^T,   e^f_j = (C - M) E_t f_j
where the curvature H_t = sum_j beta_j f_j f_j^T; the empirical Fisher uses f = g, beta = 1/w. C is
diagonal (one [D] vector per layer; a multiple of the identity when every coordinate shares one LR and
decay). After the step, ``C - M`` = A_{end-1} … A_t exactly. Layers of equal dimension are batched.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from dvemb.embed.clipping import project_columns, project_rows
from dvemb.types import Rate, StepGrads, Vectors


@dataclass
class Curvature:
    """The curvature of one step: H = sum_j coef_j f_j f_j^T (vectors: layer -> [n, D]; coef: [n]), or, where
    ``product`` is set, H applied to columns directly (block -> [D, V] to H x, same layout; the exact Hessian,
    dvemb.embed.hessian), and the vectors are unused."""

    vectors: Vectors
    coef: torch.Tensor
    product: Callable[[Vectors], Vectors] | None = None


def empirical_fisher(rec: StepGrads) -> Curvature:
    """H_t = sum_z w_z grad l_z grad l_z^T = sum_z (1/w_z) g_z g_z^T (the paper's choice)."""
    return Curvature(rec.grads, 1.0 / rec.weights)


Rates = Rate | Mapping[str, Rate]  # one value for every layer, or layer -> float | [D]


def layer_rates(x: Rates, names: list[str], d: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """[L, D] float64: ``x`` (one float, or layer -> float | [D]) for each layer of ``names`` (all of dim d)."""
    if not isinstance(x, Mapping):
        return torch.full((len(names), d), float(x), dtype=torch.float64, device=device)
    return torch.stack([torch.as_tensor(x[n], dtype=torch.float64, device=device).expand(d) for n in names])


class Propagator:
    """Q = diag(C) - M for each layer; starts as the identity. Per dim group: M [L, D, D], C [L, D]."""

    def __init__(self, dims: dict[str, int], dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        self.dims = dict(dims)
        self.dtype, self.device = dtype, torch.device(device)
        self.groups: dict[int, list[str]] = {}
        for name, d in self.dims.items():
            self.groups.setdefault(d, []).append(name)
        self.M = {d: torch.zeros(len(ns), d, d, dtype=dtype, device=self.device) for d, ns in self.groups.items()}
        self.C = {d: torch.ones(len(ns), d, dtype=dtype, device=self.device) for d, ns in self.groups.items()}

    def _stack(self, vecs: Vectors, names: list[str]) -> torch.Tensor:
        """[L, n, D] on this device/dtype."""
        return torch.stack([vecs[n].to(self.device, self.dtype) for n in names])

    def rates(self, x: Rates, names: list[str], d: int) -> torch.Tensor:
        """[L, D] float64: a per-layer value (float or [D] per coordinate) for each of ``names``."""
        return layer_rates(x, names, d, self.device)

    def apply(self, vecs: Vectors, transpose: bool = False) -> Vectors:
        """Rows x -> Q x (or Q^T x): C (.) x - x M^T (or C (.) x - x M). ``vecs`` may hold a subset of layers."""
        out = {}
        for d, names in self.groups.items():
            idx = [i for i, n in enumerate(names) if n in vecs]
            if not idx:
                continue
            sub = [names[i] for i in idx]
            full = len(idx) == len(names)
            m = self.M[d] if full else self.M[d][idx]
            c = self.C[d] if full else self.C[d][idx]
            x = self._stack(vecs, sub)
            out.update(zip(sub, torch.baddbmm(x * c[:, None, :], x, m if transpose else m.transpose(1, 2), alpha=-1.0)))
        return out

    def step(
        self,
        rec: StepGrads,
        lr: Rates,
        weight_decay: Rates = 0.0,
        curvature: Curvature | None = None,
        clip: Vectors | None = None,
    ) -> Vectors:
        """Embed step ``rec`` (returns layer -> [B, D] embeddings Q E P g), then fold A_t = D_t - E_t P H_t into Q.

        lr, weight_decay: the step's LR and coupled decay (decay factor 1 - lr * wd), one float for every
        layer or layer -> float | [D] (each stored coordinate's own param group; dvemb.types.Schedule.rates).
        clip: a clipped step's direction q per layer (``P = I - q q^T``, dvemb.embed.clipping); None: P = I.
        """
        curv = curvature or empirical_fisher(rec)
        coef = curv.coef.to(self.device, self.dtype)
        uniform = not isinstance(lr, Mapping) and not isinstance(weight_decay, Mapping)
        out = {}
        for d, names in self.groups.items():
            m, cq = self.M[d], self.C[d]
            if uniform:  # scalars: folded into the GEMMs (no pass over M of its own)
                eta, c = float(lr), 1.0 - float(lr) * float(weight_decay)
            else:
                eta64 = self.rates(lr, names, d)  # [L, D]
                c = (1.0 - eta64 * self.rates(weight_decay, names, d)).to(self.dtype)
                eta = eta64.to(self.dtype)[:, None, :]
            g = self._stack(rec.grads, names)
            q = self._stack({n: v[None] for n, v in clip.items()}, names)[:, 0] if clip is not None else None
            e = self._q_e(g if q is None else project_rows(g, q), m, cq, eta)
            if curv.product is not None:  # (C - M) E P H = (H P E (C - M)^T)^T, H and P symmetric
                y = (eta if isinstance(eta, float) else eta.transpose(1, 2)) * (
                    torch.diag_embed(cq) - m.transpose(1, 2)
                )
                hy = curv.product(dict(zip(names, y if q is None else project_columns(y, q))))
                upd = torch.stack([hy[n] for n in names]).transpose(1, 2)
                m.mul_(c if uniform else c[:, None, :]).add_(upd)
                cq.mul_(c)
                out.update(zip(names, e))
                continue
            if curvature is None:
                f, ef = g, e
            else:
                f = self._stack(curv.vectors, names)
                ef = self._q_e(f if q is None else project_rows(f, q), m, cq, eta)
            upd = (ef * coef[None, :, None]).transpose(1, 2)
            if uniform:
                m.baddbmm_(upd, f, beta=c)
            else:
                m.mul_(c[:, None, :]).baddbmm_(upd, f)  # M D_t + sum_j beta_j e^f_j f_j^T
            cq.mul_(c)
            out.update(zip(names, e))
        return out

    @staticmethod
    def _q_e(x: torch.Tensor, m: torch.Tensor, cq: torch.Tensor, eta: float | torch.Tensor) -> torch.Tensor:
        """Rows x [L, n, D] -> (C - M) E x, with E = eta (a float or [L, 1, D])."""
        if isinstance(eta, float):
            return torch.baddbmm(x * cq[:, None, :], x, m.transpose(1, 2), beta=eta, alpha=-eta)
        x = x * eta
        return torch.baddbmm(x * cq[:, None, :], x, m.transpose(1, 2), alpha=-1.0)

    def compose(self, other: Propagator) -> None:
        """self <- self @ other, i.e. (C1 - M1)(C2 - M2) = C1 C2 - (C1 M2 + M1 C2 - M1 M2) (C diagonal)."""
        for d in self.groups:
            c1, c2 = self.C[d], other.C[d]
            m1, m2 = self.M[d], other.M[d]
            self.M[d] = torch.baddbmm(c1[:, :, None] * m2 + m1 * c2[:, None, :], m1, m2, alpha=-1.0)
            self.C[d] = c1 * c2

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Flat tensors for safetensors: per layer its [D, D] M (``M.<layer>``), and C as one float64 scalar
        ``alpha`` (C = alpha I for every layer: one LR and decay for all coordinates, the layout of runs
        without param groups) or, where the coordinates' groups differ, per layer its [D] diagonal ``C.<layer>``."""
        out = {}
        for d, names in self.groups.items():
            for i, n in enumerate(names):
                out[f"M.{n}"] = self.M[d][i].contiguous()
        first = next(iter(self.C.values())).reshape(-1)[0]
        if all(bool((c == first).all()) for c in self.C.values()):
            return out | {"alpha": first.to(torch.float64).reshape(1).cpu()}
        for d, names in self.groups.items():
            for i, n in enumerate(names):
                out[f"C.{n}"] = self.C[d][i].contiguous()
        return out

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor], device: str | torch.device = "cpu") -> Propagator:
        """The inverse of :meth:`state_dict` (either layout of C)."""
        dims = {k[2:]: v.shape[0] for k, v in state.items() if k.startswith("M.")}
        dtype = next(v.dtype for k, v in state.items() if k.startswith("M."))
        prop = cls(dims, dtype, device)
        for d, names in prop.groups.items():
            prop.M[d] = torch.stack([state[f"M.{n}"].to(device) for n in names])
            if "alpha" in state:
                prop.C[d] = torch.full((len(names), d), float(state["alpha"][0]), dtype=dtype, device=prop.device)
            else:
                prop.C[d] = torch.stack([state[f"C.{n}"].to(device, dtype) for n in names])
        return prop
