"""Ground truth from a run directory: the replay reproduces SGD, momentum and AdamW runs; TSLOO / LOO; refusals."""

import json
import shutil

import polars as pl
import pytest
import torch
from typer.testing import CliRunner

from dvemb.cli import app
from dvemb.config import load_config
from dvemb.eval.groundtruth import ReplayError, load_trajectory, verify_replay
from dvemb.replay.trajectory import replay_range
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
OPTIMIZERS = {
    "momentum": ["train.momentum=0.9", "train.lr=0.05", "train.grad_clip=1.0"],
    "adamw": ["train.optimizer=adamw", "train.lr=0.003", "train.schedule=cosine", "train.warmup_steps=3"],
}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    cfg = load_config("configs/digits_mlp.yaml", SETS)
    return train(cfg, RunDir(tmp_path_factory.mktemp("gt") / "run"), progress=False)


@pytest.mark.parametrize("opt", sorted(OPTIMIZERS))
def test_replay_reproduces_every_boundary_of_momentum_and_adamw_runs(opt, tmp_path):
    """fp64 runs: replaying each segment from its boundary reproduces the next one (model AND optimizer state)."""
    cfg = load_config("configs/digits_mlp.yaml", SETS + OPTIMIZERS[opt])
    run = train(cfg, RunDir(tmp_path / opt), progress=False)
    traj = load_trajectory(run)
    assert traj.spec.kind == ("adamw" if opt == "adamw" else "sgd")
    assert all(traj.opt_states[b] for b in traj.boundaries[1:])  # the state was recorded
    assert verify_replay(traj) <= 1e-10
    # and the whole run from step 0 lands on the last checkpoint
    p, s = replay_range(traj, traj.checkpoints[0], traj.opt_states[0], 0, traj.num_steps)
    last = traj.boundaries[-1]
    for k, v in traj.checkpoints[last].items():
        torch.testing.assert_close(p[k], v, rtol=1e-10, atol=1e-12)
    for k, v in traj.opt_states[last].items():
        torch.testing.assert_close(s[k], v, rtol=1e-10, atol=1e-12)
    res = CliRunner().invoke(app, ["groundtruth", str(run.root), "--points", "6", "--all-epoch", "2"])
    assert res.exit_code == 0, res.output
    gt = pl.read_parquet(run.root / "eval" / "groundtruth.parquet")
    assert gt.height == 6 and gt["tsloo"].abs().max() > 0


def test_groundtruth_matches_sequential_replays(run):
    """The vmapped lanes equal one plain replay per removed occurrence / sample (same step map)."""
    res = CliRunner().invoke(app, ["groundtruth", str(run.root), "--points", "12", "--all-epoch", "3", "--seed", "3"])
    assert res.exit_code == 0, res.output
    gt = pl.read_parquet(run.root / "eval" / "groundtruth.parquet")
    assert gt.columns == ["step", "sample_id", "tsloo"] and gt.height == 12
    assert gt["step"].n_unique() > 3  # spread over the run, across segments
    summary = json.loads((run.root / "eval" / "groundtruth.json").read_text())
    assert summary["replay_rel_error"] < 1e-12 and summary["dtype"] == "float64"

    traj = load_trajectory(run)
    start = (traj.checkpoints[0], traj.opt_states[0])
    final = replay_range(traj, *start, 0, traj.num_steps)[0]
    base = float(traj.val_loss(final))

    def replay_without(drop) -> float:
        p, s = start
        for t in range(traj.num_steps):
            w = traj.steps[t].weights
            p, s = traj.step(p, s, t, torch.where(drop(t), 0.0, w))
        return float(traj.val_loss(p)) - base

    for t, z, value in gt.select("step", "sample_id", "tsloo").iter_rows():
        ids = traj.steps[t].sample_ids
        want = replay_without(lambda k, t=t, z=z, ids=ids: (ids == z) & (k == t))
        assert value == pytest.approx(want, rel=1e-7, abs=1e-12)
    assert gt["tsloo"].abs().max() > 1e-6
    loo = pl.read_parquet(run.root / "eval" / "groundtruth_all.parquet")
    assert loo.columns == ["sample_id", "loo"] and loo.height == 3
    for z, value in loo.iter_rows():
        want = replay_without(lambda k, z=z: traj.steps[k].sample_ids == z)
        assert value == pytest.approx(want, rel=1e-7, abs=1e-12)


def test_refuses_amsgrad_and_mixed_precision(run, tmp_path):
    cases = {
        "amsgrad": (lambda m: m["optimizer"].update(amsgrad=True), "amsgrad"),
        "precision": (lambda m: m["config"]["train"].update(precision="16-mixed"), "train.precision"),
        "rmsprop": (lambda m: m["optimizer"].update(kind="RMSprop"), "RMSprop"),
    }
    for name, (edit, needle) in cases.items():
        other = tmp_path / name
        shutil.copytree(run.root, other, ignore=shutil.ignore_patterns("eval"))
        meta = json.loads((other / "run.json").read_text())
        edit(meta)
        (other / "run.json").write_text(json.dumps(meta))
        res = CliRunner().invoke(app, ["groundtruth", str(other), "--points", "2"])
        assert res.exit_code == 2 and needle in res.output, res.output
        assert not (other / "eval" / "groundtruth.parquet").exists()


def test_a_replay_that_misses_a_checkpoint_is_refused(run, tmp_path):
    other = tmp_path / "tampered"
    shutil.copytree(run.root, other)
    b = RunDir(other).boundaries
    state = load_tensors(RunDir(other).checkpoint(b[1]))
    state["layers.0.weight"] = state["layers.0.weight"] + 1e-3
    save_tensors(RunDir(other).checkpoint(b[1]), state)
    with pytest.raises(ReplayError, match=f"at step {b[1]}"):
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
