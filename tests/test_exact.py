"""The exact replay scorer equals reverse-mode differentiation of the whole unrolled training (fp64).

Independent reference: every loss weight w_{t,z} is a leaf, the whole trajectory is unrolled with
``create_graph=True`` through the same optimizer step map, and ``autograd`` differentiates the final
validation loss w.r.t. all of them at once. The sweep (segment-wise recomputation, VJP of the step map,
one double-backward per step) must give -w * df/dw for every occurrence to 1e-9 relative.

With ``removal="step"`` the removal step is taken exactly and the rest to first order: the score is the
derivative of f(theta_c) along the exact one-step state change, checked by finite differences of the replay
started from the perturbed state.
"""

import pytest
import torch
from torch import nn

from dvemb.replay.exact import exact_scores
from dvemb.replay.optim import OptimizerSpec, StepHyper, optimizer_step
from dvemb.replay.trajectory import LossModel, RecordedStep, Trajectory
from dvemb.task import ClassificationTask

OPTIMIZERS = {
    "sgd-wd": (dict(kind="sgd"), 0.3, 1e-2),
    "momentum-nesterov": (dict(kind="sgd", momentum=0.9, nesterov=True), 0.1, 1e-3),
    "momentum-dampening": (dict(kind="sgd", momentum=0.8, dampening=0.2), 0.1, 0.0),
    "adamw": (dict(kind="adamw", betas=(0.9, 0.99), eps=1e-8), 1e-2, 0.05),
}
BOUNDS = [0, 4, 9, 14]


class Tiny(ClassificationTask):
    def build_model(self, info):
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4, bias=False)).double()


def make_trajectory(opt: str, clip: float | None, task: ClassificationTask | None = None) -> Trajectory:
    kw, lr, wd = OPTIMIZERS[opt]
    task = task or Tiny()
    model = task.build_model(None)
    names = [n for n, _ in model.named_parameters()]
    spec = OptimizerSpec(groups=(tuple(names[:2]), tuple(names[2:])), grad_clip=clip, **kw)
    gen = torch.Generator().manual_seed(3)
    steps = []
    for t in range(BOUNDS[-1]):
        b = 5 + t % 3
        batch = {
            "sample_id": torch.arange(b) + 100 * t,
            "x": torch.randn(b, 6, generator=gen, dtype=torch.float64),
            "y": torch.randint(0, 4, (b,), generator=gen),
        }
        hyper = StepHyper((lr * (1 - t / 40), lr * 0.5), (wd, 0.0))
        steps.append(RecordedStep(batch["sample_id"], batch, torch.full((b,), 1.0 / b, dtype=torch.float64), hyper))
    val = [
        {
            "sample_id": torch.arange(20),
            "x": torch.randn(20, 6, generator=gen, dtype=torch.float64),
            "y": torch.randint(0, 4, (20,), generator=gen),
        }
    ]
    traj = Trajectory(LossModel(task, model), spec, steps, [0] * len(steps), {}, {}, val, torch.float64, torch.float64)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    state = {}
    for t in range(BOUNDS[-1] + 1):
        if t in BOUNDS:
            traj.checkpoints[t], traj.opt_states[t] = params, state
        if t < BOUNDS[-1]:
            params, state = traj.step(params, state, t)
    return traj


def unrolled_scores(traj: Trajectory, c: int) -> list[torch.Tensor]:
    """-w * d f(theta_c) / dw for every occurrence, by autograd through the unrolled training."""
    ws = [s.weights.clone().requires_grad_(True) for s in traj.steps[:c]]
    params = {k: v.clone().requires_grad_(True) for k, v in traj.checkpoints[0].items()}
    state: dict = {}
    for t in range(c):
        g = torch.autograd.grad(traj.batch_loss(params, t, ws[t]), list(params.values()), create_graph=True)
        params, state = optimizer_step(traj.spec, params, state, dict(zip(params, g)), traj.steps[t].hyper)
    grads = torch.autograd.grad(traj.val_loss(params), ws)
    return [-(w.detach() * g) for w, g in zip(ws, grads)]


