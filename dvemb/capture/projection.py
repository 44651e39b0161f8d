"""Seeded projections of per-sample layer gradients (Gaussian sketches or coordinate subsamples).

Every captured layer's per-sample gradient is a matrix ``G`` of shape [d_out, d_in] (see
:mod:`dvemb.capture.layers`): for a Linear layer ``G = sum_tokens ds a^T`` with ``ds`` the gradient
w.r.t. the output (the *s side*) and ``a`` the input (the *a side*, with a bias column of ones
appended when the layer has a bias). Two ways to compress it:

* ``kronecker`` (default): ``sum_tokens (P_s ds)(P_a a)^T = P_s G P_a^T`` of shape [k_s, k_a],
  flattened row-major; a side whose k >= d uses the identity (exact).
* ``elementwise`` (a tensor sketch, what dattri calls "elementwise"): k = k_a * k_s coordinates
  ``sqrt(k) * sum_tokens (P_s ds) * (P_a a) = sqrt(k) * diag(P_s G P_a^T)`` with P_a: [k, d_in],
  P_s: [k, d_out]. Inner products are unbiased, E<g, g'> = <G, G'>, and for the same number of
  dimensions the variance is lower than a Kronecker sketch's when the budget is small.
* ``subsample``: the Kronecker form with 0/1 selection matrices: G at k_s fixed rows x k_a fixed
  columns (one column set shared by every row).
* ``rowwise``: G at k_s fixed rows, each kept row with its OWN k_a columns (:attr:`Projector.cols`
  [k_s, k_a]): ``g[i, j] = G[row_i, cols[i, j]] = sum_tokens ds[row_i] a[cols[i, j]]``, flattened
  row-major. The a side is not projected; each row gathers its columns from ``sum_tokens ds a^T``.

A side given as integer ids (an embedding's one-hot input) is projected by gathering columns of P,
``P e_id = P[:, id]``, so no [B, S, vocab] one-hot is ever formed. ``P`` entries are N(0, 1/rows),
drawn from a recorded per-layer seed.
"""

from __future__ import annotations

import zlib

import torch

from dvemb.errors import CaptureError
from dvemb.types import LayerProjection, draw, row_columns

# projections are computed in this dtype; float16 / bfloat16 are storage dtypes (computed in float32,
# rounded by the gradient store when written)
DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float32, "bfloat16": torch.float32}


def layer_seed(base_seed: int, layer: str) -> int:
    """Stable per-layer seed (independent of Python's hash randomisation)."""
    return (base_seed * 1_000_003 + zlib.crc32(layer.encode())) % (2**31)


def _transposed(p: torch.Tensor, device: torch.device | str, dtype: torch.dtype) -> torch.Tensor:
    return p.T.to(device, dtype).contiguous()


def _ids(t: torch.Tensor) -> bool:
    return not (t.is_floating_point() or t.is_complex())


