"""Ground truth from a run directory: replay from boundary checkpoints == in-memory TSLOO / LOO; refusals."""

import json
import shutil

import polars as pl
import pytest
import torch
from typer.testing import CliRunner

from dvemb.cli import app
from dvemb.config import load_config
from dvemb.eval.groundtruth import ReplayError, load_trajectory, replay_range, verify_replay
from dvemb.eval.replay import mean_loss, sgd_step, tsloo
from dvemb.store.rundir import RunDir, load_tensors, save_tensors
from dvemb.train.run import train

SETS = [
    "data.subset=128",
    "train.epochs=2",
    "train.lr=0.2",
    "train.weight_decay=0.01",
    "train.precision=64-true",
    "capture.dtype=float64",
    "capture.k_a=8",
    "capture.k_s=8",
    "embed.segments=3",
]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    cfg = load_config("configs/digits_mlp.yaml", SETS)
    return train(cfg, RunDir(tmp_path_factory.mktemp("gt") / "run"), progress=False)


def test_groundtruth_matches_in_memory_tsloo_and_loo(run):
    res = CliRunner().invoke(app, ["groundtruth", str(run.root), "--points", "20", "--all-epoch", "4", "--seed", "3"])
    assert res.exit_code == 0, res.output
    gt = pl.read_parquet(run.root / "eval" / "groundtruth.parquet")
    assert gt.columns == ["step", "sample_id", "tsloo"] and gt.height == 20
    assert gt["step"].n_unique() > 3  # spread over the run, across segments
    summary = json.loads((run.root / "eval" / "groundtruth.json").read_text())
    assert summary["replay_rel_error"] < 1e-12

    traj = load_trajectory(run)
    per_step = [traj.checkpoints[0]]  # theta_t for every step, from checkpoint 0 only
    for t in range(traj.steps):
        per_step.append(replay_range(traj, per_step[-1], t, t + 1))
    pos = {(t, int(i)): p for t, b in enumerate(traj.batches) for p, i in enumerate(b.sample_ids)}
    occ = [(t, pos[(t, z)]) for t, z in zip(gt["step"].to_list(), gt["sample_id"].to_list())]
    want = tsloo(traj.model, per_step[:-1], traj.batches, traj.schedule, occ, traj.val)
    torch.testing.assert_close(torch.tensor(gt["tsloo"].to_numpy()), want, rtol=1e-7, atol=1e-12)
    assert want.abs().max() > 1e-6

    loo = pl.read_parquet(run.root / "eval" / "groundtruth_all.parquet")
    assert loo.columns == ["sample_id", "loo"] and loo.height == 4
    base = mean_loss(traj.model, per_step[-1], *traj.val)
    for z, value in zip(loo["sample_id"].to_list(), loo["loo"].to_list()):
        p = traj.checkpoints[0]
        for t, b in enumerate(traj.batches):
            lr, wd = traj.schedule.at(t)
            p = sgd_step(traj.model, p, b, lr, wd, weights=torch.where(b.sample_ids == z, 0.0, b.weights))
        assert value == pytest.approx(mean_loss(traj.model, p, *traj.val) - base, rel=1e-7, abs=1e-12)


def test_refuses_adamw_momentum_and_clipping(run, tmp_path):
    for field, value in (("optimizer", "adamw"), ("momentum", 0.9), ("grad_clip", 1.0)):
        other = tmp_path / field
        shutil.copytree(run.root, other, ignore=shutil.ignore_patterns("eval"))
        meta = json.loads((other / "run.json").read_text())
        meta["config"]["train"][field] = value
        (other / "run.json").write_text(json.dumps(meta))
        res = CliRunner().invoke(app, ["groundtruth", str(other), "--points", "2"])
        assert res.exit_code == 2 and f"train.{field}" in res.output
        assert not (other / "eval" / "groundtruth.parquet").exists()


def test_a_replay_that_misses_a_checkpoint_is_refused(run, tmp_path):
    other = tmp_path / "tampered"
    shutil.copytree(run.root, other)
    b = RunDir(other).boundaries
    state = load_tensors(RunDir(other).checkpoint(b[1]))
    state["layers.0.weight"] = state["layers.0.weight"] + 1e-3
    save_tensors(RunDir(other).checkpoint(b[1]), state)
    with pytest.raises(ReplayError, match="misses checkpoint"):
        verify_replay(load_trajectory(RunDir(other)))


def test_baselines_match_dense_formulas():
    from dvemb.eval.baselines import grad_dot, influence_function, nearest_checkpoint, tracin_cp
    from dvemb.types import Schedule, StepGrads

    gen = torch.Generator().manual_seed(0)
    f64 = torch.float64
    dims = {"a": 5, "b": 3}
    records = [
        StepGrads(
            t,
            torch.arange(4) + 10 * t,
            torch.full((4,), 0.25, dtype=f64),
            {n: torch.randn(4, d, generator=gen, dtype=f64) for n, d in dims.items()},
        )
        for t in range(6)
    ]
    sched = Schedule(lr=[0.1 * (t + 1) for t in range(6)], weight_decay=[0.0] * 6)
    val_at = {c: {n: torch.randn(2, d, generator=gen, dtype=f64) for n, d in dims.items()} for c in (0, 3, 6)}
    v = val_at[6]
    full = {n: torch.cat([r.grads[n] for r in records]) for n in dims}  # [24, D]
    lr = torch.tensor(sched.lr, dtype=f64).repeat_interleave(4)[:, None]
    want = lr * sum(full[n] @ v[n].T for n in dims)
    torch.testing.assert_close(torch.cat(grad_dot(records, sched, v)), want)

    assert [nearest_checkpoint(t, [0, 3, 6]) for t in range(6)] == [0, 0, 3, 3, 3, 6]
    cp = torch.cat(tracin_cp(records, sched, val_at))
    for i, r in enumerate(records):
        c = nearest_checkpoint(r.step, [0, 3, 6])
        exp = sched.lr[r.step] * sum(r.grads[n] @ val_at[c][n].T for n in dims)
        torch.testing.assert_close(cp[4 * i : 4 * i + 4], exp)

    fit = records[3:]
    got = torch.cat(influence_function(records, v, fit, damping=0.1))
    want = 0
    for n, d in dims.items():
        g_fit = torch.cat([r.grads[n] for r in fit])
        h = (g_fit.T @ g_fit) / 0.25 / len(fit)  # mean over steps of sum_z (1/w) g g^T
        lam = 0.1 * torch.trace(h) / d
        want = want + full[n] @ torch.linalg.inv(h + lam * torch.eye(d, dtype=f64)) @ v[n].T
    torch.testing.assert_close(got, want)
