"""Seeded Gaussian projections of per-sample Linear-layer gradients.

A Linear layer W: d_in -> d_out (bias = an extra input fixed at 1) has a per-sample weight
gradient ``G = sum_tokens ds a^T`` of shape [d_out, d_in + 1]. Two ways to compress it:

* ``kronecker`` (default): ``sum_tokens (P_s ds)(P_a a)^T = P_s G P_a^T`` of shape [k_s, k_a],
  flattened row-major; a side whose k >= d uses the identity (exact).
* ``elementwise`` (a tensor sketch, what dattri calls "elementwise"): k = k_a * k_s coordinates
  ``sqrt(k) * sum_tokens (P_s ds) * (P_a a) = sqrt(k) * diag(P_s G P_a^T)`` with P_a: [k, d_in],
  P_s: [k, d_out]. Inner products are unbiased, E<g, g'> = <G, G'>, and for the same number of
  dimensions the variance is lower than a Kronecker sketch's when the budget is small.

``P`` entries are N(0, 1/rows), drawn from a recorded per-layer seed.
"""

from __future__ import annotations

import zlib
from dataclasses import asdict, dataclass

import torch

DTYPES = {"float32": torch.float32, "float64": torch.float64}
KINDS = ("kronecker", "elementwise")


def layer_seed(base_seed: int, layer: str) -> int:
    """Stable per-layer seed (independent of Python's hash randomisation)."""
    return (base_seed * 1_000_003 + zlib.crc32(layer.encode())) % (2**31)


@dataclass(frozen=True)
class LayerProjection:
    """How one layer's gradient is compressed. ``d_in`` counts the bias input."""

    d_in: int
    d_out: int
    k_a: int
    k_s: int
    seed: int
    kind: str = "kronecker"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"projection kind {self.kind!r}: choose one of {', '.join(KINDS)}")

    @property
    def identity_a(self) -> bool:
        return self.kind == "kronecker" and self.k_a >= self.d_in

    @property
    def identity_s(self) -> bool:
        return self.kind == "kronecker" and self.k_s >= self.d_out

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, cols) of the stored per-sample gradient matrix (elementwise: one row of k_a * k_s)."""
        if self.kind == "elementwise":
            return (1, self.k_a * self.k_s)
        return (
            self.d_out if self.identity_s else self.k_s,
            self.d_in if self.identity_a else self.k_a,
        )

    @property
    def dim(self) -> int:
        """Length of the flattened per-sample gradient."""
        return self.shape[0] * self.shape[1]

    def to_json(self) -> dict:
        return asdict(self) | {
            "identity_a": self.identity_a,
            "identity_s": self.identity_s,
            "dim": self.dim,
        }

    @classmethod
    def from_json(cls, d: dict) -> LayerProjection:
        kind = d.get("kind", "kronecker")  # files written before the elementwise kind
        return cls(d_in=d["d_in"], d_out=d["d_out"], k_a=d["k_a"], k_s=d["k_s"], seed=d["seed"], kind=kind)


def gaussian(rows: int, cols: int, seed: int) -> torch.Tensor:
    """[rows, cols] float64 matrix with N(0, 1/rows) entries, identical on every device."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=gen, dtype=torch.float64) / rows**0.5


class Projector:
    """Applies a LayerProjection to layer inputs / output-gradients on a device and dtype."""

    def __init__(
        self,
        spec: LayerProjection,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ):
        self.spec = spec
        self.dtype = dtype
        self.elementwise = spec.kind == "elementwise"
        # kronecker: P_a [k_a, d_in], P_s [k_s, d_out]; elementwise: both k = k_a * k_s rows; None = identity.
        rows_a, rows_s = (spec.dim, spec.dim) if self.elementwise else (spec.k_a, spec.k_s)
        self.p_a = None if spec.identity_a else gaussian(rows_a, spec.d_in, spec.seed).to(device, dtype)
        self.p_s = None if spec.identity_s else gaussian(rows_s, spec.d_out, spec.seed + 1).to(device, dtype)
        self._scale = spec.dim**0.5
        # [a, 1] @ P_a^T == a @ W + b: no copy of the input to append the bias column
        self._w_a = None if self.p_a is None else self.p_a[:, :-1].T.contiguous()
        self._b_a = None if self.p_a is None else self.p_a[:, -1].contiguous()

    def project_inputs(self, a: torch.Tensor) -> torch.Tensor:
        """a: [..., d_in - 1] layer input -> [..., k_a] (bias column of ones appended first)."""
        a = a.to(self.dtype)
        if self.p_a is None:
            return torch.cat([a, a.new_ones(a.shape[:-1] + (1,))], dim=-1)
        return torch.addmm(self._b_a, a, self._w_a) if a.dim() == 2 else a @ self._w_a + self._b_a

    def project_output_grads(self, ds: torch.Tensor) -> torch.Tensor:
        """ds: [..., d_out] gradient w.r.t. the layer output -> [..., k_s]."""
        ds = ds.to(self.dtype)
        return ds if self.p_s is None else ds @ self.p_s.T

    def per_sample(self, a: torch.Tensor, ds: torch.Tensor) -> torch.Tensor:
        """Per-sample projected weight gradients.

        a: [B, d] or [B, S, d]; ds: [B, d_out] or [B, S, d_out] -> [B, k_s * k_a] (tokens summed).
        """
        pa, ps = self.project_inputs(a), self.project_output_grads(ds)
        if pa.dim() not in (2, 3):
            raise ValueError(f"layer input must be [B, d] or [B, S, d], got shape {tuple(a.shape)}")
        if self.elementwise:
            g = pa * ps
            return self._scale * (g if g.dim() == 2 else g.sum(1))
        g = ps[:, :, None] * pa[:, None, :] if pa.dim() == 2 else torch.bmm(ps.transpose(1, 2), pa)
        return g.reshape(g.shape[0], -1)

    def project_matrix(self, grad_w: torch.Tensor) -> torch.Tensor:
        """A full [d_out, d_in] (bias included) gradient -> flattened projected [k_s * k_a]."""
        g = grad_w.to(self.dtype)
        if self.elementwise:  # sqrt(k) diag(P_s G P_a^T)
            return self._scale * ((self.p_s @ g) * self.p_a).sum(1)
        if self.p_s is not None:
            g = self.p_s @ g
        if self.p_a is not None:
            g = g @ self.p_a.T
        return g.reshape(-1)