class Projector:
    """Applies a LayerProjection to the two sides of a layer's gradient, on a device and dtype."""

    def __init__(
        self,
        spec: LayerProjection,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ):
        self.spec = spec
        self.dtype = dtype
        self.elementwise = spec.kind == "elementwise"
        self.rowwise = spec.kind == "rowwise"
        # kronecker: P_a [k_a, d_in], P_s [k_s, d_out]; elementwise: both k = k_a * k_s rows; None = identity.
        # Stored transposed and contiguous ([d, k]): a row per input feature / vocabulary id.
        # rowwise: no P_a; the per-row column table [rows, k_a] instead (None = every row keeps all columns).
        rows_a, rows_s = (spec.dim, spec.dim) if self.elementwise else (spec.k_a, spec.k_s)
        p_a = None if spec.identity_a or self.rowwise else draw(spec.kind, rows_a, spec.d_in, spec.seed)
        p_s = None if spec.identity_s else draw(spec.kind, rows_s, spec.d_out, spec.seed + 1)
        self._at = None if p_a is None else _transposed(p_a, device, dtype)
        self._st = None if p_s is None else _transposed(p_s, device, dtype)
        self._cols = None
        self._rows = None if p_s is None or not self.rowwise else p_s.argmax(1).to(device)  # kept rows of G
        if self.rowwise and not spec.identity_a:
            self._cols = row_columns(spec.shape[0], spec.k_a, spec.d_in, spec.seed).to(device)
        self._scale = spec.dim**0.5
        self._nb = 1 if spec.bias else 0

    @property
    def p_a(self) -> torch.Tensor | None:
        """P_a [rows, d_in] (None = identity). A rowwise projection with its own columns per row has no
        P_a: CaptureError (use :attr:`cols` or :meth:`project_matrices`)."""
        if self._cols is not None:
            raise CaptureError(
                f"{self.spec.layer} layer ({self.spec.d_out}x{self.spec.d_in}): a rowwise projection has no "
                "P_a matrix (each kept row has its own columns, Projector.cols); use project_matrices"
            )
        return None if self._at is None else self._at.T

    @property
    def cols(self) -> torch.Tensor | None:
        """rowwise: [rows, k_a] int64, the columns of G kept for each stored row (ascending; stored
        coordinate (i, j) = G[row_i, cols[i, j]]); None for the other kinds and where every row keeps
        all d_in columns (k_a >= d_in)."""
        return self._cols

    @property
    def rows(self) -> torch.Tensor | None:
        """rowwise: [k_s] int64, the rows of G kept (ascending; stored row i is G[rows[i]]); None for the
        other kinds and where every row is kept (k_s >= d_out)."""
        return self._rows

    @property
    def p_s(self) -> torch.Tensor | None:
        """P_s [rows, d_out] (None = identity)."""
        return None if self._st is None else self._st.T

    # --- the two sides -------------------------------------------------------------------
    def project_inputs(self, a: torch.Tensor) -> torch.Tensor:
        """a: [..., d_in - bias] a-side factor -> [..., k_a] (the bias column of ones appended first)."""
        a = a.to(self.dtype)
        if self._at is None:
            return torch.cat([a, a.new_ones(a.shape[:-1] + (1,))], dim=-1) if self._nb else a
        if not self._nb:
            return a @ self._at
        w, b = self._at[:-1], self._at[-1]  # [a, 1] @ P_a^T == a @ W + b: no copy of the input
        return torch.addmm(b, a, w) if a.dim() == 2 else a @ w + b

    def project_output_grads(self, ds: torch.Tensor) -> torch.Tensor:
        """ds: [..., d_out] s-side factor -> [..., k_s]."""
        ds = ds.to(self.dtype)
        return ds if self._st is None else ds @ self._st

    def gather_inputs(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [...] into a one-hot a side (no bias) -> [..., k_a] = columns of P_a (a projected a side)."""
        if self._at is None:
            raise ValueError("gather_inputs: the a side is not projected (exact, or rowwise)")
        return self._at[ids]

    def gather_output_grads(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [...] into a one-hot s side -> [..., k_s] = columns of P_s."""
        return self._st[ids]

    # --- per-sample gradients --------------------------------------------------------------
    def combine(self, ps: torch.Tensor, pa: torch.Tensor) -> torch.Tensor:
        """Projected sides [B, k_s], [B, k_a] or [B, S, k_s], [B, S, k_a] -> [B, dim] (tokens summed).

        rowwise: pa is the whole a side [B, (S,) d_in] (bias column included); row i keeps its own
        columns: out[b, i, j] = sum_t ps[b, t, i] a[b, t, cols[i, j]].
        """
        if pa.dim() not in (2, 3):
            raise ValueError(f"projected factors must be [B, k] or [B, S, k], got shape {tuple(pa.shape)}")
        if self.elementwise:
            g = pa * ps
            return self._scale * (g if g.dim() == 2 else g.sum(1))
        if self._cols is not None:
            if pa.dim() == 2:  # [B, k_s, k_a]: a gathered per row, times that row's ds
                g = pa[:, self._cols] * ps[:, :, None]
            else:  # sum_t ps a^T [B, k_s, d_in], then each row's own columns
                g = self._gather_cols(torch.bmm(ps.transpose(1, 2), pa))
            return g.reshape(g.shape[0], -1)
        g = ps[:, :, None] * pa[:, None, :] if pa.dim() == 2 else torch.bmm(ps.transpose(1, 2), pa)
        return g.reshape(g.shape[0], -1)

    def per_sample(self, a: torch.Tensor, ds: torch.Tensor) -> torch.Tensor:
        """Per-sample projected gradients of a Linear-shaped layer from dense factors.

        a: [B, d] or [B, S, d] (no bias column); ds: [B, d_out] or [B, S, d_out] -> [B, dim] (tokens summed).
        """
        if a.dim() not in (2, 3):
            raise ValueError(f"layer input must be [B, d] or [B, S, d], got shape {tuple(a.shape)}")
        return self.combine(self.project_output_grads(ds), self.project_inputs(a))

    def per_sample_factors(self, s: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """Per-sample projected ``sum_tokens s a^T``; either side may be integer ids (a one-hot side).

        s: [B, S, d_out] or ids [B, S]; a: [B, S, d_in - bias] or ids [B, S] -> [B, dim].
        An exact (identity) one-hot side is a scatter-add into its id columns, never a dense one-hot.
        """
        s_ids, a_ids = _ids(s), _ids(a)
        if s_ids and a_ids:
            raise ValueError("at most one side of a layer gradient can be ids")
        if a_ids and self._nb:
            raise ValueError("a one-hot (ids) input side cannot carry a bias column")
        if self._cols is not None and a_ids:
            return self._rowwise_id_inputs(self.project_output_grads(s), a)
        if self._cols is not None and s_ids and self._st is None:  # exact rows: G[id, cols[id]] += a[cols[id]]
            pa = self.project_inputs(a)  # [B, S, d_in]
            rows = pa.gather(2, self._cols[s])  # [B, S, k_a]: each token's a at its row's columns
            out = pa.new_zeros(pa.shape[0], self.spec.d_out, self._cols.shape[1])
            out.scatter_add_(1, s[:, :, None].expand(-1, -1, rows.shape[2]), rows)
            return out.reshape(out.shape[0], -1)
        if a_ids and self._at is None:  # exact: G[:, id] += ps
            ps = self.project_output_grads(s)  # [B, S, k_s]
            out = ps.new_zeros(ps.shape[0], ps.shape[2], self.spec.d_in)
            out.scatter_add_(2, a[:, None, :].expand(-1, ps.shape[2], -1), ps.transpose(1, 2))
            return out.reshape(out.shape[0], -1)
        if s_ids and self._st is None:  # exact: G[id, :] += pa
            pa = self.project_inputs(a)  # [B, S, k_a]
            out = pa.new_zeros(pa.shape[0], self.spec.d_out, pa.shape[2])
            out.scatter_add_(1, s[:, :, None].expand(-1, -1, pa.shape[2]), pa)
            return out.reshape(out.shape[0], -1)
        ps = self.gather_output_grads(s) if s_ids else self.project_output_grads(s)
        pa = self.gather_inputs(a) if a_ids else self.project_inputs(a)
        return self.combine(ps, pa)

    def _gather_cols(self, g: torch.Tensor) -> torch.Tensor:
        """[..., rows, d_in] -> [..., rows, k_a]: row i at its own columns cols[i]."""
        return g.gather(-1, self._cols.expand(*g.shape[:-2], *self._cols.shape))

    def _rowwise_id_inputs(self, ps: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """rowwise with a one-hot a side: g[b, i, j] = sum_t ps[b, t, i] [ids[b, t] == cols[i, j]].

        ps [B, S, rows], ids [B, S] -> [B, rows * k_a]. Each id is looked up in every row's (sorted)
        column list; memory O(B S rows), no one-hot over the vocabulary.
        """
        cols = self._cols
        n_rows, k = cols.shape
        b, t = ids.shape
        flat = ids.reshape(1, -1).to(torch.int64).expand(n_rows, -1).contiguous()  # [rows, B*S]
        pos = torch.searchsorted(cols, flat).clamp_(max=k - 1)
        hit = cols.gather(1, pos) == flat  # [rows, B*S]: the id is one of row i's columns, at pos
        index = (torch.arange(n_rows, device=cols.device)[:, None] * k + pos).T.reshape(b, t * n_rows)
        vals = (ps * hit.T.reshape(b, t, n_rows).to(ps.dtype)).reshape(b, t * n_rows)
        out = ps.new_zeros(b, n_rows * k)
        return out.scatter_add_(1, index, vals)

    def project_matrices(self, grad_w: torch.Tensor) -> torch.Tensor:
        """Full [..., d_out, d_in] gradients (bias column included) -> flattened projected [..., dim]
        (rowwise: the kept rows, then each row's own columns, G[row_i, cols[i, j]])."""
        g = grad_w.to(self.dtype)
        if self.elementwise:  # sqrt(k) diag(P_s G P_a^T)
            return self._scale * ((g @ self._at) * self._st).sum(-2)
        if self._cols is not None:
            if self._st is not None:
                g = g.index_select(-2, self._rows)
            return self._gather_cols(g).flatten(-2)
        if self._st is not None:
            g = self._st.T @ g
        if self._at is not None:
            g = g @ self._at
        return g.flatten(-2)

    def project_matrix(self, grad_w: torch.Tensor) -> torch.Tensor:
        """A full [d_out, d_in] (bias included) gradient -> flattened projected [dim]."""
        return self.project_matrices(grad_w)
