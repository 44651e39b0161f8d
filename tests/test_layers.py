"""Every layer kind's captured per-sample gradient == torch.func's, unprojected and projected, in fp64.

The reference is torch.func's per-sample parameter gradient (functional_call + grad, vmapped where the
model allows), laid out per kind *in this file* (independently of dvemb.capture.layers) and projected
explicitly: P_s G P_a^T (kronecker) or sqrt(k) diag(P_s G P_a^T) (elementwise sketch).
"""

import logging
import math

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, jacrev, vmap
from torch.nn import functional as F
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
from transformers.pytorch_utils import Conv1D

from dvemb.capture.hooks import GradientCapture, ProjectionConfig
from dvemb.errors import CaptureError

RTOL, ATOL = 1e-6, 1e-12
PROJECTIONS = [(None, None, "kronecker"), (3, 2, "kronecker"), (3, 2, "elementwise")]
PROJ_IDS = ["exact", "kronecker", "elementwise"]


@pytest.fixture(autouse=True)
def float64_default():
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


def per_sample_loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """[B] losses of any output [B, ...]: a quadratic + linear functional, so ds = out + target varies by sample."""
    return (0.5 * out**2 + out * target).flatten(1).sum(1)


def layout(module: nn.Module, g: dict[str, torch.Tensor], prefix: str) -> torch.Tensor:
    """The kind's G [B, d_out, d_in] from torch.func per-sample grads, written out per module type."""
    w, b = g[f"{prefix}weight"], g.get(f"{prefix}bias")
    if isinstance(module, nn.Embedding):
        m = w.transpose(1, 2)  # [B, d_emb, vocab]
    elif isinstance(module, Conv1D):
        m = w.transpose(1, 2)  # weight [d_in, d_out]
    elif isinstance(module, (nn.Conv1d, nn.Conv2d)):
        m = w.flatten(2)  # [B, C_out, C_in * kernel]
    elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or type(module).__name__ == "LlamaRMSNorm":
        return torch.stack([t.flatten(1) for t in (w, b) if t is not None], dim=-1)  # columns weight, bias
    else:
        m = w
    return m if b is None else torch.cat([m, b[:, :, None]], dim=2)


def project(cap: GradientCapture, name: str, g: torch.Tensor) -> torch.Tensor:
    """Explicit projection of G [B, d_out, d_in] with the capture's recorded matrices."""
    proj = cap.projectors[name].projector
    p_s = proj.p_s if proj.p_s is not None else torch.eye(g.shape[1])
    p_a = proj.p_a if proj.p_a is not None else torch.eye(g.shape[2])
    if cap.specs[name].kind == "elementwise":
        return math.sqrt(cap.specs[name].dim) * ((p_s @ g) * p_a).sum(-1)
    return (p_s @ g @ p_a.T).flatten(1)


