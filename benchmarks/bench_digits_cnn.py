"""Fidelity on a user-written task: the digits CNN of examples/digits_cnn.py (Conv2d + Linear).

``configs/digits_cnn.yaml`` through dvemb's own pipeline, unprojected (``capture.k_a/k_s: null``) and in
fp64, both convolutions and the classifier captured. Ground truth: exact TSLOO (``dvemb groundtruth``:
the occurrence removed, the recorded SGD trajectory replayed) for ``--points`` occurrences of the LAST
epoch and as many of the FIRST. Estimators, scored at the final checkpoint: the embedding mode with the
empirical Fisher (the config's default) and with the true Fisher (``embed.curvature: fisher``, a second
run on the same trajectory), and ``score.mode: exact``.

    OMP_NUM_THREADS=1 python -m benchmarks.bench_digits_cnn            # about 5 minutes on 2 cores
    OMP_NUM_THREADS=1 python -m benchmarks.bench_digits_cnn --quick    # smoke run
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import polars as pl
import torch

from dvemb.config import load_config
from dvemb.eval.groundtruth import groundtruth
from dvemb.eval.metrics import pearson, spearman
from dvemb.pipeline import run_local
from dvemb.score.run import score
from dvemb.store.rundir import RunDir, load_tensors

try:  # run as a module (python -m benchmarks.bench_digits_cnn) or loaded from a path by the tests
    from benchmarks.common import RESULTS, bench_args, machine_info, write_json_atomic
except ImportError:  # pragma: no cover
    RESULTS = bench_args = machine_info = write_json_atomic = None

ROOT = Path(__file__).resolve().parents[1]
EXACT = ["capture.k_a=null", "capture.k_s=null", "capture.dtype=float64", "train.precision=64-true",
         "embed.dtype=float64"]  # fmt: skip
QUICK = ["data.subset=256", "train.epochs=2", "embed.segments=2"]


def final_scores(run: RunDir) -> pl.DataFrame:
    occ = pl.read_parquet(run.root / "scores" / "occurrences.parquet")
    return occ.filter(pl.col("checkpoint") == occ["checkpoint"].max()).select("step", "sample_id", "score")


def main() -> dict:
    args = bench_args(__doc__.splitlines()[0])
    points = 30 if args.quick else 200
    sets = EXACT + (QUICK if args.quick else [])
    out: dict = {"config": "configs/digits_cnn.yaml", "overrides": sets, "points": points, "estimators": {}}
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        cfg = load_config(ROOT / "configs" / "digits_cnn.yaml", sets)
        run = run_local(cfg, Path(tmp) / "empirical", progress=False)
        fisher_cfg = load_config(None, ["embed.curvature=fisher"], base=cfg.model_dump(mode="json"))
        fisher = run_local(fisher_cfg, Path(tmp) / "fisher", progress=False)
        last = run.boundaries[-1]  # the ground truth of one run is the other's: the same trajectory
        a, b = load_tensors(run.checkpoint(last)), load_tensors(fisher.checkpoint(last))
        assert all(torch.equal(a[k], b[k]) for k in a), "the fisher run trained differently"
        truth = {}
        for phase, kw in (("last", {"last_epoch": True}), ("first", {"first_epoch": True})):
            summary = groundtruth(run, points=points, fp64=True, **kw)
            truth[phase] = pl.read_parquet(run.root / "eval" / "groundtruth.parquet")
            out[f"replay_rel_error_{phase}"] = summary.get("replay_rel_error")
        scores = {"embedding-empirical": final_scores(run), "embedding-fisher": final_scores(fisher)}
        score(run, load_config(None, ["score.mode=exact"], base=cfg.model_dump(mode="json")))
        scores["exact"] = final_scores(run)
        for name, s in scores.items():
            row = {}
            for phase, t in truth.items():
                j = t.join(s, on=["step", "sample_id"])
                row[phase] = {"n": j.height, "spearman": spearman(j["tsloo"].to_numpy(), j["score"].to_numpy()),
                              "pearson": pearson(j["tsloo"].to_numpy(), j["score"].to_numpy())}  # fmt: skip
            out["estimators"][name] = row
        out["seconds"] = time.perf_counter() - t0
    out["machine"] = machine_info("cpu")
    print("| estimator | Spearman last epoch | Pearson last | Spearman first epoch | Pearson first |")
    print("|---|---|---|---|---|")
    for name, row in out["estimators"].items():
        la, fi = row["last"], row["first"]
        print(f"| {name} | {la['spearman']:.3f} | {la['pearson']:.3f} | {fi['spearman']:.3f} | {fi['pearson']:.3f} |")
    path = args.out or RESULTS / f"bench_digits_cnn{'_quick' if args.quick else ''}_cpu.json"
    write_json_atomic(path, out)
    return out


if __name__ == "__main__":
    main()
