"""The embedding engine against dense products, segmented vs sequential, direct vs embedding mode."""

import pytest
import torch

from dvemb.embed.direct import direct_scores
from dvemb.embed.propagator import Curvature, Propagator
from dvemb.embed.segments import compose, embed_steps
from dvemb.score.scores import dot_scores, segment_scores
from dvemb.types import Schedule, StepGrads

DIMS = {"a": 8, "b": 8, "c": 5}  # 21 "parameters" per side, far below 200
T = 13
F64 = torch.float64


def random_problem(seed: int, weight_decay: float = 0.0):
    gen = torch.Generator().manual_seed(seed)
    records = []
    for t in range(T):
        b = int(torch.randint(2, 6, (1,), generator=gen))
        records.append(
            StepGrads(
                step=t,
                sample_ids=torch.randint(0, 40, (b,), generator=gen),
                weights=0.2 + torch.rand(b, generator=gen, dtype=F64),
                grads={n: 0.4 * torch.randn(b, d, generator=gen, dtype=F64) for n, d in DIMS.items()},
            )
        )
    lr = (0.05 + 0.15 * torch.rand(T, generator=gen, dtype=F64)).tolist()
    return records, Schedule(lr=lr, weight_decay=[weight_decay] * T)


def dense_embeddings(records, schedule, end=None):
    """eta_s (prod_{k=end-1..s+1} (c_k I - eta_k H_k)) g with H_k = sum (1/w) g g^T, per layer."""
    end = len(records) if end is None else end
    out = []
    for s in range(end):
        emb = {}
        for n, d in DIMS.items():
            q = torch.eye(d, dtype=F64)
            for k in range(s + 1, end):
                r = records[k]
                lr, wd = schedule.at(k)
                h = (r.grads[n] / r.weights[:, None]).T @ r.grads[n]
                q = ((1 - lr * wd) * torch.eye(d, dtype=F64) - lr * h) @ q
            emb[n] = schedule.at(s)[0] * records[s].grads[n] @ q.T
        out.append(emb)
    return out


def assert_same(got: list[StepGrads], want: list[dict], rtol=1e-8):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        for n in DIMS:
            torch.testing.assert_close(g.grads[n], w[n], rtol=rtol, atol=rtol * 1e-2)


@pytest.mark.parametrize("wd", [0.0, 0.3])
def test_sequential_equals_dense_product(wd):
    records, schedule = random_problem(0, wd)
    emb, prop = embed_steps(records, schedule, dtype=F64)
    assert_same(emb, dense_embeddings(records, schedule))
    # the final propagator is A_{T-1} … A_0
    for n, d in DIMS.items():
        q = torch.eye(d, dtype=F64)
        for r in records:
            lr, _ = schedule.at(r.step)
            h = (r.grads[n] / r.weights[:, None]).T @ r.grads[n]
            q = ((1 - lr * wd) * torch.eye(d, dtype=F64) - lr * h) @ q
        got = prop.apply({n: torch.eye(d, dtype=F64)})[n].T
        torch.testing.assert_close(got, q, rtol=1e-8, atol=1e-10)


BOUNDS = {1: [0, T], 2: [0, 4, T], 7: [0, 1, 2, 5, 6, 9, 12, T]}


def segmented(records, schedule, bounds):
    local, props = [], []
    for b0, b1 in zip(bounds[:-1], bounds[1:]):
        e, p = embed_steps(records[b0:b1], schedule, dtype=F64)
        local.append(e)
        props.append(p)
    return local, props


