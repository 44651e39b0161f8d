"""Captured per-sample projected gradients == torch.func per-sample gradients, projected explicitly."""

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.nn import functional as F

from dvemb.capture.hooks import GradientCapture, loss_weight
from dvemb.errors import CaptureError, NonFiniteGradientError
from dvemb.models import GPT, MLP, GPTConfig, MLPConfig
from dvemb.types import ProjectionConfig


@pytest.fixture(autouse=True)
def float64_default():
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


def per_sample_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """[B] losses: CE per sample (mean over tokens for sequences)."""
    logits = model(x)
    if logits.dim() == 3:
        return F.cross_entropy(logits.transpose(1, 2), y, reduction="none").mean(dim=1)
    return F.cross_entropy(logits, y, reduction="none")


def reference_grads(model, cap, x, y, weight):
    """w * grad l_z via torch.func, each layer's [d_out, d_in | bias] projected explicitly."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss_one(p, xi, yi):
        return per_sample_loss(lambda inp: functional_call(model, p, (inp,)), xi[None], yi[None])[0]

    g = vmap(grad(loss_one), in_dims=(None, 0, 0))(params, x, y)
    out = {}
    for name, proj in cap.projectors.items():
        full = torch.cat([g[f"{name}.weight"], g[f"{name}.bias"][:, :, None]], dim=2)
        out[name] = weight * torch.stack([proj.project_matrix(m) for m in full])
    return out


def make_mlp():
    torch.manual_seed(0)
    model = MLP(MLPConfig(d_in=12, hidden=(10, 8), n_classes=5))
    x, y = torch.randn(6, 12), torch.randint(0, 5, (6,))
    return model, x, y


def make_gpt():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=23, block_size=7, n_layer=1, n_head=2, n_embd=8))
    x, y = torch.randint(0, 23, (6, 7)), torch.randint(0, 23, (6, 7))
    return model, x, y


@pytest.mark.parametrize("make", [make_mlp, make_gpt], ids=["mlp", "gpt"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("accumulation", [1, 2])
@pytest.mark.parametrize(
    "k", [(4, 3, "kronecker"), (None, None, "kronecker"), (4, 3, "elementwise")], ids=["projected", "exact", "sketch"]
)
def test_capture_matches_torch_func(make, reduction, accumulation, k):
    """Hooks == the projection of torch.func's full per-sample gradient (elementwise: sqrt(k) diag(P_s G P_a^T))."""
    model, x, y = make()
    cap = GradientCapture(model, ProjectionConfig(k_a=k[0], k_s=k[1], seed=3, dtype="float64", kind=k[2]))
    n = len(x) // accumulation
    for i in range(accumulation):
        xs, ys, ids = x[i * n : (i + 1) * n], y[i * n : (i + 1) * n], torch.arange(i * n, (i + 1) * n)
        w = loss_weight(reduction, n, accumulation)
        with cap.micro_batch(ids, weight=w):
            losses = per_sample_loss(model, xs, ys)
            loss = losses.mean() if reduction == "mean" else losses.sum()
            (loss / accumulation).backward()
    rec = cap.collect(step=0)
    assert rec.sample_ids.tolist() == list(range(len(x)))
    w = loss_weight(reduction, n, accumulation)
    assert torch.allclose(rec.weights, torch.full((len(x),), w))
    ref = reference_grads(model, cap, x, y, w)
    assert set(rec.grads) == set(ref)
    for name in ref:
        assert rec.grads[name].shape == (len(x), cap.specs[name].dim)
        torch.testing.assert_close(rec.grads[name], ref[name], rtol=1e-6, atol=1e-12)


def test_elementwise_sketch_preserves_inner_products_in_expectation():
    """E over projection seeds of <sketch(G), sketch(G')> == <G, G'> (unbiased), within 4 standard errors."""
    from dvemb.capture.projection import LayerProjection, Projector

    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(7, 12, generator=gen), torch.randn(7, 12, generator=gen)
    b = b + 0.5 * a  # correlated, so the target is far from 0
    est = torch.stack(
        [
            (p.project_matrix(a) * p.project_matrix(b)).sum()
            for p in (
                Projector(LayerProjection(12, 7, 4, 4, seed, "elementwise"), torch.float64) for seed in range(400)
            )
        ]
    )
    true = (a * b).sum()
    se = est.std() / len(est) ** 0.5
    assert abs(est.mean() - true) < 4 * se, (float(est.mean()), float(true), float(se))
    assert se < 0.2 * abs(true)  # the test has power: the estimate is not just noise


def test_elementwise_needs_both_sizes():
    model, _, _ = make_mlp()
    with pytest.raises(ValueError, match="elementwise"):
        GradientCapture(model, ProjectionConfig(k_a=None, k_s=4, kind="elementwise"))


def test_amp_loss_scale_is_divided_out():
    model, x, y = make_mlp()
    cap = GradientCapture(model, ProjectionConfig(k_a=4, k_s=3, dtype="float64"))
    with cap.micro_batch(torch.arange(6), weight=1 / 6):
        per_sample_loss(model, x, y).mean().backward()
    plain = cap.collect(0)
    with cap.micro_batch(torch.arange(6), weight=1 / 6, loss_scale=1024.0):
        (per_sample_loss(model, x, y).mean() * 1024.0).backward()
    scaled = cap.collect(1)
    for name in plain.grads:
        torch.testing.assert_close(scaled.grads[name], plain.grads[name], rtol=1e-12, atol=0)


def test_unprojected_sum_equals_autograd_gradient():
    """Sum over samples of captured exact gradients == the parameter .grad autograd computes."""
    model, x, y = make_gpt()
    cap = GradientCapture(model, ProjectionConfig(k_a=None, k_s=None, dtype="float64"))
    with cap.micro_batch(torch.arange(6), weight=1 / 6):
        per_sample_loss(model, x, y).mean().backward()
    rec = cap.collect(0)
    for name, lin in cap.tracked.items():
        full = torch.cat([lin.weight.grad, lin.bias.grad[:, None]], dim=1).reshape(-1)
        torch.testing.assert_close(rec.grads[name].sum(0), full, rtol=1e-10, atol=1e-14)


def test_layer_selection_and_unsupported_module():
    model, _, _ = make_gpt()
    cap = GradientCapture(model, layers="blocks.0.c_*")
    assert sorted(cap.tracked) == ["blocks.0.c_fc", "blocks.0.c_proj"]
    assert sorted(GradientCapture(model, layers=["blocks.0.ln_1"]).tracked) == ["blocks.0.ln_1"]  # norms are a kind
    with pytest.raises(CaptureError, match=r"'1' is a BatchNorm1d"):  # couples the samples of a batch
        GradientCapture(nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)), layers=["1"])
    with pytest.raises(CaptureError, match=r"'nope': no such module"):
        GradientCapture(model, layers=["nope"])


def test_non_finite_gradient_names_step_layer_and_sample():
    model, x, y = make_mlp()
    cap = GradientCapture(model, ProjectionConfig(k_a=4, k_s=3, dtype="float64"))
    x = x.clone()
    x[2, 0] = float("nan")
    with cap.micro_batch(torch.arange(10, 16), weight=1 / 6):
        per_sample_loss(model, x, y).mean().backward()
    with pytest.raises(NonFiniteGradientError, match=r"step 7, layer 'layers\.\d'.*first sample_id 12"):
        cap.collect(step=7)
