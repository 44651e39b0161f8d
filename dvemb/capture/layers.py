"""The layer kinds capture understands, and which of a model's modules a ``layers`` spec selects.

Each kind states its per-sample weight gradient as a [d_out, d_in] matrix ``G`` (d_in counts a bias
column of ones where the layer has a bias, and only then) and how to get it from what a forward hook
sees (the layer input ``x``) and what autograd hands a tensor hook (``ds``, the gradient w.r.t. the
layer output), summed over tokens / spatial positions inside a sample:

=========== ======================================= ======================================= ================
kind        module                                  G [d_out, d_in]                         G vs W
=========== ======================================= ======================================= ================
linear      ``nn.Linear``                           sum ds [x, 1]^T                         W | b
hf_conv1d   ``transformers.pytorch_utils.Conv1D``   sum ds [x, 1]^T (a transposed Linear)   W^T | b
conv1d      ``nn.Conv1d`` (groups=1)                sum_pos ds unfold(x)^T                  W.flatten(1) | b
conv2d      ``nn.Conv2d`` (groups=1)                sum_pos ds unfold(x)^T                  W.flatten(1) | b
embedding   ``nn.Embedding``                        sum ds onehot(ids)^T (ids, never dense) W^T
layernorm   ``nn.LayerNorm`` (affine)               [sum ds*x_hat, sum ds]                  [w, b]
rmsnorm     ``nn.RMSNorm``, HF ``LlamaRMSNorm``     [sum ds*x_hat]                          [w]
=========== ======================================= ======================================= ================

Norm layers have an elementwise weight: their gradient is the vector ``sum ds * x_hat`` (and
``sum ds`` for the bias), not an outer product; it is kept as a [d, 1 or 2] matrix, so the
Kronecker projection is a plain k_s-dim Gaussian projection of each vector (exact on the
2-wide side) and the elementwise sketch applies unchanged.

Selection (``capture.layers``): ``None`` = every ``linear`` layer. Otherwise a string or a list of
entries, each one of: a kind name (every module of that kind), ``KIND:GLOB`` (modules of that kind
whose name matches), a glob (every matching module with parameters of its own, of any supported
kind), or an exact module name. A module asked for by name that cannot be captured is a
CaptureError naming it and its type; modules a glob matches but that cannot be captured are
returned in ``Selection.skipped`` (and logged), never silently dropped. Frozen modules (no
parameter requires grad) are skipped the same way.

Tied weights (a parameter shared by several modules, e.g. a GPT-2 ``lm_head`` and its token
embedding) are one captured block, named after the first selected module: its gradient is the
parameter's, i.e. the sum over every module that uses it (a partner module is added even when
not selected, and lined up by transposing its factors where its G is the other orientation).
"""

from __future__ import annotations

import fnmatch
import logging
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from dvemb.capture.projection import Projector
from dvemb.errors import CaptureError

log = logging.getLogger(__name__)


def _tokens(t: torch.Tensor, d: int | None = None) -> torch.Tensor:
    """[B, ..., d] -> [B, S, d] (S = every middle dim); [B, d] stays [B, d]; ids [B, ...] -> [B, S]."""
    if d is None:  # ids
        return t.reshape(t.shape[0], -1)
    return t if t.dim() == 2 else t.reshape(t.shape[0], -1, d)


