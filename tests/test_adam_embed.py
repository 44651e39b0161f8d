"""Adam-aware data value embeddings (the (theta, m, v) propagator) give the Adam-aware direct recursion's scores.

The direct recursion (dvemb.embed.adam.adam_direct_scores) is pinned against dense Jacobians of the real AdamW
step map in tests/test_adam_direct.py; here the embeddings of two segments, scored through the segment
propagators or composed into global embeddings, must give its numbers to 1e-10 (fp64) — for a coordinate
subsample (sampling ratios != 1), two param groups, clipping, per-layer and whole-model curvature blocks,
the empirical Fisher and separate curvature vectors, at the final and at the intermediate checkpoint.
"""

import pytest
import torch
from torch import nn

from dvemb.capture.hooks import GradientCapture
from dvemb.embed.adam import AdamRun, StoredCoordinates, adam_coefficients, adam_direct_scores, adam_step_coefficients
from dvemb.embed.linear_state import StatePropagator, state_embed_steps
from dvemb.embed.propagator import Curvature
from dvemb.embed.segments import compose
from dvemb.score.scores import dot_scores, seeded, segment_scores
from dvemb.types import ProjectionConfig, StepGrads

T, CUT, B, V = 9, 4, 5, 2
BETAS, EPS = (0.9, 0.99), 1e-8
F64 = torch.float64


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(6, 4)
        self.l2 = nn.Linear(4, 3)


def setup(gen: torch.Generator):
    torch.manual_seed(0)
    model = Net().double()
    cap = GradientCapture(model, ProjectionConfig(k_a=3, k_s=2, kind="subsample", dtype="float64"))
    coords = StoredCoordinates(model, cap.specs, F64)
    assert {coords.ratio(n) for n in coords.specs} == {7 * 4 / 6, 5 * 3 / 6}  # a true subsample: rho != 1
    dims = {n: s.dim for n, s in coords.specs.items()}
    records = [
        StepGrads(
            t,
            torch.arange(B) + 10 * t,
            torch.full((B,), 1.0 / B, dtype=F64),
            {n: torch.randn(B, d, generator=gen, dtype=F64) * 0.1 for n, d in dims.items()},
        )
        for t in range(T)
    ]
    params = dict(model.named_parameters())

    def state() -> dict[str, torch.Tensor]:
        out = {}
        for p, x in params.items():
            out[f"{p}::exp_avg"] = torch.randn(x.shape, generator=gen, dtype=F64) * 0.01
            out[f"{p}::exp_avg_sq"] = torch.rand(x.shape, generator=gen, dtype=F64) * 1e-3
            out[f"{p}::step"] = torch.tensor(5.0 + len(out), dtype=F64)
        return out

    run = AdamRun(
        BETAS,
        EPS,
        lr=[[1e-2 * (1 - t / 20), 5e-3] for t in range(T)],
        weight_decay=[[0.1, 0.0] for _ in range(T)],
        clip=[1.0 if t % 3 else 0.7 for t in range(T)],
        group_of={p: int(p.endswith("bias")) for p in params},
        states={0: state(), CUT: state()},
    )
    val = {n: torch.randn(V, d, generator=gen, dtype=F64) for n, d in dims.items()}
    return records, run, coords, params, val, dims


