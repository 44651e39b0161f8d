"""The momentum-aware recursion (SGD with momentum linearised on (theta, b)) equals dense products of the real step map.

Independent reference: the real SGD step (dvemb.replay.optim.optimizer_step, equal to torch.optim.SGD) is
differentiated with ``torch.func.jacrev`` at every step, with the batch gradient linearised as
``c (g_t + H_t dtheta)`` (H_t: the empirical Fisher of the stored per-sample gradients, c the clip factor);
chaining those Jacobians gives every occurrence's first-order effect on f(theta_T). The linear-state recursion
(validation-first, and as embeddings over two segments) must agree to 1e-10 — with dampening, coupled decay in
one of two param groups, clipping, a skipped (AMP) step, and the buffer's first step; plain and Nesterov.
"""

import pytest
import torch
from test_adam_direct import D_IN, D_OUT, flat, to_params

from dvemb.embed.linear_state import state_direct_scores, state_embed_steps
from dvemb.embed.momentum import MomentumRun, momentum_coefficients
from dvemb.replay.optim import OptimizerSpec, StepHyper, optimizer_step
from dvemb.score.scores import segment_scores
from dvemb.types import StepGrads

T, B, CUT, SKIP = 8, 5, 5, 3
F64 = torch.float64
N = D_OUT * (D_IN + 1)


@pytest.mark.parametrize("nesterov", [False, True])
def test_momentum_recursion_equals_dense_step_maps(nesterov):
    gen = torch.Generator().manual_seed(5)
    records = [
        StepGrads(t, torch.arange(B) + 10 * t, torch.full((B,), 1.0 / B, dtype=F64),
                  {"lin": torch.randn(B, N, generator=gen, dtype=F64) * 0.3})
        for t in range(T)
    ]  # fmt: skip
    mu, tau = 0.9, 0.0 if nesterov else 0.2  # torch refuses Nesterov with dampening
    lr = [[0.05 * (1 - t / 20), 0.02] for t in range(T)]
    wd = [[0.1, 0.0] for _ in range(T)]
    clip = [1.0 if t % 3 else 0.6 for t in range(T)]
    is_bias = (torch.arange(N) % (D_IN + 1) == D_IN).to(torch.int64)
    run = MomentumRun(mu, tau, nesterov, lr, wd, clip, [t == SKIP for t in range(T)], {"lin": is_bias})
    coef = momentum_coefficients(records, run, {"lin": N})
    rho = {"lin": torch.ones(N, dtype=F64)}
    val = {"lin": torch.randn(2, N, generator=gen, dtype=F64)}
    got = state_direct_scores(records, coef, clip, rho, val)
    segments = [records[:CUT], records[CUT:]]
    parts = [state_embed_steps(s, coef[s[0].step : s[-1].step + 1], clip[s[0].step : s[-1].step + 1], rho, F64)
             for s in segments]  # fmt: skip
    from_embeddings = segment_scores([p[0] for p in parts], [p[1] for p in parts], val)

    spec = OptimizerSpec("sgd", (("lin.weight",), ("lin.bias",)), momentum=mu, dampening=tau, nesterov=nesterov)
    theta = torch.randn(N, generator=gen, dtype=F64) * 0.1
    buf = None
    z = torch.zeros(N, dtype=F64)
    jac, push = [], []
    for t, rec in enumerate(records):
        g_t = rec.grads["lin"].sum(0)
        h = (rec.grads["lin"].T / rec.weights) @ rec.grads["lin"]  # sum_z (1/w) g g^T
        if t == SKIP:  # the scaler skipped the update: nothing changes
            jac.append(torch.eye(2 * N, dtype=F64))
            push.append(torch.zeros(2 * N, N, dtype=F64))
            continue

        def step(dth, db, dg, theta=theta, buf=buf, g_t=g_t, h=h, t=t):
            state = {} if buf is None else {f"{k}::momentum_buffer": v for k, v in to_params(buf + db).items()}
            grads = to_params(clip[t] * (g_t + h @ dth) + dg)
            p, s = optimizer_step(spec, to_params(theta + dth), state, grads, StepHyper(tuple(lr[t]), tuple(wd[t])))
            return torch.cat([flat(p), flat({k.split("::")[0]: v for k, v in s.items()})])

        jac.append(torch.func.jacrev(lambda x: step(x[:N], x[N:], z))(torch.zeros(2 * N, dtype=F64)))
        push.append(torch.func.jacrev(lambda dg: step(z, z, dg))(z))
        out = step(z, z, z)
        theta, buf = out[:N], out[N:]
    u = torch.cat([val["lin"], torch.zeros(2, N, dtype=F64)], dim=1).T  # [2N, V]
    scale = max(float(s.abs().max()) for s in got)
    assert scale > 1e-6
    for t in range(T - 1, -1, -1):
        want = -clip[t] * records[t].grads["lin"] @ (push[t].T @ u)  # [B, V]
        torch.testing.assert_close(got[t], want, rtol=0, atol=1e-10 * scale)
        torch.testing.assert_close(from_embeddings[t], want, rtol=0, atol=1e-10 * scale)
        u = jac[t].T @ u
    assert float(got[SKIP].abs().max()) == 0.0
