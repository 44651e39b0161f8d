"""The Adam-aware recursion equals dense products of the linearised AdamW step map (fp64).

Independent reference: the real step map (dvemb.replay.optim.optimizer_step, which equals torch.optim.AdamW)
is differentiated with ``torch.func.jacrev`` at every step around the recorded state, with the batch gradient
linearised as ``g_t + H_t dtheta`` (H_t: the empirical Fisher of the step's stored per-sample gradients);
chaining those dense Jacobians gives every occurrence's first-order effect on f(theta_T). The hand-derived
adjoint of dvemb.embed.adam must agree to 1e-10.
"""

import torch
from torch import nn

from dvemb.capture.hooks import GradientCapture
from dvemb.embed.adam import AdamRun, StoredCoordinates, adam_direct_scores
from dvemb.replay.optim import OptimizerSpec, StepHyper, optimizer_step
from dvemb.types import ProjectionConfig, StepGrads

D_OUT, D_IN, T, B = 3, 4, 7, 5
BETAS, EPS = (0.9, 0.99), 1e-8


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(D_IN, D_OUT)


def to_params(x: torch.Tensor) -> dict[str, torch.Tensor]:
    g = x.view(D_OUT, D_IN + 1)
    return {"lin.weight": g[:, :D_IN], "lin.bias": g[:, D_IN]}