def func_grads(model: nn.Module, x: torch.Tensor, target: torch.Tensor, vmapped: bool = True) -> dict:
    """Per-sample gradients of every parameter [B, ...] (tied parameters appear once, by their first name)."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss_one(p, xi, ti):
        return per_sample_loss(functional_call(model, p, (xi[None],)), ti[None])[0]

    if vmapped:
        return vmap(grad(loss_one), in_dims=(None, 0, 0))(params, x, target)
    # the Jacobian of the [B] losses of one batched forward (HF models: LlamaRMSNorm normalises in
    # float32, so a forward of one sample rounds differently from the batch's by ~1e-8 relative)
    return jacrev(lambda p: per_sample_loss(functional_call(model, p, (x,)), target))(params)


def captured_batch(model, x, layers, cfg: ProjectionConfig, expect=None):
    """One mean-reduced micro-batch through the real hooks: (capture, its StepGrads record, the loss target)."""
    torch.manual_seed(1)
    target = torch.randn(model(x).shape)
    cap = GradientCapture(model, cfg, layers)
    if expect is not None:
        assert list(cap.tracked) == expect
    n = len(x)
    with cap.micro_batch(torch.arange(n), weight=1 / n):
        per_sample_loss(model(x), target).mean().backward()
    return cap, cap.collect(step=0), target


def check(model, x, layers, k, vmapped=True, expect=None, atol_rel=0.0):
    """Capture one mean-reduced micro-batch and compare every block with torch.func; returns the capture.

    atol_rel: an absolute tolerance relative to the block's largest entry, for models that compute in float32.
    """
    cfg = ProjectionConfig(k_a=k[0], k_s=k[1], seed=5, dtype="float64", kind=k[2])
    cap, rec, target = captured_batch(model, x, layers, cfg, expect)
    n = len(x)
    g = func_grads(model, x, target, vmapped)
    names = {id(p): n for n, p in model.named_parameters()}
    for block, members in cap.blocks.items():
        first = members[0]
        prefix = names[id(first.module.weight)][: -len("weight")]
        full = layout(first.module, g, prefix)
        if names[id(first.module.weight)] != f"{first.name}.weight":  # a tied block: in the first module's layout
            full = layout(first.module, {f"{first.name}.weight": g[names[id(first.module.weight)]]}, f"{first.name}.")
        torch.testing.assert_close(cap.projectors[block].grad_matrix(g), full, rtol=0, atol=0)
        want = project(cap, block, full) / n
        assert rec.grads[block].shape == (n, cap.specs[block].dim)
        atol = max(ATOL, atol_rel * float(want.abs().max()))
        torch.testing.assert_close(rec.grads[block], want, rtol=RTOL, atol=atol, msg=lambda m, b=block: f"{b}: {m}")
        if k[0] is None:  # unprojected: the rows sum to the parameter gradient autograd accumulated
            own = first.module.named_parameters(recurse=False)
            total = layout(first.module, {f"{first.name}.{ln}": p.grad[None] for ln, p in own}, f"{first.name}.")
            torch.testing.assert_close(rec.grads[block].sum(0), total[0].flatten())
    return cap


# --- the kinds ---------------------------------------------------------------------------------
@pytest.mark.parametrize("k", PROJECTIONS, ids=PROJ_IDS)
@pytest.mark.parametrize("shape", [(4, 5), (4, 3, 5), (4, 2, 3, 5)], ids=["BD", "BSD", "BSSD"])
def test_linear_with_and_without_bias(k, shape):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3, bias=False))
    cap = check(model, torch.randn(shape), None, k, expect=["0", "2"])
    assert cap.specs["0"].bias and cap.specs["0"].d_in == 6
    assert not cap.specs["2"].bias and cap.specs["2"].d_in == 4  # no phantom bias column
    assert cap.specs["2"].params == ("2.weight",) and cap.specs["0"].params == ("0.weight", "0.bias")


@pytest.mark.parametrize("k", PROJECTIONS, ids=PROJ_IDS)
def test_hf_conv1d(k):
    torch.manual_seed(0)
    model = nn.Sequential(Conv1D(4, 5), nn.Tanh(), Conv1D(3, 4))
    cap = check(model, torch.randn(4, 3, 5), ["hf_conv1d"], k, expect=["0", "2"])
    assert (cap.specs["0"].d_in, cap.specs["0"].d_out) == (6, 4)


@pytest.mark.parametrize("k", PROJECTIONS, ids=PROJ_IDS)
def test_conv2d_stride_padding_dilation(k):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, stride=2, padding=1),
        nn.Tanh(),
        nn.Conv2d(3, 2, (2, 3), padding="same", dilation=(1, 2), padding_mode="reflect", bias=False),
        nn.Tanh(),
        nn.Conv2d(2, 2, 2, stride=(1, 2), padding=(1, 0)),
    )
    cap = check(model, torch.randn(3, 2, 7, 6), ["conv2d"], k, expect=["0", "2", "4"])
    assert (cap.specs["0"].d_in, cap.specs["2"].d_in) == (2 * 9 + 1, 3 * 6)


@pytest.mark.parametrize("k", PROJECTIONS, ids=PROJ_IDS)
def test_conv1d(k):
    torch.manual_seed(0)
    conv = nn.Conv1d(3, 2, 3, padding="same", dilation=2)
    model = nn.Sequential(nn.Conv1d(2, 3, 3, stride=2, padding=1), nn.Tanh(), conv)
    check(model, torch.randn(3, 2, 9), ["conv1d"], k, expect=["0", "2"])


class TinyLM(nn.Module):
    """ids [B, S] -> logits [B, S, V]: an embedding, a Linear, a head (tied to the embedding when ``tied``)."""

    def __init__(self, vocab=11, d=4, tied=False, padding_idx=None):
        super().__init__()
        self.emb = nn.Embedding(vocab, d, padding_idx=padding_idx)
        self.mid = nn.Linear(d, d)
        self.head = nn.Linear(d, vocab, bias=False)
        if tied:
            self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(torch.tanh(self.mid(self.emb(ids))))


def repeated_ids():
    ids = torch.randint(0, 11, (4, 6))
    ids[0, :3] = 7  # the same id three times in one sample
    ids[1] = 2  # a sample of one id
    ids[2, 1] = 0  # the padding id (when there is one)
    return ids


@pytest.mark.parametrize("k", PROJECTIONS, ids=PROJ_IDS)
@pytest.mark.parametrize("padding_idx", [None, 0], ids=["nopad", "pad0"])
def test_embedding_with_repeated_ids(k, padding_idx):
    torch.manual_seed(0)
    model = TinyLM(padding_idx=padding_idx)
    cap = check(model, repeated_ids(), ["embedding", "linear"], k, expect=["emb", "mid", "head"])
    assert (cap.specs["emb"].d_in, cap.specs["emb"].d_out, cap.specs["emb"].bias) == (11, 4, False)


@pytest.mark.parametrize("k", PROJECTIONS, ids=PROJ_IDS)
@pytest.mark.parametrize(
    "layers", [None, ["embedding", "linear"], ["head", "emb", "mid"]], ids=["default", "kinds", "names"]
)
def test_tied_embedding_and_head_are_one_block(k, layers):
    """The shared weight's gradient sums the embedding's and the head's contributions."""
    torch.manual_seed(0)
    model = TinyLM(tied=True)
    first = "head" if layers is None else "emb"
    cap = check(model, repeated_ids(), layers, k)
    assert set(cap.tracked) == {first, "mid"} and {m.name for m in cap.blocks[first]} == {"emb", "head"}
    assert cap.specs[first].params == ("emb.weight",)


