"""The propagator ``Q = alpha*I - M`` per layer, and one step of the backward recursion.

Per layer (block-diagonal curvature), processing steps t = T-1 … 0 (docs/DESIGN.md §4):
    e_z = eta_t (alpha I - M) g_z          the data value embeddings of step t
    alpha <- c_t alpha,  M <- c_t M + sum_j beta_j e^f_j f_j^T      (c_t = 1 - eta_t * lambda_t)
where the curvature H_t = sum_j beta_j f_j f_j^T; the empirical Fisher uses f = g, beta = 1/w.
After the step, ``alpha*I - M`` = A_{end-1} … A_t. Layers of equal dimension are batched.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dvemb.types import StepGrads

Vectors = dict[str, torch.Tensor]  # layer -> [n, D]


@dataclass
class Curvature:
    """The curvature vectors of one step: H = sum_j coef_j f_j f_j^T. vectors: layer -> [n, D]; coef: [n]."""

    vectors: Vectors
    coef: torch.Tensor


def empirical_fisher(rec: StepGrads) -> Curvature:
    """H_t = sum_z w_z grad l_z grad l_z^T = sum_z (1/w_z) g_z g_z^T (the paper's choice)."""
    return Curvature(rec.grads, 1.0 / rec.weights)


class Propagator:
    """Q = alpha*I - M for each layer; starts as the identity. M: per dim group [L, D, D]."""

    def __init__(self, dims: dict[str, int], dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        self.dims = dict(dims)
        self.dtype, self.device = dtype, torch.device(device)
        self.groups: dict[int, list[str]] = {}
        for name, d in self.dims.items():
            self.groups.setdefault(d, []).append(name)
        self.M = {d: torch.zeros(len(ns), d, d, dtype=dtype, device=self.device) for d, ns in self.groups.items()}
        self.alpha = 1.0

    def _stack(self, vecs: Vectors, names: list[str]) -> torch.Tensor:
        """[L, n, D] on this device/dtype."""
        return torch.stack([vecs[n].to(self.device, self.dtype) for n in names])

    def apply(self, vecs: Vectors, transpose: bool = False) -> Vectors:
        """Rows x -> Q x (or Q^T x): alpha x - x M^T (or alpha x - x M). ``vecs`` may hold a subset of layers."""
        out = {}
        for d, names in self.groups.items():
            idx = [i for i, n in enumerate(names) if n in vecs]
            if not idx:
                continue
            sub = [names[i] for i in idx]
            m = self.M[d] if len(idx) == len(names) else self.M[d][idx]
            x = self._stack(vecs, sub)
            out.update(
                zip(sub, torch.baddbmm(x, x, m if transpose else m.transpose(1, 2), beta=self.alpha, alpha=-1.0))
            )
        return out

    def step(self, rec: StepGrads, lr: float, weight_decay: float = 0.0, curvature: Curvature | None = None) -> Vectors:
        """Embed step ``rec`` (returns layer -> [B, D] embeddings eta Q g), then fold A_t into Q."""
        c = 1.0 - lr * weight_decay
        curv = curvature or empirical_fisher(rec)
        coef = curv.coef.to(self.device, self.dtype)
        out = {}
        for d, names in self.groups.items():
            m = self.M[d]
            g = self._stack(rec.grads, names)
            e = torch.baddbmm(g, g, m.transpose(1, 2), beta=self.alpha * lr, alpha=-lr)
            if curvature is None:
                f, ef = g, e
            else:
                f = self._stack(curv.vectors, names)
                ef = torch.baddbmm(f, f, m.transpose(1, 2), beta=self.alpha * lr, alpha=-lr)
            m.baddbmm_((ef * coef[None, :, None]).transpose(1, 2), f, beta=c)
            out.update(zip(names, e))
        self.alpha *= c
        return out

    def compose(self, other: Propagator) -> None:
        """self <- self @ other, i.e. (a I - M)(b I - N) = ab I - (a N + b M - M N)."""
        a, b = self.alpha, other.alpha
        for d in self.groups:
            self.M[d] = torch.baddbmm(other.M[d] * a + self.M[d] * b, self.M[d], other.M[d], alpha=-1.0)
        self.alpha = a * b

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Flat tensors for safetensors: one [D, D] M per layer plus alpha."""
        out = {"alpha": torch.tensor([self.alpha], dtype=torch.float64)}
        for d, names in self.groups.items():
            for i, n in enumerate(names):
                out[f"M.{n}"] = self.M[d][i].contiguous()
        return out

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor], device: str | torch.device = "cpu") -> Propagator:
        dims = {k[2:]: v.shape[0] for k, v in state.items() if k.startswith("M.")}
        dtype = next(v.dtype for k, v in state.items() if k.startswith("M."))
        prop = cls(dims, dtype, device)
        for d, names in prop.groups.items():
            prop.M[d] = torch.stack([state[f"M.{n}"].to(device) for n in names])
        prop.alpha = float(state["alpha"][0])
        return prop