@pytest.mark.parametrize("blocks", ["layer", "model"])
@pytest.mark.parametrize("curvature", ["empirical", "vectors"])
def test_adam_embeddings_give_the_direct_recursions_scores(blocks, curvature):
    gen = torch.Generator().manual_seed(3)
    records, run, coords, params, val, dims = setup(gen)
    curv = None
    if curvature == "vectors":  # e.g. GGN vectors: 3 per step, their own coefficients
        vecs = {t: Curvature({n: torch.randn(3, d, generator=gen, dtype=F64) * 0.2 for n, d in dims.items()},
                             torch.rand(3, generator=gen, dtype=F64) + 0.5) for t in range(T)}  # fmt: skip

        def curv(rec: StepGrads) -> Curvature:
            return vecs[rec.step]

    segments = [records[:CUT], records[CUT:]]
    local, props = zip(
        *(adam_embed_steps(s, run, coords, params, F64, curvature=curv, blocks=blocks) for s in segments)
    )
    assert all(isinstance(p, StatePropagator) for p in props)
    assert {e.shape[1] for e in local[0][0].grads.values()} == (
        {3 * sum(dims.values())} if blocks == "model" else {3 * d for d in dims.values()}
    )
    for upto, steps in ((2, records), (1, records[:CUT])):
        want = adam_direct_scores(steps, run, coords, params, val, curv, blocks)
        got = segment_scores(local, props, val, upto=upto)
        composed = dot_scores(compose(local, props, upto=upto), seeded(_merged(val, blocks), local[0][0].grads))
        scale = max(float(w.abs().max()) for w in want)
        assert scale > 1e-6
        for w, g, c in zip(want, got, composed, strict=True):
            torch.testing.assert_close(g, w, rtol=0, atol=1e-10 * scale)
            torch.testing.assert_close(c, w, rtol=0, atol=1e-10 * scale)


def _merged(val: dict[str, torch.Tensor], blocks: str) -> dict[str, torch.Tensor]:
    return {"model": torch.cat([val[n] for n in sorted(val)], dim=1)} if blocks == "model" else val


def adam_embed_steps(records, run, coords, params, dtype, curvature=None, blocks="layer"):
    coef = adam_step_coefficients(adam_coefficients(records, run, coords, params), run.betas)
    clip = [run.clip[r.step] for r in records]
    return state_embed_steps(records, coef, clip, coords.rho(), dtype, curvature=curvature, blocks=blocks)


def test_adam_propagator_round_trips_and_composes():
    """One pass over both segments gives the product of the segments' propagators; a saved one loads back."""
    gen = torch.Generator().manual_seed(4)
    records, run, coords, params, _, _ = setup(gen)
    _, first = adam_embed_steps(records[:CUT], run, coords, params, F64)
    _, second = adam_embed_steps(records[CUT:], run, coords, params, F64)
    _, whole = adam_embed_steps(records, run, coords, params, F64)
    second.compose(first)
    for n, q in whole.Q.items():
        torch.testing.assert_close(second.Q[n], q, rtol=0, atol=1e-12)
        assert not torch.allclose(q, torch.eye(q.shape[0], dtype=F64))
    back = StatePropagator.from_state_dict(whole.state_dict())
    assert all(torch.equal(back.Q[n], q) for n, q in whole.Q.items())


@pytest.mark.parametrize("kind", ["subsample", "rowwise"])
def test_stored_coordinates_map_parameters_where_capture_stores_their_gradients(kind):
    """The moments' map (StoredCoordinates.to_stored of parameter-shaped tensors) puts every parameter
    coordinate where capture stores that coordinate's gradient: the batch gradient mapped equals the sum of
    the captured per-sample rows (1e-12), for both coordinate-keeping stores."""
    torch.manual_seed(2)
    model = Net().double()
    cap = GradientCapture(model, ProjectionConfig(k_a=3, k_s=2, kind=kind, dtype="float64"))
    x, y = torch.randn(7, 6, dtype=F64), torch.randn(7, 3, dtype=F64)
    with cap.micro_batch(torch.arange(7), weight=1 / 7):
        ((model.l2(torch.tanh(model.l1(x))) - y) ** 2).sum(1).mean().backward()
    rec = cap.collect(step=0)
    coords = StoredCoordinates(model, cap.specs, F64)
    assert coords.exact()
    grads = dict(model.named_parameters())
    mapped = coords.to_stored(lambda p: grads[p].grad)
    for n, g in rec.grads.items():
        torch.testing.assert_close(g.sum(0), mapped[n], rtol=0, atol=1e-12)