@pytest.mark.parametrize("k", PROJECTIONS, ids=PROJ_IDS)
def test_layer_called_twice_sums_its_calls(k):
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            return self.lin(torch.tanh(self.lin(x)))

    torch.manual_seed(0)
    check(Twice(), torch.randn(3, 2, 4), None, k, expect=["lin"])


@pytest.mark.parametrize("k", PROJECTIONS, ids=PROJ_IDS)
@pytest.mark.parametrize(
    "norm",
    [lambda: nn.LayerNorm(4), lambda: nn.LayerNorm(4, bias=False), lambda: nn.RMSNorm(4), lambda: nn.RMSNorm([2, 4])],
    ids=["layernorm", "layernorm-nobias", "rmsnorm", "rmsnorm-2d"],
)
def test_norms(k, norm):
    torch.manual_seed(0)
    n = norm()
    with torch.no_grad():  # away from the initial ones / zeros, so every term matters
        for p in n.parameters():
            p.add_(0.3 * torch.randn_like(p))
    model = nn.Sequential(nn.Linear(4, 8), nn.Unflatten(-1, (2, 4)), n, nn.Flatten(-2), nn.Linear(8, 3))
    cap = check(model, torch.randn(4, 3, 4), ["linear", "layernorm", "rmsnorm"], k, expect=["0", "2", "4"])
    assert cap.specs["2"].layer in ("layernorm", "rmsnorm")


