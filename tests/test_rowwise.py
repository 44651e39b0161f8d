"""The ``rowwise`` projection: G at k_s fixed rows, each kept row with its own k_a columns.

Reference: torch.func per-sample parameter gradients (vmap(grad)), laid out as G [B, d_out, d_in] per
module type *in this file*, and gathered at (row_i, cols[i, j]) by plain advanced indexing; fp64, 1e-10.
"""

import pytest
import torch
from test_layers import TinyLM, captured_batch, float64_default, per_sample_loss, repeated_ids  # noqa: F401 (autouse fixture)
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.nn import functional as F
from transformers.pytorch_utils import Conv1D

from dvemb.capture.fisher import fisher_vectors
from dvemb.capture.hooks import GradientCapture
from dvemb.capture.projection import Projector
from dvemb.errors import CaptureError
from dvemb.store.trajectory import stored_groups
from dvemb.types import LayerProjection, ProjectionConfig, row_columns, selection

ATOL = 1e-10
K = [(3, 2), (3, None)]  # (k_a, k_s): both sides subsampled; every row kept (exact s side)
K_IDS = ["ka3-ks2", "ka3-allrows"]


def layout(module: nn.Module, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """G [B, d_out, d_in] (bias last column) from per-sample weight / bias gradients."""
    if isinstance(module, (nn.Embedding, Conv1D)):
        m = w.transpose(1, 2)
    elif isinstance(module, nn.Conv2d):
        m = w.flatten(2)
    elif isinstance(module, nn.LayerNorm):
        return torch.stack([t for t in (w, b) if t is not None], dim=-1)
    else:
        m = w
    return m if b is None else torch.cat([m, b[:, :, None]], dim=2)


def kept(proj: Projector) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows [R], cols [R, k]) of G a rowwise projection keeps, from the spec alone."""
    s = proj.spec
    rows = torch.arange(s.d_out) if s.identity_s else selection(s.k_s, s.d_out, s.seed + 1).argmax(1)
    return rows, row_columns(len(rows), s.k_a, s.d_in, s.seed)


def capture_and_check(model, x, layers, k, expect=None):
    """One mean-reduced micro-batch through the real hooks; every block == torch.func's G gathered."""
    cfg = ProjectionConfig(k_a=k[0], k_s=k[1], seed=5, dtype="float64", kind="rowwise")
    cap, rec, target = captured_batch(model, x, layers, cfg, expect)
    n = len(x)
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss_one(p, xi, ti):
        return per_sample_loss(functional_call(model, p, (xi[None],)), ti[None])[0]

    g = vmap(grad(loss_one), in_dims=(None, 0, 0))(params, x, target)
    names = {id(p): n for n, p in model.named_parameters()}
    for block, members in cap.blocks.items():
        mod = members[0].module
        bias = getattr(mod, "bias", None)
        full = layout(mod, g[names[id(mod.weight)]], None if bias is None else g[names[id(bias)]])
        proj = cap.projectors[block].projector
        rows, cols = kept(proj)
        want = full[:, rows[:, None], cols].flatten(1) / n  # [B, R * k]: G[row_i, cols[i, j]]
        assert rec.grads[block].shape == want.shape == (n, cap.specs[block].dim)
        torch.testing.assert_close(rec.grads[block], want, rtol=0, atol=ATOL, msg=lambda m, b=block: f"{b}: {m}")
        if proj.cols is not None:
            assert torch.equal(proj.cols, cols)
            torch.testing.assert_close(proj.project_matrices(full), want * n, rtol=0, atol=ATOL)
    return cap


@pytest.mark.parametrize("k", K, ids=K_IDS)
@pytest.mark.parametrize("shape", [(4, 5), (4, 3, 5)], ids=["BD", "BSD"])
def test_linear_with_and_without_bias(k, shape):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3, bias=False))
    cap = capture_and_check(model, torch.randn(shape), None, k, expect=["0", "2"])
    assert cap.specs["0"].shape == (4 if k[1] is None else 2, 3) and cap.specs["0"].kind == "rowwise"
    cols = cap.projectors["0"].projector.cols
    assert len({tuple(c) for c in cols.tolist()}) > 1  # the rows do not share one column set


@pytest.mark.parametrize("k", K, ids=K_IDS)
def test_hf_conv1d(k):
    torch.manual_seed(0)
    model = nn.Sequential(Conv1D(4, 5), nn.Tanh(), Conv1D(3, 4))
    capture_and_check(model, torch.randn(4, 3, 5), ["hf_conv1d"], k, expect=["0", "2"])


@pytest.mark.parametrize("k", K, ids=K_IDS)
def test_conv2d(k):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.Tanh(), nn.Conv2d(3, 2, (2, 3), padding="same", bias=False)
    )
    capture_and_check(model, torch.randn(3, 2, 7, 6), ["conv2d"], k, expect=["0", "2"])


@pytest.mark.parametrize("k", K, ids=K_IDS)
def test_layernorm(k):
    """A norm's G [d, 2] (weight, bias columns) goes through project_matrices."""
    torch.manual_seed(0)
    norm = nn.LayerNorm(4)
    with torch.no_grad():
        for p in norm.parameters():
            p.add_(0.3 * torch.randn_like(p))
    model = nn.Sequential(nn.Linear(3, 4), norm, nn.Linear(4, 2))
    capture_and_check(model, torch.randn(4, 3, 3), ["layernorm"], k, expect=["1"])


