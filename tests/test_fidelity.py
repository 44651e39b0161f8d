"""Real fidelity check: DVEmb vs actual retraining with one last-epoch occurrence removed (TSLOO).

sklearn digits, MLP 64->32->10 (tanh), plain SGD, fp64, 3 epochs, recorded by dvemb's own training
(Lightning + capture, unprojected), embedded in 3 segments and scored in embedding mode (the segments
composed) by dvemb's stages. Ground truth: dvemb.eval.groundtruth replays the recorded trajectory.
"""

from pathlib import Path

import polars as pl
import torch

from dvemb.config import load_config
from dvemb.embed.run import embed_segment
from dvemb.eval.baselines import grad_dot
from dvemb.eval.groundtruth import choose_points, load_trajectory, tsloo_points, verify_replay
from dvemb.eval.metrics import pearson, spearman
from dvemb.score.run import score, val_vectors
from dvemb.score.scores import occurrence_table
from dvemb.store.gradstore import read_segment
from dvemb.store.rundir import RunDir
from dvemb.store.trajectory import read_schedule
from dvemb.train.run import train

ROOT = Path(__file__).resolve().parents[1]
SETS = [
    "data.subset=992",
    "data.eval_subset=300",
    "train.epochs=3",
    "train.lr=0.07",
    "train.precision=64-true",
    "capture.k_a=null",
    "capture.k_s=null",
    "capture.dtype=float64",
    "embed.dtype=float64",
    "embed.segments=3",
    "score.mode=embedding",
    "score.checkpoints=false",
]


def test_dvemb_tracks_true_tsloo_and_beats_grad_dot(tmp_path):
    cfg = load_config(ROOT / "configs" / "digits_mlp.yaml", SETS)
    run = train(cfg, RunDir(tmp_path / "run"), progress=False)
    b = run.boundaries
    for j in range(len(b) - 1):
        embed_segment(run, j, cfg.embed)
    score(run, cfg)
    occ = pl.read_parquet(run.occurrences).filter(pl.col("checkpoint") == b[-1])

    records = [r for j in range(len(b) - 1) for r in read_segment(run.grads(j), range(b[j], b[j + 1]), kind="grads")]
    gd = grad_dot(records, read_schedule(run), val_vectors(run, cfg, b[-1]))  # no curvature term
    gd = occurrence_table(records, gd).rename({"score": "grad_dot"})

    traj = load_trajectory(run)
    assert verify_replay(traj) < 1e-10  # the replay reproduces every recorded boundary
    points = choose_points(traj, 320, seed=0, last_epoch=True)
    truth = pl.DataFrame(
        {
            "step": [t for t, _ in points],
            "sample_id": [int(traj.steps[t].sample_ids[p]) for t, p in points],
            "tsloo": tsloo_points(traj, points).numpy(),
        }
    )
    j = truth.join(occ, on=["step", "sample_id"]).join(gd, on=["step", "sample_id"])
    assert j.height == len(points)
    ts, dvemb, gdot = (torch.from_numpy(j[c].to_numpy()) for c in ("tsloo", "score", "grad_dot"))

    rho_dvemb, rho_gd = spearman(dvemb, ts), spearman(gdot, ts)
    slope = float((dvemb * ts).sum() / (dvemb**2).sum())  # the least-squares fit ts ~ slope * dvemb
    r = pearson(dvemb, ts)
    print(f"Spearman vs TSLOO: DVEmb {rho_dvemb:.3f} (Pearson {r:.3f}, slope {slope:.2f}), grad-dot {rho_gd:.3f}")
    assert rho_dvemb >= 0.9
    assert rho_dvemb > rho_gd + 0.02
    # first-order agreement in magnitude too: the best linear fit has slope near 1
    assert 0.7 < slope < 1.3