# --- real HuggingFace architectures (random init, no download) -------------------------------------
def gpt2():
    cfg = GPT2Config(vocab_size=23, n_positions=8, n_embd=8, n_layer=1, n_head=2, attn_implementation="eager")
    cfg.resid_pdrop = cfg.embd_pdrop = cfg.attn_pdrop = 0.0
    torch.manual_seed(0)
    return GPT2LMHeadModel(cfg).double()


class Logits(nn.Module):
    """An HF causal LM as ids -> logits."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, ids):
        return self.lm(input_ids=ids).logits


@pytest.mark.parametrize("k", PROJECTIONS, ids=PROJ_IDS)
def test_hf_gpt2_conv1d_tied_embedding_and_layernorm(k):
    model = Logits(gpt2())
    ids = torch.randint(0, 23, (3, 6))
    layers = ["hf_conv1d", "layernorm", "lm.transformer.wte", "lm.lm_head"]
    cap = check(model, ids, layers, k, vmapped=False)
    assert {m.name for m in cap.blocks["lm.transformer.wte"]} == {"lm.transformer.wte", "lm.lm_head"}
    assert sum(s.layer == "hf_conv1d" for s in cap.specs.values()) == 4


@pytest.mark.parametrize("k", PROJECTIONS, ids=PROJ_IDS)
def test_hf_llama_bias_free_linear_rmsnorm_tied(k):
    cfg = LlamaConfig(
        vocab_size=23,
        hidden_size=8,
        intermediate_size=12,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=16,
        tie_word_embeddings=True,
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    lm = LlamaForCausalLM(cfg).double()
    with torch.no_grad():
        for n, p in lm.named_parameters():
            if n.endswith("norm.weight"):
                p.add_(0.3 * torch.randn_like(p))
    # LlamaRMSNorm normalises in float32 even in a float64 model, so gradients upstream of a norm carry
    # float32 rounding (batched vs vmapped backward): 4 float32 epsilons of the block's scale
    eps32 = torch.finfo(torch.float32).eps
    ids = torch.randint(0, 23, (3, 6))
    cap = check(Logits(lm), ids, ["linear", "embedding", "rmsnorm"], k, vmapped=False, atol_rel=4 * eps32)
    assert {m.name for m in cap.blocks["lm.model.embed_tokens"]} == {"lm.model.embed_tokens", "lm.lm_head"}
    assert not any(s.bias for s in cap.specs.values())  # Llama's Linear layers have no bias
    assert cap.specs["lm.model.norm"].layer == "rmsnorm"


# --- selection and refusals ----------------------------------------------------------------------
class CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.Conv2d(2, 2, 3, groups=2))
        self.head = nn.Linear(2 * 4 * 4, 3)

    def forward(self, x):
        return self.head(self.features(x).flatten(1))


def test_selection_default_kinds_globs_and_names(caplog):
    model = CNN()
    assert list(GradientCapture(model).tracked) == ["head"]  # default: every nn.Linear, as before
    assert list(GradientCapture(model, layers=["conv2d:features.*", "linear"]).tracked) == ["features.0", "head"]
    with caplog.at_level(logging.WARNING, logger="dvemb.capture.layers"):
        cap = GradientCapture(model, layers="*")
    assert list(cap.tracked) == ["features.0", "head"]
    assert set(cap.skipped) == {"features.1", "features.3"}  # listed, with the reason, and logged
    assert "BatchNorm2d" in cap.skipped["features.1"] and "groups=2" in cap.skipped["features.3"]
    assert "features.1" in caplog.text and "features.3" in caplog.text
    with pytest.raises(CaptureError, match=r"'features.1' is a BatchNorm2d"):
        GradientCapture(model, layers=["features.1"])
    with pytest.raises(CaptureError, match=r"'features.3' is a Conv2d with groups=2"):
        GradientCapture(model, layers=["features.3"])
    with pytest.raises(CaptureError, match=r"no capturable layer matches"):
        GradientCapture(model, layers="embedding")
    model.head.requires_grad_(False)
    with pytest.raises(CaptureError, match=r"'head' \(Linear\) has no trainable parameter"):
        GradientCapture(model, layers=["head"])
    assert "frozen" in GradientCapture(model, layers="*").skipped["head"]


def test_embedding_with_batch_dependent_gradient_is_refused():
    with pytest.raises(CaptureError, match=r"'emb'.*scale_grad_by_freq"):
        GradientCapture(nn.ModuleDict({"emb": nn.Embedding(5, 2, scale_grad_by_freq=True)}), layers=["emb"])


def test_position_embedding_broadcast_over_the_batch_is_named():
    """GPT-2's wpe sees position ids [1, S]: its gradient is summed over the batch, so no per-sample gradient."""
    model = Logits(gpt2())
    cap = GradientCapture(model, ProjectionConfig(dtype="float64"), layers=["embedding"])
    ids = torch.randint(0, 23, (3, 6))
    match = r"'lm.transformer.wpe'.*broadcast over the batch"
    with pytest.raises(CaptureError, match=match), cap.micro_batch(torch.arange(3), weight=1 / 3):
        model(ids).sum().backward()


