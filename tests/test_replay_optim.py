"""The explicit optimizer step map equals torch.optim (fp64, 1e-12) for every supported option."""

import pytest
import torch
from torch import nn

from dvemb.replay.optim import OptimizerSpec, ReplayError, StepHyper, optimizer_step, torch_state

CASES = {
    "sgd": dict(kind="sgd", kw=dict(lr=0.1)),
    "sgd-wd": dict(kind="sgd", kw=dict(lr=0.1, weight_decay=0.01)),
    "momentum": dict(kind="sgd", kw=dict(lr=0.05, momentum=0.9, weight_decay=1e-3)),
    "dampening": dict(kind="sgd", kw=dict(lr=0.05, momentum=0.9, dampening=0.3)),
    "nesterov": dict(kind="sgd", kw=dict(lr=0.05, momentum=0.8, nesterov=True, weight_decay=1e-3)),
    "adamw": dict(kind="adamw", kw=dict(lr=3e-3, weight_decay=0.05, betas=(0.9, 0.98), eps=1e-7)),
}


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3, bias=False)).double()


def _grads(model, x, y, clip):
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)


@pytest.mark.parametrize("clip", [None, 0.05])
@pytest.mark.parametrize("case", sorted(CASES))
def test_step_map_equals_torch_optim(case, clip):
    spec_kw = CASES[case]
    model = _model()
    names = {id(p): n for n, p in model.named_parameters()}
    decay = [p for n, p in model.named_parameters() if n.endswith("weight")]
    no_decay = [p for n, p in model.named_parameters() if not n.endswith("weight")]
    kw = dict(spec_kw["kw"])
    wd = kw.pop("weight_decay", 0.0)
    groups = [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0, "lr": kw["lr"] * 0.5}]
    opt = (torch.optim.AdamW if spec_kw["kind"] == "adamw" else torch.optim.SGD)(groups, **kw)
    spec = OptimizerSpec.from_torch(opt, names, grad_clip=clip)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    state = {}
    gen = torch.Generator().manual_seed(1)
    for t in range(6):
        x = torch.randn(8, 5, generator=gen, dtype=torch.float64)
        y = torch.randint(0, 3, (8,), generator=gen)
        # the replay's gradient: same loss, at the replayed parameters (unclipped; the map clips)
        q = {n: v.detach().requires_grad_(True) for n, v in params.items()}
        loss = nn.functional.cross_entropy(torch.func.functional_call(model, q, (x,)), y)
        g = dict(zip(q, torch.autograd.grad(loss, list(q.values()))))
        hyper = StepHyper(
            tuple(gr["lr"] for gr in opt.param_groups), tuple(gr["weight_decay"] for gr in opt.param_groups)
        )
        params, state = optimizer_step(spec, params, state, g, hyper)
        _grads(model, x, y, clip)
        opt.step()
        for n, p in model.named_parameters():
            assert torch.allclose(params[n], p, rtol=0, atol=1e-12), (case, t, n)
        want = torch_state(opt, names)
        assert set(want) == set(state)
        for k, v in want.items():
            assert torch.allclose(state[k].to(torch.float64), v.to(torch.float64), rtol=0, atol=1e-12), (case, t, k)


def test_unsupported_options_are_named():
    model = _model()
    names = {id(p): n for n, p in model.named_parameters()}
    spec = OptimizerSpec.from_torch(torch.optim.AdamW(model.parameters(), amsgrad=True), names)
    with pytest.raises(ReplayError, match="amsgrad"):
        spec.check_replayable()
    spec = OptimizerSpec.from_torch(torch.optim.RMSprop(model.parameters()), names)
    with pytest.raises(ReplayError, match="RMSprop"):
        spec.check_replayable()


def test_spec_round_trips_through_json():
    model = _model()
    names = {id(p): n for n, p in model.named_parameters()}
    spec = OptimizerSpec.from_torch(
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True), names, 1.0
    )
    assert OptimizerSpec.from_json(spec.to_json()) == spec