@pytest.mark.parametrize("clip", [None, 0.5])
@pytest.mark.parametrize("opt", sorted(OPTIMIZERS))
def test_sweep_equals_unrolled_autograd(opt, clip):
    traj = make_trajectory(opt, clip)
    got = exact_scores(traj, at=[9, 14], removal="linear")
    for c in (9, 14):
        want = torch.cat(unrolled_scores(traj, c))
        have = torch.cat(got[c])
        assert have.shape == want.shape
        assert torch.allclose(have, want, rtol=1e-9, atol=1e-12 * float(want.abs().max())), (opt, c)
        assert float(want.abs().max()) > 0


@pytest.mark.parametrize("opt", sorted(OPTIMIZERS))
def test_sweep_matches_finite_differences_of_the_replay(opt):
    """Shrinking one occurrence's weight by a factor (1 - eps) and replaying moves f by eps * score."""
    traj = make_trajectory(opt, 0.5)
    scores = exact_scores(traj, removal="linear")[14]
    eps = 1e-5
    base = float(traj.val_loss(traj.checkpoints[14]))
    for t, pos in [(0, 1), (6, 0), (13, 3)]:
        w = traj.steps[t].weights.clone()
        w[pos] *= 1 - eps
        params, state = traj.checkpoints[0], traj.opt_states[0]
        for k in range(BOUNDS[-1]):
            params, state = traj.step(params, state, k, w if k == t else None)
        fd = (float(traj.val_loss(params)) - base) / eps
        assert fd == pytest.approx(float(scores[t][pos]), rel=1e-3), (opt, t)


def replay_from(traj: Trajectory, params, state, first: int, stop: int):
    for k in range(first, stop):
        params, state = traj.step(params, state, k)
    return params, state


@pytest.mark.parametrize("opt", ["sgd-wd", "momentum-nesterov", "momentum-dampening"])
def test_step_removal_equals_linear_where_the_step_is_linear_in_the_gradient(opt):
    """Without clipping an SGD step is affine in g: the exact removal step IS the first-order one."""
    traj = make_trajectory(opt, None)
    lin, step = exact_scores(traj, removal="linear")[14], exact_scores(traj, removal="step")[14]
    want, have = torch.cat(lin), torch.cat(step)
    assert torch.allclose(have, want, rtol=1e-9, atol=1e-12 * float(want.abs().max()))


@pytest.mark.parametrize(("opt", "clip"), [("adamw", None), ("adamw", 0.5), ("sgd-wd", 0.5)])
def test_step_removal_is_the_derivative_along_the_exact_removal_step(opt, clip):
    """score(t, z) = d/de f(Phi(s_{t+1} + e (s'_{t+1} - s_{t+1})))|_0, s' the replayed step without z:
    finite differences of the replay (rel 1e-3); at the last step with an objective linear in theta it
    is the exact TSLOO (1e-10)."""
    traj = make_trajectory(opt, clip)
    scores = exact_scores(traj, removal="step")[14]
    assert not torch.allclose(torch.cat(scores), torch.cat(exact_scores(traj, removal="linear")[14]), rtol=1e-3)
    base = float(traj.val_loss(traj.checkpoints[14]))
    eps = 1e-6
    for t, pos in [(0, 1), (6, 0), (12, 3)]:
        p0, s0 = replay_from(traj, traj.checkpoints[0], traj.opt_states[0], 0, t)
        p1, s1 = traj.step(p0, s0, t)
        w = traj.steps[t].weights.clone()
        w[pos] = 0
        p2, s2 = traj.step(p0, s0, t, w)
        pe = {k: p1[k] + eps * (p2[k] - p1[k]) for k in p1}
        se = {k: s1[k] + eps * (s2[k] - s1[k]) if not k.endswith("::step") else s1[k] for k in s1}
        fd = (float(traj.val_loss(replay_from(traj, pe, se, t + 1, 14)[0])) - base) / eps
        assert fd == pytest.approx(float(scores[t][pos]), rel=1e-3), (opt, t)
    u = {
        k: torch.randn(v.shape, generator=torch.Generator().manual_seed(1), dtype=v.dtype)
        for k, v in traj.checkpoints[14].items()
    }

    def linear(params):
        return sum((u[k] * params[k]).sum() for k in u)

    last = exact_scores(traj, objective=linear, removal="step")[14][13]
    p0, s0 = replay_from(traj, traj.checkpoints[0], traj.opt_states[0], 0, 13)
    p1 = traj.step(p0, s0, 13)[0]
    for pos in range(len(last)):
        w = traj.steps[13].weights.clone()
        w[pos] = 0
        tsloo = float(linear(traj.step(p0, s0, 13, w)[0]) - linear(p1))
        assert float(last[pos]) == pytest.approx(tsloo, rel=1e-10, abs=1e-14)


