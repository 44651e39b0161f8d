"""Param groups in the SGD recursion: each captured layer (each stored coordinate, where the store keeps the
parameters' own coordinates) follows the LR and weight decay of its own parameters' group.

Independent references: (1) dense products of ``A_k = diag(c_k) - diag(eta_k) H_k`` per layer (and over the
concatenated layers for ``blocks: model``) with eta / c laid out per coordinate by hand, fp64, 1e-10; the
coordinate -> group map against the model-based map of the Adam-aware recursion (dvemb.embed.adam);
(2) the exact replay of a real fp64 digits run with nanoGPT-style groups (dvemb.replay.exact), on the last
segment's occurrences, where the curvature model matters least — and the old one-LR recursion on the same run.
"""

import numpy as np
import polars as pl
import pytest
import torch
from scipy.stats import spearmanr
from torch import nn

from dvemb.capture.hooks import GradientCapture
from dvemb.config import TrainConfig, load_config
from dvemb.embed.adam import StoredCoordinates
from dvemb.embed.blocks import MODEL, merge_schedule
from dvemb.embed.curvature import curvature_fn
from dvemb.embed.direct import direct_scores
from dvemb.embed.propagator import Curvature, Propagator
from dvemb.embed.run import embed_segment
from dvemb.embed.segments import compose, embed_steps
from dvemb.eval.baselines import grad_dot
from dvemb.replay.exact import exact_scores
from dvemb.replay.trajectory import load_trajectory
from dvemb.score.run import score, val_vectors
from dvemb.score.scores import segment_scores
from dvemb.store.gradstore import read_segment
from dvemb.store.rundir import RunDir
from dvemb.store.trajectory import read_schedule, read_steps, stored_groups
from dvemb.train.module import param_groups
from dvemb.train.run import train
from dvemb.types import ProjectionConfig, Schedule, StepGrads

F64 = torch.float64
T, B = 6, 4
# nanoGPT-style: weights decay at the base LR, biases do not and train at twice the LR
TRAIN = TrainConfig(lr=0.3, weight_decay=0.5, no_decay=["*.bias"], group_lr={"no_decay": 2.0})