@pytest.mark.parametrize("k", [1, 2, 7])
@pytest.mark.parametrize("wd", [0.0, 0.3])
def test_segmented_equals_sequential(k, wd):
    records, schedule = random_problem(1, wd)
    seq, _ = embed_steps(records, schedule, dtype=F64)
    local, props = segmented(records, schedule, BOUNDS[k])
    got = compose(local, props)
    assert_same(got, [r.grads for r in seq], rtol=1e-9)
    # every intermediate checkpoint b_m equals a sequential run truncated there
    for m in range(1, k):
        at_m = compose(local, props, upto=m)
        trunc, _ = embed_steps(records[: BOUNDS[k][m]], schedule, dtype=F64)
        assert [e.step for e in at_m] == list(range(BOUNDS[k][m]))
        assert_same(at_m, [r.grads for r in trunc], rtol=1e-9)


def test_propagator_roundtrips_through_state_dict():
    records, schedule = random_problem(2, 0.1)
    _, prop = embed_steps(records, schedule, dtype=F64)
    back = Propagator.from_state_dict(prop.state_dict())
    x = {n: torch.randn(3, d, dtype=F64) for n, d in DIMS.items()}
    for n in DIMS:
        torch.testing.assert_close(back.apply(x)[n], prop.apply(x)[n], rtol=0, atol=0)


@pytest.mark.parametrize("wd", [0.0, 0.3])
def test_direct_equals_embedding_mode(wd):
    records, schedule = random_problem(3, wd)
    val = {n: torch.randn(4, d, dtype=F64) for n, d in DIMS.items()}  # V = 4 validation vectors
    emb, _ = embed_steps(records, schedule, dtype=F64)
    want = dot_scores(emb, val)
    got = direct_scores(records, schedule, val, dtype=F64)
    for g, w in zip(got, want):
        assert g.shape == w.shape
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)
    # and scoring through the segment propagators (no global embeddings) agrees too
    local, props = segmented(records, schedule, BOUNDS[7])
    for g, w in zip(segment_scores(local, props, val), want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)
    for m in range(1, 7):
        trunc = direct_scores(records[: BOUNDS[7][m]], schedule, val, dtype=F64)
        for g, w in zip(segment_scores(local, props, val, upto=m), trunc):
            torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)


def test_general_curvature_vectors_match_dense():
    """With curvature vectors f != g (e.g. true Fisher), Q evolves with H = sum coef f f^T."""
    records, schedule = random_problem(4, 0.2)
    gen = torch.Generator().manual_seed(9)
    curv = {
        r.step: Curvature(
            {n: torch.randn(3, d, generator=gen, dtype=F64) * 0.3 for n, d in DIMS.items()},
            torch.rand(3, generator=gen, dtype=F64) + 0.5,
        )
        for r in records
    }
    emb, _ = embed_steps(records, schedule, dtype=F64, curvature=lambda r: curv[r.step])
    val = {n: torch.randn(2, d, dtype=F64) for n, d in DIMS.items()}
    direct = direct_scores(records, schedule, val, dtype=F64, curvature=lambda r: curv[r.step])
    for s, r in enumerate(records):
        for n, d in DIMS.items():
            q = torch.eye(d, dtype=F64)
            for k in range(s + 1, T):
                lr, wd = schedule.at(k)
                f, c = curv[k].vectors[n], curv[k].coef
                q = ((1 - lr * wd) * torch.eye(d, dtype=F64) - lr * (f * c[:, None]).T @ f) @ q
            want = schedule.at(s)[0] * r.grads[n] @ q.T
            torch.testing.assert_close(emb[s].grads[n], want, rtol=1e-8, atol=1e-10)
    for g, w in zip(direct, dot_scores(emb, val)):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)


def test_float32_default_close_to_float64():
    records, schedule = random_problem(5, 0.1)
    e64, _ = embed_steps(records, schedule, dtype=F64)
    e32, _ = embed_steps(records, schedule)
    for a, b in zip(e32, e64):
        for n in DIMS:
            assert a.grads[n].dtype == torch.float32
            torch.testing.assert_close(a.grads[n].double(), b.grads[n], rtol=1e-4, atol=1e-5)