@pytest.mark.parametrize("chunk, block", [(1, 1), (3, 7), (3, 1 << 30), (1 << 30, 5)])
def test_step_removal_is_the_same_in_any_chunking(chunk, block, monkeypatch):
    """Occurrences one at a time (large models), in chunks, or the whole batch at once (small ones); the step
    map over blocks of single coordinates, a few, or whole parameters; clipped (each occurrence's own factor)."""
    import dvemb.replay.exact as exact

    traj = make_trajectory("adamw", 0.5)
    want = torch.cat(exact_scores(traj, removal="step")[14])
    monkeypatch.setitem(exact.REMOVAL_CHUNK, "cpu", chunk * 88)  # 88 parameters in Tiny
    monkeypatch.setitem(exact.REMOVAL_BLOCK, "cpu", block * min(chunk, 8))  # values; a block spans the chunk's rows
    assert torch.allclose(torch.cat(exact_scores(traj, removal="step")[14]), want, rtol=1e-10, atol=1e-15)


def test_auto_removal_takes_the_exact_step_for_adamw_and_clipping():
    from dvemb.replay.exact import removal_is_step

    for opt, clip, want in [("adamw", None, True), ("sgd-wd", 0.5, True), ("momentum-nesterov", None, False)]:
        assert removal_is_step(make_trajectory(opt, clip).spec, "auto") is want


class Checked(nn.Module):
    """Tiny's network with a data check that reads a value (``.item()``): torch.func cannot vmap it."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.isfinite(x).all().item():
            raise ValueError("non-finite input")
        return self.net(x)


@pytest.mark.parametrize("clip", [None, 0.5])
def test_step_removal_of_a_model_torch_func_cannot_vmap(clip):
    """Per-sample gradients fall back to a batched backward pass; the scores are the same to 1e-12."""
    traj = make_trajectory("adamw", clip)
    want = torch.cat(exact_scores(traj, removal="step")[14])
    traj.net.model = Checked(traj.net.model)
    traj.checkpoints = {b: {f"net.{k}": v for k, v in p.items()} for b, p in traj.checkpoints.items()}
    traj.spec = OptimizerSpec(
        groups=tuple(tuple(f"net.{n}" for n in g) for g in traj.spec.groups),
        **{k: getattr(traj.spec, k) for k in ("kind", "betas", "eps", "grad_clip")},
    )
    traj.opt_states = {b: {f"net.{k}": v for k, v in s.items()} for b, s in traj.opt_states.items()}
    with pytest.raises(RuntimeError):  # the premise: torch.func refuses this model
        torch.func.vmap(lambda x: traj.net.model(x[None]).sum())(traj.val[0]["x"])
    got = torch.cat(exact_scores(traj, removal="step")[14])
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-15)


class Logistic(ClassificationTask):
    def build_model(self, info):
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(6, 4)).double()


def test_a_curvature_product_replaces_the_hessian():
    """``exact_scores(curvature=...)`` swaps the Hessian-vector product: with benchmarks/bench_adam_projection's
    Gauss-Newton product, a model whose logits are linear in its parameters gets the same scores (there the
    Gauss-Newton matrix is the Hessian, 1e-10); Tiny (tanh) does not."""
    from benchmarks.bench_adam_projection import ggn_product

    for task, same in ((Logistic(), True), (Tiny(), False)):
        traj = make_trajectory("adamw", None, task)
        want = torch.cat(exact_scores(traj, removal="linear")[14])
        got = torch.cat(exact_scores(traj, removal="linear", curvature=ggn_product(traj))[14])
        if same:
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-15)
        else:
            assert float((got - want).abs().max()) > 1e-3 * float(want.abs().max())