def flat(p: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([p["lin.weight"], p["lin.bias"][:, None]], dim=1).reshape(-1)


def moment(state: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    """A state entry of both parameters as one flat coordinate vector."""
    return flat({k.split("::")[0]: v for k, v in state.items() if k.endswith(f"::{key}")})


def keyed(x: torch.Tensor, key: str) -> dict[str, torch.Tensor]:
    return {f"{k}::{key}": v for k, v in to_params(x).items()}


def test_adam_recursion_equals_dense_linearised_step_maps():
    torch.manual_seed(0)
    model = Net().double()
    cap = GradientCapture(model, ProjectionConfig(k_a=None, k_s=None, dtype="float64"))
    coords = StoredCoordinates(model, cap.specs, torch.float64)
    n = D_OUT * (D_IN + 1)
    gen = torch.Generator().manual_seed(1)
    records = [
        StepGrads(
            t,
            torch.arange(B) + 10 * t,
            torch.full((B,), 1.0 / B, dtype=torch.float64),
            {"lin": torch.randn(B, n, generator=gen, dtype=torch.float64) * 0.1},
        )
        for t in range(T)
    ]
    lr = [[1e-2 * (1 - t / 20), 5e-3] for t in range(T)]
    wd = [[0.1, 0.0] for _ in range(T)]
    m0, v0 = (
        torch.randn(n, generator=gen, dtype=torch.float64) * 0.01,
        torch.rand(n, generator=gen, dtype=torch.float64) * 1e-3,
    )
    start = {}
    for k, v in to_params(m0).items():
        start[f"{k}::exp_avg"] = v.clone()
    for k, v in to_params(v0).items():
        start[f"{k}::exp_avg_sq"] = v.clone()
        start[f"{k}::step"] = torch.tensor(5.0, dtype=torch.float64)
    run = AdamRun(BETAS, EPS, lr, wd, [1.0] * T, {"lin.weight": 0, "lin.bias": 1}, {0: start})
    val = torch.randn(1, n, generator=gen, dtype=torch.float64)
    params = dict(model.named_parameters())
    got = adam_direct_scores(records, run, coords, params, {"lin": val})

    spec = OptimizerSpec("adamw", (("lin.weight",), ("lin.bias",)), betas=BETAS, eps=EPS)
    theta = torch.zeros(n, dtype=torch.float64)
    state = dict(start)
    jac, push = [], []
    z = torch.zeros(n, dtype=torch.float64)
    for t, rec in enumerate(records):
        g_t = rec.grads["lin"].sum(0)
        h = (rec.grads["lin"].T / rec.weights) @ rec.grads["lin"]  # sum_z (1/w) g g^T
        hyper = StepHyper(tuple(lr[t]), tuple(wd[t]))
        counts = {k: v for k, v in state.items() if k.endswith("::step")}

        def step(dth, dm, dv, dg, theta=theta, state=state, g_t=g_t, h=h, hyper=hyper, counts=counts):
            s = {
                f"{k}::exp_avg": v
                for k, v in to_params(
                    flat({k.split("::")[0]: state[k] for k in state if k.endswith("::exp_avg")}) + dm
                ).items()
            }
            s |= {
                f"{k}::exp_avg_sq": v
                for k, v in to_params(
                    flat({k.split("::")[0]: state[k] for k in state if k.endswith("::exp_avg_sq")}) + dv
                ).items()
            }
            p, s2 = optimizer_step(spec, to_params(theta + dth), s | counts, to_params(g_t + h @ dth + dg), hyper)
            m = flat({k.split("::")[0]: v for k, v in s2.items() if k.endswith("::exp_avg")})
            v = flat({k.split("::")[0]: v for k, v in s2.items() if k.endswith("::exp_avg_sq")})
            return torch.cat([flat(p), m, v])

        j_s = torch.func.jacrev(lambda x: step(x[:n], x[n : 2 * n], x[2 * n :], z))(
            torch.zeros(3 * n, dtype=torch.float64)
        )
        j_g = torch.func.jacrev(lambda dg: step(z, z, z, dg))(z)
        jac.append(j_s)
        push.append(j_g)
        out = step(z, z, z, z)
        theta = out[:n]
        state = {
            **{f"{k}::exp_avg": v for k, v in to_params(out[n : 2 * n]).items()},
            **{f"{k}::exp_avg_sq": v for k, v in to_params(out[2 * n :]).items()},
            **{k: v + 1 for k, v in counts.items()},
        }
    # u^T = [val, 0, 0] J_{T-1} ... J_{t+1}; score(t, z) = u^T J_g(t) (-g_z)
    u = torch.cat([val[0], torch.zeros(2 * n, dtype=torch.float64)])
    for t in range(T - 1, -1, -1):
        want = -(records[t].grads["lin"] @ (push[t].T @ u))
        torch.testing.assert_close(got[t][:, 0], want, rtol=1e-10, atol=1e-14)
        u = jac[t].T @ u
    assert max(float(s.abs().max()) for s in got) > 1e-6


def test_kronecker_store_recursion_equals_the_recursion_without_v_path_when_d_is_constant_rank1():
    """benchmarks/bench_adam_projection's Kronecker-store recursion applies each step's D as its gradient enters
    the momentum; for a constant rank-1 D (and the identity projection) that is exact, so it must equal the
    Adam-aware recursion with the v path dropped, to 1e-10."""
    from benchmarks.bench_adam_projection import Kronecker, kronecker_scores, without_v
    from dvemb.embed.propagator import empirical_fisher

    torch.manual_seed(0)
    model = Net().double()
    cap = GradientCapture(model, ProjectionConfig(k_a=None, k_s=None, dtype="float64"))
    coords = StoredCoordinates(model, cap.specs, torch.float64)
    n, shape, eps = D_OUT * (D_IN + 1), (D_OUT, D_IN + 1), 1e-30
    gen = torch.Generator().manual_seed(2)
    rand = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    a, b = rand(D_OUT).abs() + 0.5, rand(D_IN + 1).abs() + 0.5  # sqrt(v_hat) = a b^T, constant
    records, coef = [], []
    for t in range(T):
        records.append(
            StepGrads(
                t, torch.arange(B) + 10 * t, torch.full((B,), 1.0 / B, dtype=torch.float64), {"lin": rand(B, n) * 0.1}
            )
        )
        c1 = torch.full((n,), 1e-2 * (1 - t / 20), dtype=torch.float64)
        d = 1 / (torch.outer(a, b).reshape(-1) + eps)
        coef.append(
            {
                "lin": {
                    "c1": c1,
                    "c1d": c1 * d,
                    "c1s": rand(n),
                    "g": rand(n),
                    "decay": torch.full((n,), 0.999, dtype=torch.float64),
                }
            }
        )
    run = AdamRun(BETAS, eps, [[0.0, 0.0]] * T, [[0.0, 0.0]] * T, [1.0] * T, {"lin.weight": 0, "lin.bias": 0}, {})
    val = {"lin": rand(1, n)}
    params = dict(model.named_parameters())
    want = adam_direct_scores(records, run, coords, params, val, blocks="model", coef=without_v(coef))
    got = kronecker_scores(records, coef, run.clip, empirical_fisher, val, BETAS[0], eps, Kronecker(cap.specs, None))
    assert shape == cap.specs["lin"].shape
    for t in range(T):
        torch.testing.assert_close(got[t], want[t][:, 0], rtol=1e-10, atol=1e-15)
    assert max(float(s.abs().max()) for s in got) > 1e-6