class LayerKind:
    """How one kind of module's per-sample weight gradient is formed (see the module docstring)."""

    name: str = ""
    takes_ids = False  # the layer input is integer ids (a one-hot a side)
    transposed = False  # G is the weight transposed (lines up tied layers)
    vector = False  # elementwise weight (norms): G is built per sample, not from two factors

    def supports(self, module: nn.Module) -> bool:
        raise NotImplementedError

    def check(self, name: str, module: nn.Module) -> None:
        """Raise CaptureError naming the layer when this instance's configuration is not supported."""

    def dims(self, module: nn.Module) -> tuple[int, int, bool]:
        """(d_in including the bias column, d_out, has bias) of G."""
        raise NotImplementedError

    def factors(self, module: nn.Module, x: torch.Tensor, ds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(s side [B, S, d_out] or [B, d_out], a side [B, S, d_in - bias] or [B, d_in - bias] or ids [B, S])."""
        raise NotImplementedError

    def per_sample(
        self, proj: Projector, module: nn.Module, x: torch.Tensor, ds: torch.Tensor, swap: bool = False
    ) -> torch.Tensor:
        """Projected per-sample gradients [B, dim]; ``swap``: contribute G^T (a tied partner's orientation)."""
        s, a = self.factors(module, x, ds)
        if swap:
            s, a = a, s
        if not (self.takes_ids or swap):
            return proj.per_sample(a, s)
        if s.dim() == 2 and s.is_floating_point():
            s = s[:, None]
        if a.dim() == 2 and a.is_floating_point():
            a = a[:, None]
        return proj.per_sample_factors(s, a)

    def grad_matrix(self, module: nn.Module, grads: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """G [..., d_out, d_in] from the gradients of the module's own parameters (``weight``, ``bias``
        with any leading dims, e.g. torch.func per-sample gradients [B, ...])."""
        raise NotImplementedError


def _with_bias(gw: torch.Tensor, grads: Mapping[str, torch.Tensor]) -> torch.Tensor:
    gb = grads.get("bias")
    return gw if gb is None else torch.cat([gw, gb[..., None]], dim=-1)


class LinearKind(LayerKind):
    name = "linear"

    def supports(self, module: nn.Module) -> bool:
        return isinstance(module, nn.Linear)

    def dims(self, module: nn.Module) -> tuple[int, int, bool]:
        bias = module.bias is not None
        return module.in_features + bias, module.out_features, bias

    def factors(self, module, x, ds):
        return _tokens(ds, ds.shape[-1]), _tokens(x, x.shape[-1])

    def grad_matrix(self, module, grads):
        return _with_bias(grads["weight"], grads)


def _hf_conv1d() -> type | None:
    mod = sys.modules.get("transformers.pytorch_utils")  # only present when the model uses transformers
    return getattr(mod, "Conv1D", None)


class HFConv1DKind(LinearKind):
    """HuggingFace ``Conv1D`` (GPT-2): ``x @ W + b`` with W [d_in, d_out] — a transposed Linear."""

    name = "hf_conv1d"
    transposed = True

    def supports(self, module: nn.Module) -> bool:
        cls = _hf_conv1d()
        return cls is not None and isinstance(module, cls)

    def dims(self, module: nn.Module) -> tuple[int, int, bool]:
        bias = module.bias is not None
        return module.weight.shape[0] + bias, module.weight.shape[1], bias

    def grad_matrix(self, module, grads):
        return _with_bias(grads["weight"].transpose(-1, -2), grads)


class ConvKind(LayerKind):
    """``nn.Conv1d`` / ``nn.Conv2d`` with groups=1: the input unfolded into patches is a Linear's input,
    one token per output position."""

    cls: type[nn.Module] = nn.Conv2d

    def supports(self, module: nn.Module) -> bool:
        return type(module) is self.cls or (isinstance(module, self.cls) and type(module).forward is self.cls.forward)

    def check(self, name: str, module: nn.Module) -> None:
        if module.groups != 1:
            raise CaptureError(
                f"layer {name!r} is a {type(module).__name__} with groups={module.groups}; only groups=1 is supported"
            )

    def dims(self, module: nn.Module) -> tuple[int, int, bool]:
        bias = module.bias is not None
        return module.weight[0].numel() + bias, module.out_channels, bias

    def unfold(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """x [B, C, *spatial] -> patches [B, L, C * prod(kernel)] in the weight's (C, kernel) order."""
        one_d = self.cls is nn.Conv1d
        if one_d:
            x = x[:, :, None, :]
        pad = module.padding
        if isinstance(pad, str) or module.padding_mode != "zeros":
            mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
            pad_2d = module._reversed_padding_repeated_twice
            x = F.pad(x, (*pad_2d, 0, 0) if one_d else pad_2d, mode=mode)
            pad = 0
        if one_d:
            k, dil, st = (1, *module.kernel_size), (1, *module.dilation), (1, *module.stride)
            pad = (0, pad if isinstance(pad, int) else pad[0])
        else:
            k, dil, st = module.kernel_size, module.dilation, module.stride
        return F.unfold(x, k, dilation=dil, padding=pad, stride=st).transpose(1, 2)

    def factors(self, module, x, ds):
        return ds.flatten(2).transpose(1, 2), self.unfold(module, x)

    def grad_matrix(self, module, grads):
        gw = grads["weight"]
        return _with_bias(gw.flatten(gw.dim() - module.weight.dim() + 1), grads)


class Conv1dKind(ConvKind):
    name = "conv1d"
    cls = nn.Conv1d


class Conv2dKind(ConvKind):
    name = "conv2d"
    cls = nn.Conv2d


class EmbeddingKind(LayerKind):
    """``nn.Embedding``: G = sum ds onehot(ids)^T = W^T [d_emb, vocab]; the a side stays integer ids."""

    name = "embedding"
    takes_ids = True
    transposed = True

    def supports(self, module: nn.Module) -> bool:
        return isinstance(module, nn.Embedding)

    def check(self, name: str, module: nn.Module) -> None:
        if module.scale_grad_by_freq:
            raise CaptureError(
                f"layer {name!r}: an Embedding with scale_grad_by_freq=True has a batch-dependent gradient "
                "(divided by each id's count in the mini-batch); it has no per-sample gradient"
            )

    def dims(self, module: nn.Module) -> tuple[int, int, bool]:
        return module.num_embeddings, module.embedding_dim, False

    def factors(self, module, x, ds):
        ids = _tokens(x)
        ds = ds.reshape(ids.shape[0], ids.shape[1], -1)
        if module.padding_idx is not None:  # autograd gives the padding row no gradient
            ds = ds.masked_fill((ids == module.padding_idx)[..., None], 0.0)
        return ds, ids

    def grad_matrix(self, module, grads):
        return grads["weight"].transpose(-1, -2)


def _llama_rmsnorm() -> type | None:
    mod = sys.modules.get("transformers.models.llama.modeling_llama")
    return getattr(mod, "LlamaRMSNorm", None)


class NormKind(LayerKind):
    """Elementwise-affine norms: y = w * x_hat (+ b); G = [sum ds * x_hat (, sum ds)] as a [d, 1|2] matrix."""

    vector = True

    def dims(self, module: nn.Module) -> tuple[int, int, bool]:
        bias = getattr(module, "bias", None) is not None
        return 1 + bias, module.weight.numel(), bias

    def x_hat(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def per_sample(self, proj, module, x, ds, swap=False):
        d = module.weight.numel()
        xh = self.x_hat(module, x).reshape(x.shape[0], -1, d)
        ds = ds.reshape(x.shape[0], -1, d).to(proj.dtype)
        cols = [(ds * xh.to(proj.dtype)).sum(1)]
        if getattr(module, "bias", None) is not None:
            cols.append(ds.sum(1))
        return proj.project_matrices(torch.stack(cols, dim=-1))

    def grad_matrix(self, module, grads):
        gw = grads["weight"]
        lead = gw.shape[: gw.dim() - module.weight.dim()]
        cols = [gw.reshape(*lead, -1)] + ([grads["bias"].reshape(*lead, -1)] if "bias" in grads else [])
        return torch.stack(cols, dim=-1)


class LayerNormKind(NormKind):
    name = "layernorm"

    def supports(self, module: nn.Module) -> bool:
        return isinstance(module, nn.LayerNorm) and type(module).forward is nn.LayerNorm.forward

    def x_hat(self, module, x):
        return F.layer_norm(x, module.normalized_shape, None, None, module.eps)


class RMSNormKind(NormKind):
    name = "rmsnorm"

    def supports(self, module: nn.Module) -> bool:
        if isinstance(module, nn.RMSNorm) and type(module).forward is nn.RMSNorm.forward:
            return True
        llama = _llama_rmsnorm()
        return llama is not None and type(module) is llama

    def x_hat(self, module, x):
        if isinstance(module, nn.RMSNorm):
            return F.rms_norm(x, module.normalized_shape, None, module.eps)
        h = x.to(torch.float32)  # LlamaRMSNorm normalises in float32, then casts back
        return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + module.variance_epsilon)).to(x.dtype)


KINDS: dict[str, LayerKind] = {
    k.name: k
    for k in (
        LinearKind(),
        HFConv1DKind(),
        Conv1dKind(),
        Conv2dKind(),
        EmbeddingKind(),
        LayerNormKind(),
        RMSNormKind(),
    )
}
DEFAULT_KINDS = ("linear",)


def kind_of(module: nn.Module) -> LayerKind | None:
    """The registered kind of ``module`` (the most specific match), or None."""
    for kind in KINDS.values():
        if kind.supports(module):
            return kind
    return None


@dataclass(frozen=True)
class Member:
    """One module of a captured block; ``swap``: its G is the block's G transposed (a tied partner)."""

    name: str
    module: nn.Module
    kind: LayerKind
    swap: bool = False


@dataclass
class Selection:
    """Captured blocks (name -> modules, the named one first) and the modules left out (name -> why)."""

    blocks: dict[str, list[Member]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)


def _own_params(module: nn.Module) -> list[nn.Parameter]:
    return list(module.parameters(recurse=False))


def _parse(entry: str) -> tuple[str | None, str]:
    """(kind or None, name or glob)."""
    if entry in KINDS:
        return entry, "*"
    head, sep, tail = entry.partition(":")
    if sep and head in KINDS:
        return head, tail
    return None, entry


def select_layers(model: nn.Module, layers: Sequence[str] | str | None = None) -> Selection:
    """The modules a ``layers`` spec selects, grouped into blocks (see the module docstring).

    Raises CaptureError naming a module asked for by name that does not exist, cannot be captured
    or is frozen, tied weights that cannot be lined up, or a spec that selects nothing.
    """
    entries = list(DEFAULT_KINDS) if layers is None else [layers] if isinstance(layers, str) else list(layers)
    modules = dict(model.named_modules())
    chosen: dict[str, LayerKind] = {}
    skipped: dict[str, str] = {}
    for entry in entries:
        kind, pattern = _parse(entry)
        if kind is None and not any(c in pattern for c in "*?["):  # an exact module name
            if pattern not in modules:
                raise CaptureError(
                    f"layer {pattern!r}: no such module in the model (an entry is a module name, a glob, "
                    f"a layer kind ({', '.join(KINDS)}) or KIND:GLOB)"
                )
            chosen[pattern] = _capturable(pattern, modules[pattern])
            continue
        for name, m in modules.items():
            if not fnmatch.fnmatch(name, pattern) or not _own_params(m):
                continue
            k = kind_of(m)
            if kind is not None and (k is None or k.name != kind):
                continue
            if k is None:
                skipped[name] = f"{type(m).__name__}: not a supported layer kind"
            elif not any(p.requires_grad for p in _own_params(m)):
                skipped[name] = f"{type(m).__name__}: frozen (no parameter requires grad)"
            else:
                try:
                    k.check(name, m)
                except CaptureError as e:
                    skipped[name] = str(e)
                    continue
                chosen[name] = k
    if not chosen:
        raise CaptureError(f"no capturable layer matches {layers!r} (supported kinds: {', '.join(KINDS)})")
    skipped = {n: why for n, why in skipped.items() if n not in chosen}
    if skipped:
        log.warning(
            "capture: %d module(s) matched by %r are not captured: %s",
            len(skipped),
            layers,
            "; ".join(f"{n} ({why})" for n, why in skipped.items()),
        )
    order = {name: i for i, name in enumerate(modules)}
    return Selection(blocks=_tie(model, sorted(chosen, key=order.__getitem__), chosen, modules), skipped=skipped)


def _capturable(name: str, module: nn.Module) -> LayerKind:
    kind = kind_of(module)
    if kind is None:
        raise CaptureError(
            f"layer {name!r} is a {type(module).__name__}; capture supports {', '.join(KINDS)} "
            "(see docs/TASKS.md, 'Layers')"
        )
    if not any(p.requires_grad for p in _own_params(module)):
        raise CaptureError(f"layer {name!r} ({type(module).__name__}) has no trainable parameter")
    kind.check(name, module)
    return kind


def _tie(
    model: nn.Module, names: list[str], chosen: dict[str, LayerKind], modules: dict[str, nn.Module]
) -> dict[str, list[Member]]:
    """Group the chosen modules into blocks: modules sharing a parameter are one block (partners added)."""
    users: dict[int, list[str]] = {}
    for name, m in modules.items():
        for p in _own_params(m):
            users.setdefault(id(p), []).append(name)
    blocks: dict[str, list[Member]] = {}
    placed: set[str] = set()
    for name in names:
        if name in placed:
            continue
        group = [name] + [
            other for p in _own_params(modules[name]) for other in users[id(p)] if other != name and other not in placed
        ]
        group = list(dict.fromkeys(group))
        placed.update(group)
        first = chosen[name]
        if len(group) == 1:
            blocks[name] = [Member(name, modules[name], first)]
            continue
        members = []
        for other in group:
            k = chosen.get(other) or _capturable(other, modules[other])
            m = modules[other]
            own = _own_params(m)
            if k.vector or len(own) != 1 or own[0] is not m.weight:
                raise CaptureError(
                    f"layers {group} share a parameter; tied layers are supported when they share their weight "
                    f"and nothing else (layer {other!r}, a {type(m).__name__}, has other parameters or is a norm)"
                )
            members.append(Member(other, m, k, swap=k.transposed != first.transposed))
        by_input: dict[bool, set[tuple[str, bool]]] = {}
        for mem in members:
            by_input.setdefault(mem.kind.takes_ids, set()).add((mem.kind.name, mem.swap))
        if any(len(v) > 1 for v in by_input.values()):
            raise CaptureError(f"layers {group} share a weight but are of kinds that cannot be told apart: {by_input}")
        blocks[name] = members
        log.info("capture: layers %s share their weight; captured as one block %r", group, name)
    return blocks
