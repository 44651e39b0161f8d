"""The optimizer as trained, as an explicit differentiable step map.

``optimizer_step(spec, params, state, grads, hyper)`` performs one step of ``torch.optim.SGD``
(momentum, dampening, Nesterov, coupled weight decay) or ``torch.optim.AdamW`` (β1, β2, ε, decoupled
decay, bias correction) with the same arithmetic as torch's single-tensor (CPU) implementation,
global-norm gradient clipping (``torch.nn.utils.clip_grad_norm_``) folded in, and per-group LR and
weight decay. It is built from differentiable tensor ops only, so ``torch.autograd`` / ``torch.func``
give its vector-Jacobian products (the exact replay scorer) and ``vmap`` runs it over many lanes (the
ground truth). tests/test_replay.py checks it against ``torch.optim`` to 1e-12 in float64.

The optimizer state is a flat dict keyed ``"{parameter name}::{state key}"`` — ``momentum_buffer``
(SGD), ``exp_avg``, ``exp_avg_sq``, ``step`` (AdamW) — the layout of
``checkpoints/optimizer-XXXXXX.safetensors``. A missing key means "no state yet" (step 0).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

import torch

from dvemb.errors import DvembError

Params = dict[str, torch.Tensor]
State = dict[str, torch.Tensor]
SEP = "::"
CLIP_EPS = 1e-6  # torch.nn.utils.clip_grad_norm_: coef = max_norm / (total_norm + 1e-6)


class ReplayError(DvembError):
    """A run cannot be replayed exactly, or a replay does not reproduce what was recorded."""


@dataclass(frozen=True)
class OptimizerSpec:
    """Everything about the optimizer that the replay needs besides the per-step LR and decay.

    groups: parameter names of each param group (group order as in the optimizer).
    """

    kind: str
    groups: tuple[tuple[str, ...], ...]
    momentum: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    amsgrad: bool = False
    maximize: bool = False
    grad_clip: float | None = None
    group_of: dict[str, int] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "group_of", {n: i for i, names in enumerate(self.groups) for n in names})

    @classmethod
    def from_torch(
        cls, optimizer: torch.optim.Optimizer, names: Mapping[int, str], grad_clip: float | None = None
    ) -> OptimizerSpec:
        """Read a torch optimizer. names: ``id(parameter) -> name`` (every optimized parameter must have one)."""
        if isinstance(optimizer, torch.optim.AdamW):
            kind = "adamw"
        elif isinstance(optimizer, torch.optim.SGD):
            kind = "sgd"
        else:
            kind = type(optimizer).__name__
        groups = []
        for i, g in enumerate(optimizer.param_groups):
            missing = [tuple(p.shape) for p in g["params"] if id(p) not in names]
            if missing:
                raise ReplayError(f"optimizer param group {i}: parameters of shapes {missing[:3]} are not in the model")
            groups.append(tuple(names[id(p)] for p in g["params"]))
        g0 = optimizer.param_groups[0]
        return cls(
            kind=kind,
            groups=tuple(groups),
            momentum=float(g0.get("momentum", 0.0) or 0.0),
            dampening=float(g0.get("dampening", 0.0) or 0.0),
            nesterov=bool(g0.get("nesterov", False)),
            betas=tuple(float(b) for b in g0.get("betas", (0.9, 0.999))),
            eps=float(g0.get("eps", 1e-8)),
            amsgrad=bool(g0.get("amsgrad", False)),
            maximize=bool(g0.get("maximize", False)),
            grad_clip=grad_clip,
        )

    def to_json(self) -> dict:
        d = asdict(self)
        d.pop("group_of")
        d["groups"] = [{"params": list(names)} for names in self.groups]
        return d

    @classmethod
    def from_json(cls, d: Mapping) -> OptimizerSpec:
        d = dict(d)
        d["groups"] = tuple(tuple(g["params"]) for g in d["groups"])
        d["betas"] = tuple(d.get("betas", (0.9, 0.999)))
        d.pop("group_weight_decay", None)
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__ and k != "group_of"})

    def check_replayable(self) -> None:
        """ReplayError naming the option that the step map does not reproduce."""
        if self.kind not in ("sgd", "adamw"):
            raise ReplayError(
                f"optimizer {self.kind!r}: only torch.optim.SGD and torch.optim.AdamW have an exact step map"
            )
        if self.amsgrad:
            raise ReplayError(
                "optimizer AdamW(amsgrad=True): AMSGrad's running max is not replayable; use amsgrad=False"
            )
        if self.maximize:
            raise ReplayError("optimizer maximize=True is not supported by the replay")
        if self.kind == "sgd" and self.nesterov and (self.momentum <= 0 or self.dampening != 0):
            raise ReplayError("SGD nesterov=True needs momentum > 0 and dampening 0 (as torch.optim.SGD)")

    def state_keys(self) -> tuple[str, ...]:
        if self.kind == "adamw":
            return ("exp_avg", "exp_avg_sq", "step")
        return ("momentum_buffer",) if self.momentum else ()


@dataclass(frozen=True)
class StepHyper:
    """Per-group learning rate and weight decay of one step, as the optimizer held them when it stepped."""

    lr: tuple[float, ...]
    weight_decay: tuple[float, ...]


def torch_state(optimizer: torch.optim.Optimizer, names: Mapping[int, str]) -> State:
    """The flat state dict of a torch optimizer (``"{name}::{key}"``); tensors detached, not copied."""
    out: State = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key, v in optimizer.state.get(p, {}).items():
                if v is None:
                    continue
                out[f"{names[id(p)]}{SEP}{key}"] = v.detach() if torch.is_tensor(v) else torch.tensor(float(v))
    return out


def _safe_sqrt(v: torch.Tensor) -> torch.Tensor:
    """sqrt with a zero (not NaN) derivative where v == 0 (Adam coordinates that never saw a gradient)."""
    pos = v > 0
    return torch.where(pos, torch.sqrt(torch.where(pos, v, torch.ones_like(v))), torch.zeros_like(v))


def clip_coefficient(grads: Mapping[str, torch.Tensor], max_norm: float) -> torch.Tensor:
    """min(1, max_norm / (||g||_2 + 1e-6)) over all gradients, as clip_grad_norm_ computes it."""
    norms = torch.stack([torch.linalg.vector_norm(g) for g in grads.values()])
    total = torch.linalg.vector_norm(norms)
    return torch.clamp(max_norm / (total + CLIP_EPS), max=1.0)


def optimizer_step(
    spec: OptimizerSpec, params: Params, state: State, grads: Params, hyper: StepHyper
) -> tuple[Params, State]:
    """One optimizer step: (theta_t, state_t, g_t) -> (theta_{t+1}, state_{t+1}); g_t = grad of the batch loss.

    Pure: nothing is modified in place. Parameters without a gradient entry are left unchanged.
    """
    if spec.grad_clip is not None:
        coef = clip_coefficient(grads, spec.grad_clip)
        grads = {k: g * coef for k, g in grads.items()}
    new_p, new_s = dict(params), dict(state)
    for name, g in grads.items():
        i = spec.group_of[name]
        lr, wd = hyper.lr[i], hyper.weight_decay[i]
        p = params[name]
        if spec.kind == "adamw":
            new_p[name], st = _adamw(spec, p, g, state, name, lr, wd)
        else:
            new_p[name], st = _sgd(spec, p, g, state, name, lr, wd)
        new_s.update(st)
    return new_p, new_s


def _sgd(spec: OptimizerSpec, p, g, state: State, name: str, lr: float, wd: float):
    if wd != 0:
        g = g + wd * p
    st = {}
    if spec.momentum != 0:
        key = f"{name}{SEP}momentum_buffer"
        buf = state.get(key)
        buf = g if buf is None else spec.momentum * buf + (1 - spec.dampening) * g
        st[key] = buf
        g = g + spec.momentum * buf if spec.nesterov else buf
    return p - lr * g, st


def _adamw(spec: OptimizerSpec, p, g, state: State, name: str, lr: float, wd: float):
    b1, b2 = spec.betas
    k_m, k_v, k_t = (f"{name}{SEP}{k}" for k in ("exp_avg", "exp_avg_sq", "step"))
    m, v = state.get(k_m), state.get(k_v)
    m = torch.zeros_like(p) if m is None else m
    v = torch.zeros_like(p) if v is None else v
    step_t = state.get(k_t)
    step = (float(step_t) if step_t is not None else 0.0) + 1.0
    p = p * (1 - lr * wd)
    m = m + (1 - b1) * (g - m)  # exp_avg.lerp_(grad, 1 - beta1)
    v = v * b2 + (1 - b2) * g * g
    bc1 = 1 - b1**step
    bc2_sqrt = math.sqrt(1 - b2**step)
    denom = _safe_sqrt(v) / bc2_sqrt + spec.eps
    p = p - (lr / bc1) * (m / denom)
    step_out = torch.full((), step, dtype=torch.float64) if step_t is None else step_t.new_full((), step)
    return p, {k_m: m, k_v: v, k_t: step_out}