@pytest.mark.parametrize("k", [(5, 2), (5, None)], ids=["ka5-ks2", "ka5-allrows"])
@pytest.mark.parametrize("padding_idx", [None, 0], ids=["nopad", "pad0"])
def test_embedding_ids_side(k, padding_idx):
    """Ids on the a side (embedding first), on the s side (a tied head first), and a dense swapped partner."""
    torch.manual_seed(0)
    cap = capture_and_check(TinyLM(padding_idx=padding_idx), repeated_ids(), ["embedding", "linear"], k)
    assert cap.specs["emb"].shape[1] == 5 and cap.specs["emb"].d_in == 11
    for layers, first in ((None, "head"), (["embedding", "linear"], "emb")):
        torch.manual_seed(0)
        cap = capture_and_check(TinyLM(tied=True, padding_idx=padding_idx), repeated_ids(), layers, k)
        assert {m.name for m in cap.blocks[first]} == {"emb", "head"}


def test_identity_a_is_subsample():
    """k_a >= d_in: every row keeps all its columns, exactly subsample's vectors."""
    torch.manual_seed(0)
    model = TinyLM()
    ids = repeated_ids()
    got = {}
    for kind in ("rowwise", "subsample"):
        cap = GradientCapture(model, ProjectionConfig(k_a=None, k_s=2, seed=3, dtype="float64", kind=kind), "*")
        with cap.micro_batch(torch.arange(4), weight=0.25):
            model(ids).square().mean().backward()
        got[kind] = cap.collect(0).grads
        cap.remove()
        assert all(s.identity_a for s in cap.specs.values())
        assert all(p.projector.cols is None and p.projector.p_a is None for p in cap.projectors.values())
    for name, g in got["rowwise"].items():
        assert torch.equal(g, got["subsample"][name]), name


def test_fisher_vectors():
    """Curvature vectors (vmapped backward to the layer outputs) gathered like the gradients."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    cap = GradientCapture(model, ProjectionConfig(k_a=2, k_s=3, dtype="float64", kind="rowwise"))
    x = torch.randn(4, 6)
    rec = fisher_vectors(model, cap, x, weights=0.25, mode="fisher")
    params = {k: v.detach() for k, v in model.named_parameters()}
    for z in range(4):
        for c in range(3):

            def ce(p, z=z, c=c):
                return F.cross_entropy(functional_call(model, p, (x[z : z + 1],)), torch.tensor([c]))

            gz = grad(ce)(params)
            for name in ("0", "2"):
                full = torch.cat([gz[f"{name}.weight"], gz[f"{name}.bias"][:, None]], 1)
                rows, cols = kept(cap.projectors[name].projector)
                want = full[rows[:, None], cols].flatten()
                torch.testing.assert_close(rec.grads[name][3 * z + c], want, rtol=0, atol=ATOL)


# --- the column table, project_matrices, param groups, json -----------------------------------------
SPEC = LayerProjection(d_in=9, d_out=7, k_a=4, k_s=5, seed=11, kind="rowwise", params=("l.weight", "l.bias"))


def test_column_table_distinct_sorted_deterministic():
    cols = row_columns(5, 4, 9, 11)
    assert cols.shape == (5, 4) and cols.dtype == torch.int64
    assert bool((cols[:, 1:] > cols[:, :-1]).all()) and int(cols.min()) >= 0 and int(cols.max()) < 9
    assert len({tuple(c) for c in cols.tolist()}) > 1
    assert torch.equal(cols, row_columns(5, 4, 9, 11)) and not torch.equal(cols, row_columns(5, 4, 9, 12))
    assert torch.equal(Projector(SPEC, torch.float64).cols, cols)
    assert torch.equal(Projector(SPEC, torch.float32).cols, Projector(SPEC, torch.float64).cols)
    assert torch.equal(row_columns(3, 9, 9, 0), torch.arange(9).expand(3, 9))
    assert SPEC.shape == (5, 4) and SPEC.dim == 20 and not SPEC.identity_a and not SPEC.identity_s


def test_project_matrices_is_the_gather():
    proj = Projector(SPEC, torch.float64)
    g = torch.randn(3, 2, 7, 9)
    rows = selection(5, 7, SPEC.seed + 1).argmax(1)
    assert torch.equal(proj.rows, rows)
    want = torch.stack([g[..., int(r), proj.cols[i]] for i, r in enumerate(rows)], dim=-2).flatten(-2)
    assert torch.equal(proj.project_matrices(g), want)
    assert torch.equal(proj.project_matrix(g[0, 0]), want[0, 0])
    with pytest.raises(CaptureError, match="rowwise projection has no P_a"):
        _ = proj.p_a
    assert proj.p_s.shape == (5, 7)  # the row selection, as for subsample


def test_stored_groups_mark_exactly_the_bias_coordinates():
    of = {"l.weight": 0, "l.bias": 1}
    got = stored_groups("l", SPEC, of, frozen=2)
    is_bias = (Projector(SPEC, torch.float64).cols == SPEC.d_in - 1).reshape(-1)
    assert got.shape == (SPEC.dim,) and got.dtype == torch.int64
    assert torch.equal(got, is_bias.to(torch.int64))
    # coordinate-wise against project_matrices of a bias-column indicator
    ind = torch.zeros(SPEC.d_out, SPEC.d_in)
    ind[:, -1] = 1.0
    assert torch.equal(got.to(torch.float64), Projector(SPEC, torch.float64).project_matrices(ind))
    assert 0 < int(got.sum()) < SPEC.k_s  # some rows keep the bias column, not all (seed 11)
    assert stored_groups("l", SPEC, {"l.weight": 1, "l.bias": 1}, frozen=2) == 1


def test_json_round_trip():
    assert LayerProjection.from_json(SPEC.to_json()) == SPEC
    assert SPEC.to_json()["kind"] == "rowwise"
    with pytest.raises(ValueError, match="rowwise"):
        LayerProjection(3, 3, 1, 1, 0, kind="rowwize")