def test_non_consecutive_steps_refused():
    records, schedule = random_problem(6)
    with pytest.raises(ValueError, match="step 5 follows step 3"):
        embed_steps(records[:4] + records[5:], schedule)


def test_direct_scores_leave_the_validation_vectors_untouched():
    records, schedule = random_problem(7, 0.1)
    val = {n: torch.randn(1, d, dtype=F64) for n, d in DIMS.items()}  # V = 1: .T would be a view
    before = {n: v.clone() for n, v in val.items()}
    first = direct_scores(records, schedule, val, dtype=F64)
    again = direct_scores(records, schedule, val, dtype=F64)
    for n in DIMS:
        assert torch.equal(val[n], before[n])
    for a, b in zip(first, again):
        assert torch.equal(a, b)


@pytest.mark.parametrize("wd", [0.0, 0.3])
def test_model_blocks_equal_the_dense_full_matrix_recursion(wd):
    """blocks="model": one M over all layers == dense products with H over the concatenated vector."""
    records, schedule = random_problem(8, wd)
    emb, _ = embed_steps(records, schedule, dtype=F64, blocks="model")
    names = sorted(DIMS)
    d = sum(DIMS.values())
    for s, r in enumerate(records):
        q = torch.eye(d, dtype=F64)
        for k in range(s + 1, T):
            lr, c = schedule.at(k)[0], 1 - schedule.at(k)[0] * schedule.at(k)[1]
            g = torch.cat([records[k].grads[n] for n in names], dim=1)
            q = (c * torch.eye(d, dtype=F64) - lr * (g / records[k].weights[:, None]).T @ g) @ q
        want = schedule.at(s)[0] * torch.cat([r.grads[n] for n in names], dim=1) @ q.T
        torch.testing.assert_close(emb[s].grads["model"], want, rtol=1e-8, atol=1e-10)
    val = {n: torch.randn(3, dd, dtype=F64) for n, dd in DIMS.items()}
    direct = direct_scores(records, schedule, val, dtype=F64, blocks="model")
    for a, b in zip(direct, dot_scores(emb, val)):  # per-layer validation vectors are merged to match
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    layered = direct_scores(records, schedule, val, dtype=F64)
    assert not torch.allclose(torch.cat(layered), torch.cat(direct))  # the coupling changes the scores


def test_time_window_influence_at_an_intermediate_checkpoint():
    """DIT window [t1, t2) at checkpoint c: sum over its occurrences of v_c^T DVEmb^(t -> c), per sample."""
    from dvemb.score.scores import occurrence_table, sample_values, window_influence

    records, schedule = random_problem(9, 0.2)
    bounds = BOUNDS[7]
    local, props = segmented(records, schedule, bounds)
    m = 5
    c = bounds[m]  # checkpoint 9
    val = {n: torch.randn(1, d, dtype=F64) for n, d in DIMS.items()}
    occ = occurrence_table(records[:c], segment_scores(local, props, val, upto=m), checkpoint=c)
    t1, t2 = 2, 7
    got = window_influence(occ, t1, t2)
    dense = dense_embeddings(records, schedule, end=c)
    want: dict[int, float] = {}
    for t in range(t1, t2):
        score = sum((dense[t][n] @ val[n].T)[:, 0] for n in DIMS)
        for sid, sc in zip(records[t].sample_ids.tolist(), score.tolist()):
            want[sid] = want.get(sid, 0.0) + sc
    assert got["sample_id"].to_list() == sorted(want)
    np_want = torch.tensor([want[s] for s in sorted(want)], dtype=F64)
    torch.testing.assert_close(torch.tensor(got["influence"].to_numpy()), np_want, rtol=1e-9, atol=1e-12)
    # the window over every step before c is the all-occurrence value at c
    full = window_influence(occ, 0, c).rename({"influence": "value"})
    assert full.equals(sample_values(occ).select(full.columns))
    with pytest.raises(ValueError, match="checkpoint >= 12"):
        window_influence(occ, 10, 12)