def test_projection_json_round_trip_keeps_the_layer_kind():
    from dvemb.capture.projection import LayerProjection

    cap = GradientCapture(TinyLM(tied=True), layers=["embedding", "linear"])
    for spec in cap.specs.values():
        assert LayerProjection.from_json(spec.to_json()) == spec
    old = {"d_in": 5, "d_out": 3, "k_a": 2, "k_s": 2, "seed": 1}  # a file from before the registry
    assert LayerProjection.from_json(old) == LayerProjection(5, 3, 2, 2, 1, "kronecker", "linear", True, ())


def test_curvature_style_calls_tell_tied_members_apart():
    """``projectors[block].per_sample(a, ds)`` without the member (as dvemb.embed.curvature calls it)."""
    torch.manual_seed(0)
    model = TinyLM(tied=True)
    cap = GradientCapture(model, ProjectionConfig(k_a=3, k_s=2, dtype="float64"), layers=["embedding", "linear"])
    ids = repeated_ids()
    seen: dict[str, tuple] = {}
    hooks = [
        m.register_forward_hook(lambda mod, inp, out, name=name: seen.__setitem__(name, (inp[0], out)))
        for name, m in (("emb", model.emb), ("head", model.head))
    ]
    logits = model(ids)
    for h in hooks:
        h.remove()
    target = torch.randn(logits.shape)
    ds = torch.autograd.grad(per_sample_loss(logits, target).sum(), [seen["emb"][1], seen["head"][1]])
    p = cap.projectors["emb"]
    total = p.per_sample(seen["emb"][0], ds[0]) + p.per_sample(seen["head"][0], ds[1])
    g = func_grads(model, ids, target)
    want = project(cap, "emb", g["emb.weight"].transpose(1, 2))
    torch.testing.assert_close(total, want, rtol=RTOL, atol=ATOL)


def test_fisher_vectors_of_a_tied_block_sum_both_modules():
    """dvemb.embed.curvature hooks every module of a block: f_{z,c} = grad CE(z, c) of the shared weight."""
    from dvemb.capture.fisher import fisher_vectors

    class TiedClassifier(TinyLM):  # one id per sample -> logits [B, V]
        def forward(self, ids):
            return self.head(torch.tanh(self.emb(ids)))

    torch.manual_seed(0)
    model = TiedClassifier(vocab=5, tied=True)
    cap = GradientCapture(model, ProjectionConfig(k_a=3, k_s=2, dtype="float64"), layers=["emb"])
    ids = torch.tensor([1, 3, 3])
    rec = fisher_vectors(model, cap, ids, weights=1 / 3, mode="fisher")
    params = {k: v.detach() for k, v in model.named_parameters()}
    for z in range(3):
        for c in range(5):

            def ce(p, z=z, c=c):
                return F.cross_entropy(functional_call(model, p, (ids[z : z + 1],)), torch.tensor([c]))

            want = project(cap, "emb", grad(ce)(params)["emb.weight"].T[None])[0]
            torch.testing.assert_close(rec.grads["emb"][5 * z + c], want, rtol=RTOL, atol=ATOL)