def tiny_model() -> nn.Module:
    """Two layers of one stored dimension (15 = 3 x (4 + bias) = 5 x 3), so they share a batched M."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 5, bias=False)).double()


def group_map(model: nn.Module) -> dict[str, int]:
    return {n: i for i, g in enumerate(param_groups(model, TRAIN)) for n, _ in g["params"]}


def expanded(groups: int | torch.Tensor, d: int) -> torch.Tensor:
    return torch.full((d,), groups, dtype=torch.int64) if isinstance(groups, int) else groups


@pytest.mark.parametrize("kind", ["exact", "subsample"])
def test_stored_coordinates_follow_their_parameters_group(kind):
    """The group of every stored coordinate equals its parameter's group, mapped through the model's own
    layer kinds and projection matrices (dvemb.embed.adam.StoredCoordinates)."""
    model = tiny_model()
    k = (None, None) if kind == "exact" else (3, 2)  # subsample: 3 of 5 input columns, 2 of 3 rows
    sub = kind == "subsample"
    cap = GradientCapture(
        model, ProjectionConfig(*k, seed=1, dtype="float64", kind="subsample" if sub else "kronecker")
    )
    of = group_map(model)
    params = dict(model.named_parameters())
    want = StoredCoordinates(model, cap.specs, F64).to_stored(lambda p: torch.full_like(params[p], float(of[p])))
    for name, spec in cap.specs.items():
        got = stored_groups(name, spec, of, frozen=2)
        assert torch.equal(expanded(got, spec.dim).to(F64), want[name]), name
    assert isinstance(stored_groups("2", cap.specs["2"], of, 2), int)  # bias-free: one group
    assert int(stored_groups("0", cap.specs["0"], of, 2).sum()) == cap.specs["0"].shape[0]  # the bias column is kept
    cap.remove()


def test_gaussian_input_side_follows_the_weights_group():
    """A Gaussian a side mixes weight and bias columns: the layer follows its weight's group (documented
    approximation); a Gaussian s side keeps the columns, so the bias column keeps its own group."""
    model = tiny_model()
    of = group_map(model)
    cap = GradientCapture(model, ProjectionConfig(k_a=2, k_s=None, dtype="float64"))
    assert stored_groups("0", cap.specs["0"], of, 2) == 0
    cap.remove()
    cap = GradientCapture(model, ProjectionConfig(k_a=None, k_s=2, dtype="float64"))
    got = stored_groups("0", cap.specs["0"], of, 2)
    assert torch.equal(got, torch.tensor([0, 0, 0, 0, 1] * 2))
    cap.remove()


def problem(seed: int = 1):
    """Records with random per-sample vectors on the tiny model's unprojected layers, a Fisher-like curvature
    (other vectors), and a schedule with two groups whose LR and decay both vary per step."""
    model = tiny_model()
    cap = GradientCapture(model, ProjectionConfig(k_a=None, k_s=None, dtype="float64"))
    of = group_map(model)
    layers = {n: stored_groups(n, s, of, frozen=2) for n, s in cap.specs.items()}
    dims = {n: s.dim for n, s in cap.specs.items()}
    cap.remove()
    gen = torch.Generator().manual_seed(seed)
    records, curv = [], {}
    for t in range(T):
        w = 0.2 + torch.rand(B, generator=gen, dtype=F64)
        grads = {n: 0.4 * torch.randn(B, d, generator=gen, dtype=F64) for n, d in dims.items()}
        records.append(StepGrads(t, torch.arange(B) + 10 * t, w, grads))
        vecs = {n: 0.4 * torch.randn(2 * B, d, generator=gen, dtype=F64) for n, d in dims.items()}
        curv[t] = Curvature(vecs, 0.5 + torch.rand(2 * B, generator=gen, dtype=F64))
    glr = [[0.3 * (1 - t / 20), 0.6 * (1 - t / 20) * (0.9 if t == 3 else 1.0), 0.0] for t in range(T)]
    gwd = [[0.5, 0.2 + 0.05 * t, 0.0] for t in range(T)]
    sched = Schedule([g[0] for g in glr], [g[0] for g in gwd], glr, gwd, layers)
    val = {n: torch.randn(2, d, generator=gen, dtype=F64) for n, d in dims.items()}
    return records, sched, curv, val, dims


def rates(sched: Schedule, t: int, names: list[str], dims: dict[str, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """eta, c per coordinate of the concatenated ``names``, built from the group table by hand."""
    eta, c = [], []
    for n in names:
        g = expanded(sched.layer_groups[n], dims[n])
        lr = torch.tensor([sched.group_lr[t][i] for i in g.tolist()], dtype=F64)
        wd = torch.tensor([sched.group_weight_decay[t][i] for i in g.tolist()], dtype=F64)
        eta.append(lr)
        c.append(1 - lr * wd)
    return torch.cat(eta), torch.cat(c)


def dense(records, sched, curv, dims, blocks: list[list[str]]):
    """Embeddings (layer -> [B, D] per step) and the whole propagator, from dense A_k = diag(c) - diag(eta) H."""
    embs = [{} for _ in records]
    prop = {}
    for names in blocks:
        d = sum(dims[n] for n in names)
        a = []
        for r in records:
            eta, c = rates(sched, r.step, names, dims)
            cv = curv[r.step] if curv else Curvature(r.grads, 1.0 / r.weights)
            f = torch.cat([cv.vectors[n] for n in names], dim=1)
            a.append(torch.diag(c) - eta[:, None] * ((f.T * cv.coef) @ f))
        q = torch.eye(d, dtype=F64)
        for s in range(len(records) - 1, -1, -1):
            eta, _ = rates(sched, records[s].step, names, dims)
            g = torch.cat([records[s].grads[n] for n in names], dim=1)
            e = (g * eta) @ q.T
            embs[s]["|".join(names)] = e
            q = q @ a[s]
        prop["|".join(names)] = q
    return embs, prop


@pytest.mark.parametrize("curvature", ["empirical", "fisher"])
def test_per_coordinate_recursion_equals_dense_products(curvature):
    records, sched, curv, val, dims = problem()
    fn = (lambda r: curv[r.step]) if curvature == "fisher" else None
    cv = curv if curvature == "fisher" else None
    names = sorted(dims)
    want, want_q = dense(records, sched, cv, dims, [[n] for n in names])
    # sequential embeddings and the propagator C - M
    got, prop = embed_steps(records, sched, F64, curvature=fn)
    for g, w in zip(got, want):
        for n in names:
            torch.testing.assert_close(g.grads[n], w[n], rtol=1e-10, atol=1e-13)
    state = Propagator.from_state_dict(prop.state_dict()).state_dict()
    assert "alpha" not in state  # the coordinates' groups differ: C per layer
    for n in names:
        torch.testing.assert_close(torch.diag(state[f"C.{n}"]) - state[f"M.{n}"], want_q[n], rtol=1e-10, atol=1e-13)
    # the per-coordinate decay and LR differ inside layer "0" and between the two layers of one dim group
    assert not torch.allclose(state["C.0"], state["C.0"][0].expand(dims["0"]))
    assert not torch.allclose(state["C.0"], state["C.2"])
    # direct mode, the segmented algorithm and the grad-dot baseline
    v = {n: val[n] for n in names}
    want_s = [sum(w[n] @ v[n].T for n in names) for w in want]
    for s, w in zip(direct_scores(records, sched, v, F64, curvature=fn), want_s):
        torch.testing.assert_close(s, w, rtol=1e-10, atol=1e-13)
    segs = [records[:2], records[2:5], records[5:]]
    parts = [embed_steps(seg, sched, F64, curvature=fn) for seg in segs]
    local, props = [p[0] for p in parts], [p[1] for p in parts]
    for g, w in zip(compose(local, props), want):
        for n in names:
            torch.testing.assert_close(g.grads[n], w[n], rtol=1e-10, atol=1e-13)
    for s, w in zip(segment_scores(local, props, v), want_s):
        torch.testing.assert_close(s, w, rtol=1e-10, atol=1e-13)
    for s, r in zip(grad_dot(records, sched, v), records):
        eta, _ = rates(sched, r.step, names, dims)
        g = torch.cat([r.grads[n] for n in names], dim=1)
        torch.testing.assert_close(s, (g * eta) @ torch.cat([v[n] for n in names], dim=1).T, rtol=1e-12, atol=0)


@pytest.mark.parametrize("curvature", ["empirical", "fisher"])
def test_model_block_recursion_equals_dense_products(curvature):
    """blocks: model — one M over the concatenated layers, with the per-coordinate rates concatenated alike."""
    records, sched, curv, val, dims = problem(seed=2)
    fn = (lambda r: curv[r.step]) if curvature == "fisher" else None
    names = sorted(dims)
    want, want_q = dense(records, sched, curv if fn else None, dims, [names])
    key = "|".join(names)
    got, prop = embed_steps(records, sched, F64, curvature=fn, blocks="model")
    for g, w in zip(got, want):
        torch.testing.assert_close(g.grads[MODEL], w[key], rtol=1e-10, atol=1e-13)
    state = prop.state_dict()
    torch.testing.assert_close(torch.diag(state["C.model"]) - state["M.model"], want_q[key], rtol=1e-10, atol=1e-13)
    v = torch.cat([val[n] for n in names], dim=1)
    for s, w in zip(direct_scores(records, sched, val, F64, curvature=fn, blocks="model"), want):
        torch.testing.assert_close(s, w[key] @ v.T, rtol=1e-10, atol=1e-13)


def test_schedule_without_groups_and_older_propagators_are_unchanged():
    records, sched, _, val, dims = problem(seed=3)
    plain = Schedule(sched.lr, sched.weight_decay)
    assert not plain.per_layer and plain.rates(2, dims) == plain.at(2)
    assert merge_schedule(plain, dims) is plain
    with pytest.raises(ValueError, match=r"no param group for layers \['x'\]"):
        merge_schedule(sched, {**dims, "x": 3})
    with pytest.raises(ValueError, match="come together"):
        Schedule([0.1], [0.0], group_lr=[[0.1]])
    # without param groups the propagator file keeps its layout (one scalar alpha: C = alpha I)
    _, prop = embed_steps(records, plain, F64)
    state = prop.state_dict()
    assert set(state) == {"alpha"} | {f"M.{n}" for n in dims}
    back = Propagator.from_state_dict(state)
    torch.testing.assert_close(back.state_dict(), state)
    assert all(torch.equal(back.C[d], prop.C[d]) for d in prop.C)
    # per-group rates that happen to be one group for everything give the one-LR recursion
    one = Schedule(sched.lr, sched.weight_decay, [[a, a] for a in sched.lr], [[w, w] for w in sched.weight_decay],
                   {n: torch.zeros(d, dtype=torch.int64) for n, d in dims.items()})  # fmt: skip
    for a, b in zip(direct_scores(records, one, val, F64), direct_scores(records, plain, val, F64)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)


# --- a real run against the exact replay ---------------------------------------------------------------------

SETS = [
    "data.subset=256",
    "train.epochs=2",
    "train.precision=64-true",
    "capture.dtype=float64",
    "capture.k_a=null",
    "capture.k_s=null",
    "embed.curvature=fisher",
    "embed.dtype=float64",
    "embed.segments=4",
    "score.mode=direct",
    "score.checkpoints=false",
    "train.weight_decay=0.05",
    "train.no_decay=['*.bias']",
    "train.group_lr={no_decay: 2.0}",
]


def fidelity(got: np.ndarray, want: np.ndarray) -> tuple[float, float, float]:
    """Spearman, least-squares scale (want ~ scale * got) and relative L2 error."""
    scale = float(got @ want / (got @ got))
    return float(spearmanr(got, want).statistic), scale, float(np.linalg.norm(got - want) / np.linalg.norm(want))


def test_groups_recursion_against_the_exact_replay(tmp_path, capsys):
    cfg = load_config("configs/digits_mlp.yaml", SETS)
    run = train(cfg, RunDir(tmp_path / "run"), progress=False)
    b = run.boundaries
    sched = read_schedule(run)
    assert sched.per_layer and len(sched.group_lr[0]) == 3  # decay, no_decay, frozen
    steps = read_steps(run)
    assert sched.group_lr[5][:2] == pytest.approx([steps["lr"][5], 2 * steps["lr"][5]], rel=1e-15)
    assert sched.group_weight_decay[5][:2] == [0.05, 0.0]
    exact = exact_scores(load_trajectory(run))[b[-1]]
    j = len(b) - 2
    records = read_segment(run.grads(j), range(b[j], b[j + 1]), kind="grads")
    v = val_vectors(run, cfg, b[-1])
    curv = curvature_fn(run, "fisher", [j])
    old = Schedule(sched.lr, sched.weight_decay)  # group 0's LR and decay for every coordinate
    new_s = direct_scores(records, sched, v, F64, curvature=curv)
    old_s = direct_scores(records, old, v, F64, curvature=curv)
    # the last step involves no curvature: the score is <v, E g> exactly, with each coordinate's own LR
    np.testing.assert_allclose(new_s[-1][:, 0].numpy(), exact[b[-1] - 1].numpy(), rtol=1e-8, atol=1e-14)
    assert not np.allclose(old_s[-1][:, 0].numpy(), exact[b[-1] - 1].numpy(), rtol=1e-3)
    want = torch.cat(exact[b[j] : b[j + 1]]).numpy()
    new = fidelity(torch.cat([s[:, 0] for s in new_s]).numpy(), want)
    one = fidelity(torch.cat([s[:, 0] for s in old_s]).numpy(), want)
    with capsys.disabled():
        print(f"\nlast segment ({b[j + 1] - b[j]} steps) vs exact replay: spearman / LS scale / rel. L2 error")
        print(f"  per-group recursion: {new[0]:.4f} / {new[1]:.4f} / {new[2]:.4f}")
        print(f"  one-LR recursion:    {one[0]:.4f} / {one[1]:.4f} / {one[2]:.4f}")
    assert new[0] >= 0.95 and abs(new[1] - 1) <= 0.1
    assert new[0] > one[0] and abs(new[1] - 1) < abs(one[1] - 1) and new[2] < one[2] / 2
    # the pipeline's stages use the same schedule: embedding mode (per-coordinate propagators) == direct mode
    score(run, cfg)
    direct = pl.read_parquet(run.occurrences).sort("step", "sample_id")
    for seg in range(len(b) - 1):
        embed_segment(run, seg, score_mode="embedding")
    score(run, cfg.model_copy(update={"score": cfg.score.model_copy(update={"mode": "embedding"})}))
    emb = pl.read_parquet(run.occurrences).sort("step", "sample_id")
    np.testing.assert_allclose(emb["score"].to_numpy(), direct["score"].to_numpy(), rtol=1e-8, atol=1e-14)
    last = direct.filter(pl.col("step") >= b[j]).sort("step")
    mine = torch.cat([s[:, 0] for s in new_s]).numpy()
    keyed = {(int(t), int(z)): s for t, z, s in zip(last["step"], last["sample_id"], last["score"])}
    rows = [(r.step, int(z)) for r in records for z in r.sample_ids]
    np.testing.assert_allclose([keyed[k] for k in rows], mine, rtol=1e-8, atol=1e-14)


def test_clipped_run_schedule_folds_the_clip_factor_per_group(tmp_path):
    """Under clipping, group i applies LR ``group_lr * clip`` with decay factor ``1 - group_lr * wd``; group 0
    reproduces the ``lr`` / ``weight_decay`` columns that training folded the same way."""
    sets = [*SETS[:3], "capture.k_a=8", "capture.k_s=4", "train.grad_clip=0.05", *SETS[-3:]]
    run = train(load_config("configs/digits_mlp.yaml", sets), RunDir(tmp_path / "run"), progress=False)
    steps = read_steps(run)
    assert (steps["clip_factor"] < 1).any()
    sched = read_schedule(run)
    for t in range(steps.height):
        lr, wd, clip = steps["lr"][t], steps["weight_decay"][t], steps["clip_factor"][t]
        assert sched.group_lr[t][0] == pytest.approx(lr, rel=1e-12)
        assert sched.group_lr[t][1] == pytest.approx(2 * lr, rel=1e-12)
        assert sched.group_lr[t][0] * sched.group_weight_decay[t][0] == pytest.approx(lr * wd, rel=1e-12)
        assert sched.group_weight_decay[t][1] == 0.0 and clip <= 1.0
    # a Gaussian store: every layer follows its weight's group as a whole
    assert all(isinstance(g, int) and g == 0 for g in sched.layer_groups.values())
