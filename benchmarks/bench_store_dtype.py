"""What a half-precision gradient store costs in fidelity: Spearman vs exact TSLOO per store dtype.

The runs of ``bench_exact`` (sklearn digits, MLP 64 -> 32 -> 10 tanh, 1000 training / 300 validation rows,
trained in float64, 4 segments, Fisher curvature vectors captured) with the demo's 32x32 Gaussian projection,
trained once per ``capture.dtype`` — float64, float32, float16, bfloat16 — which changes only how the
projected gradients and curvature vectors are stored (training is identical; checked). Ground truth: exact
TSLOO of ``--points`` first-epoch and as many last-epoch occurrences (``bench_exact.ground_truth``: one
occurrence removed, the recorded trajectory replayed). Estimators (the direct mode on the stored vectors,
scored at the final checkpoint, float64 recursion): ``empirical`` (empirical Fisher, per layer) and
``fisher-model`` (stored Fisher vectors, one block). ``score.mode=exact`` reads no store (unchanged by it).

    OMP_NUM_THREADS=1 python -m benchmarks.bench_store_dtype            # about 5 minutes on 2 cores
    OMP_NUM_THREADS=1 python -m benchmarks.bench_store_dtype --quick    # smoke run

Writes benchmarks/results/bench_store_dtype_cpu.json and the table block in docs/SCALE.md.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch

from benchmarks.bench_exact import BASE, REGIMES, ground_truth, phase_metrics, sgd_proxy
from benchmarks.common import RESULTS, machine_info, replace_doc_block, write_json_atomic
from dvemb.config import load_config
from dvemb.eval.metrics import spearman
from dvemb.replay.trajectory import load_trajectory
from dvemb.store.rundir import RunDir, load_tensors
from dvemb.train.run import train

ROOT = Path(__file__).resolve().parents[1]
STORES = ("float64", "float32", "float16", "bfloat16")
PROJECTION = ["capture.k_a=32", "capture.k_s=32", "capture.kind=kronecker"]
RUNS = {"sgd-long": REGIMES["sgd-long"], "sgd-3ep": ["train.epochs=3", "train.lr=0.1"]}
ESTIMATORS = {"empirical": ("empirical", "layer"), "fisher-model": ("fisher", "model")}


def store_bytes(run: RunDir) -> int:
    return sum(p.stat().st_size for p in (run.root / "grads").glob("*.arrow"))


def run_regime(name: str, points: int, workdir: Path, quick: bool) -> dict:
    """Every store dtype on one regime; TSLOO from the first run (the trajectory is the same for all)."""
    rows, truth, reference, flat = {}, None, None, {}
    for dtype in STORES:
        sets = BASE + RUNS[name] + PROJECTION + [f"capture.dtype={dtype}"]
        if quick:
            sets += ["train.epochs=1", "data.subset=256", "data.eval_subset=64"]
        cfg = load_config(ROOT / "configs" / "digits_mlp.yaml", sets)
        run = RunDir(workdir / f"{name}-{dtype}")
        train(cfg, run, force=True, progress=False)
        final = load_tensors(run.checkpoint(run.boundaries[-1]))
        if reference is None:
            reference = final
            traj = load_trajectory(run)
            truth = ground_truth(traj, points)
        elif any(not torch.equal(final[k], reference[k]) for k in reference):
            raise SystemExit(f"{name}: capture.dtype={dtype} changed training (final checkpoint differs)")
        est = {k: sgd_proxy(run, cfg, c, b) for k, (c, b) in ESTIMATORS.items()}
        flat[dtype] = {k: torch.cat(v).numpy() for k, v in est.items()}
        rows[dtype] = {
            "store_bytes": store_bytes(run),
            "phases": {
                phase: {k: phase_metrics(np.array([float(v[t][p]) for t, p in occ]), gt) for k, v in est.items()}
                for phase, (occ, gt) in truth.items()
            },
        }
    for dtype, r in rows.items():  # every occurrence's score vs the float32 store's
        r["vs_float32"] = {
            k: {
                "spearman": spearman(flat[dtype][k], flat["float32"][k]),
                "max_abs_diff_over_max": float(
                    np.abs(flat[dtype][k] - flat["float32"][k]).max() / np.abs(flat["float32"][k]).max()
                ),
            }
            for k in ESTIMATORS
        }
    return {"regime": name, "overrides": BASE + RUNS[name] + PROJECTION, "points": points, "stores": rows}


def table(results: list[dict]) -> str:
    lines = [
        "| regime | store dtype | store bytes | estimator | Spearman vs TSLOO first / last epoch "
        "| change vs float32 first / last | all occurrences vs float32: Spearman / max rel. diff |",
        "|---|---|---:|---|---|---|---|",
    ]
    for r in results:
        base = r["stores"]["float32"]["phases"]
        for dtype, s in r["stores"].items():
            for k in ESTIMATORS:
                f, la = s["phases"]["first"][k]["spearman"], s["phases"]["last"][k]["spearman"]
                df, dl = f - base["first"][k]["spearman"], la - base["last"][k]["spearman"]
                v = s["vs_float32"][k]
                lines.append(
                    f"| {r['regime']} | {dtype} | {s['store_bytes']:,} | {k} | {f:.3f} / {la:.3f} | "
                    f"{df:+.3f} / {dl:+.3f} | {v['spearman']:.5f} / {v['max_abs_diff_over_max']:.1e} |"
                )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny runs (smoke test)")
    ap.add_argument("--points", type=int, default=100, help="TSLOO occurrences per phase")
    ap.add_argument("--regimes", nargs="*", default=list(RUNS))
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/)")
    args = ap.parse_args()
    torch.set_default_dtype(torch.float64)
    points = 8 if args.quick else args.points
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-store-dtype-") as tmp:
        for name in args.regimes:
            results.append(run_regime(name, points, Path(tmp), args.quick))
            print(table(results[-1:]), flush=True)
    name = "bench_store_dtype_quick_cpu.json" if args.quick else "bench_store_dtype_cpu.json"
    out = args.out or RESULTS / name
    write_json_atomic(out, {"machine": machine_info("cpu"), "quick": args.quick, "results": results})
    print(f"wrote {out}")
    if not args.quick and args.out is None:
        replace_doc_block(ROOT / "docs" / "SCALE.md", "bench_store_dtype", table(results))


if __name__ == "__main__":
    main()
