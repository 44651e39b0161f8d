"""Fidelity of the exact replay scorer and the embedding modes per phase, through dvemb's own pipeline code.

Each regime is a real dvemb run (Lightning training with capture, fp64, sklearn digits, MLP 64 -> 32 -> 10
tanh, batch 32, 1000 training / 300 validation rows, 4 segments) trained with the optimizer named:

* ``sgd-long``: plain SGD, 10 epochs, lr 0.2 (the long regime of bench_fidelity);
* ``momentum``: SGD momentum 0.9, 5 epochs, lr 0.05;
* ``adamw-5ep``: AdamW lr 3e-3, 5 epochs; ``adamw-15ep``: AdamW lr 1e-2, 15 epochs (weight decay 0.01).

Ground truth: exact TSLOO (one occurrence removed, the recorded trajectory replayed through the real
optimizer, dvemb.eval.groundtruth) for ``--points`` occurrences of the FIRST epoch and as many of the
LAST epoch. Estimators, all scored at the final checkpoint:

* ``exact`` — score.mode exact (one reverse sweep through the optimizer's step map; for AdamW the
  removal step taken exactly, ``score.removal: auto``); ``exact-first-order`` — the same sweep with
  the removal linearised too (``score.removal: linear``; reported where the two differ);
* ``sgd-proxy-empirical`` / ``sgd-proxy-fisher-model`` — the SGD recursion of the embedding / direct
  modes on the captured gradients (what dvemb did with every optimizer before the replay scorer),
  unprojected and at 32x32;
* ``adam-empirical`` / ``adam-fisher-model`` — the Adam-aware direct mode (linearised AdamW state,
  dvemb.embed.adam), where the optimizer is AdamW and the store keeps the gradient's own coordinates
  (unprojected, ``32x32-sub``: one coordinate subset, or ``32x32-row``: each row its own columns, the AdamW
  default; D exact on them); a Gaussian ``32x32`` store cannot carry
  Adam's elementwise state (the SGD proxy only; the options for it: benchmarks/bench_adam_projection.py);
* ``momentum-empirical`` / ``momentum-fisher-model`` — the momentum-aware direct mode (SGD momentum linearised
  on (theta, b), dvemb.embed.momentum) on any store;
* ``*-hessian-model`` — the same recursions with ``embed.curvature: hessian``: the exact Hessian of each step in
  the store's coordinates (Hessian-vector products at the replayed parameters, dvemb.embed.hessian) instead of
  a Gauss-Newton model. Unprojected it equals ``exact-first-order`` (tests/test_hessian_curvature.py); on a
  compressed store it measures what the store alone costs.

Reported per phase: Spearman and Pearson vs TSLOO and the least-squares scale (the factor s minimising
||tsloo - s * estimate||; 1 = calibrated). Cost: wall time of the exact sweep over the time of replaying
the same trajectory forward once (the training arithmetic, no capture) and over Lightning's training time.

    OMP_NUM_THREADS=1 python -m benchmarks.bench_exact            # about 10 minutes on 2 cores
    OMP_NUM_THREADS=1 python -m benchmarks.bench_exact --quick    # smoke run
    OMP_NUM_THREADS=1 python -m benchmarks.bench_exact --regimes momentum --no-cost --update   # one regime anew
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from dvemb.config import load_config
from dvemb.embed.curvature import curvature_fn
from dvemb.embed.direct import direct_scores
from dvemb.embed.recorded_state import state_kind
from dvemb.eval.groundtruth import choose_points, tsloo_points
from dvemb.eval.metrics import pearson, spearman
from dvemb.replay.exact import exact_scores, removal_is_step
from dvemb.replay.trajectory import load_trajectory, replay_range
from dvemb.score.run import val_vectors
from dvemb.score.state import state_occurrence_scores
from dvemb.store.gradstore import read_segment
from dvemb.store.rundir import RunDir
from dvemb.store.trajectory import read_schedule
from dvemb.train.run import train

try:  # run as a module (python -m benchmarks.bench_exact) or loaded from a path by the tests
    from benchmarks.common import RESULTS, machine_info, replace_doc_block, write_json_atomic
except ImportError:  # pragma: no cover
    RESULTS = machine_info = replace_doc_block = write_json_atomic = None

ROOT = Path(__file__).resolve().parents[1]
DOC_HEADING = (
    "## Exact replay scorer and Adam-aware modes, per phase\n\n"
    "`python -m benchmarks.bench_exact` (fp64 digits MLP runs through dvemb's own training, replay and scoring "
    "code; TSLOO of first- and last-epoch occurrences; Spearman / Pearson / least-squares scale):\n\n"
)
BASE = [
    "data.subset=1000",
    "data.eval_subset=300",
    "train.precision=64-true",
    "capture.dtype=float64",
    "embed.dtype=float64",
    "embed.segments=4",
    "embed.curvature=fisher",
]
REGIMES = {
    "sgd-long": ["train.epochs=10", "train.lr=0.2"],
    "momentum": ["train.epochs=5", "train.lr=0.05", "train.momentum=0.9"],
    "adamw-5ep": ["train.epochs=5", "train.optimizer=adamw", "train.lr=0.003", "train.weight_decay=0.01"],
    "adamw-15ep": ["train.epochs=15", "train.optimizer=adamw", "train.lr=0.01", "train.weight_decay=0.01"],
}
PROJECTIONS = {
    "full": ["capture.k_a=null", "capture.k_s=null", "capture.kind=kronecker"],
    "32x32": ["capture.k_a=32", "capture.k_s=32", "capture.kind=kronecker"],
    "32x32-sub": ["capture.k_a=32", "capture.k_s=32", "capture.kind=subsample"],
    "32x32-row": ["capture.k_a=32", "capture.k_s=32", "capture.kind=rowwise"],
}


def ls_scale(est: np.ndarray, truth: np.ndarray) -> float:
    """argmin_s ||truth - s * est||^2."""
    return float(est @ truth / max(est @ est, 1e-300))


def phase_metrics(est: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    return {"spearman": spearman(est, truth), "pearson": pearson(est, truth), "scale": ls_scale(est, truth)}


def sgd_proxy(run: RunDir, cfg, curvature: str, blocks: str) -> list[torch.Tensor]:
    """Per-step scores at T of the SGD recursion (direct mode == embedding mode) on the captured gradients."""
    b = run.boundaries
    recs = [r for j in range(len(b) - 1) for r in read_segment(run.grads(j), range(b[j], b[j + 1]), kind="grads")]
    curv = curvature_fn(run, curvature, range(len(b) - 1))
    v = val_vectors(run, cfg, b[-1])
    return [s[:, 0] for s in direct_scores(recs, read_schedule(run), v, torch.float64, curvature=curv, blocks=blocks)]


def _at(scores: list[torch.Tensor], occ: list[tuple[int, int]]) -> np.ndarray:
    return np.array([float(scores[t][p]) for t, p in occ])


def ground_truth(traj, points: int) -> dict[str, tuple[list[tuple[int, int]], np.ndarray]]:
    """Exact TSLOO of ``points`` first-epoch and last-epoch occurrences (the same for every projection:
    capture does not change training)."""
    out = {}
    for phase in ("first", "last"):
        occ = choose_points(traj, points, seed=1, first_epoch=phase == "first", last_epoch=phase == "last")
        out[phase] = (occ, tsloo_points(traj, occ).numpy())
    return out


def run_regime(name: str, projection: str, points: int, workdir: Path, quick: bool, truth=None) -> dict:
    """One trained run and every estimator on it; ``truth`` from an earlier projection of the same regime."""
    sets = BASE + REGIMES[name] + PROJECTIONS[projection]
    if quick:
        sets += ["train.epochs=2", "data.subset=256", "data.eval_subset=64"]
    cfg = load_config(ROOT / "configs" / "digits_mlp.yaml", sets)
    run = RunDir(workdir / f"{name}-{projection}")
    traj, scores, timing = timed_run(cfg, run)
    estimates = {"exact": scores[traj.boundaries[-1]]} if projection == "full" else {}
    if projection == "full" and removal_is_step(traj.spec, "auto"):
        estimates["exact-first-order"] = exact_scores(traj, removal="linear")[traj.boundaries[-1]]
    estimates["sgd-proxy-empirical"] = sgd_proxy(run, cfg, "empirical", "layer")
    estimates["sgd-proxy-fisher-model"] = sgd_proxy(run, cfg, "fisher", "model")
    kind = state_kind(run)
    if not kind:  # plain SGD: the SGD recursion is the run's own
        estimates["sgd-proxy-hessian-model"] = sgd_proxy(run, cfg, "hessian", "model")
    if kind:  # the optimizer's state linearised: AdamW (theta, m, v), momentum (theta, b)
        v = val_vectors(run, cfg, traj.boundaries[-1])
        prefix = "adam" if kind == "adamw" else "momentum"
        for curvature, blocks in (("empirical", "layer"), ("fisher", "model"), ("hessian", "model")):
            embed = cfg.embed.model_copy(update={"curvature": curvature, "blocks": blocks})
            scores = state_occurrence_scores(run, cfg.model_copy(update={"embed": embed}), traj.boundaries[-1], v)
            estimates[f"{prefix}-{curvature}{'-model' if blocks == 'model' else ''}"] = [x[:, 0] for x in scores]
    truth = truth or ground_truth(traj, points)
    phases = {
        phase: {
            "n": len(occ),
            "epoch": traj.epochs[occ[0][0]],
            "estimators": {
                k: phase_metrics(np.array([float(v[t][p]) for t, p in occ]), gt) for k, v in estimates.items()
            },
        }
        for phase, (occ, gt) in truth.items()
    }
    return {
        "regime": name,
        "projection": projection,
        "overrides": sets,
        "steps": traj.num_steps,
        **timing,
        "phases": phases,
        "truth": truth,
    }


COST = {  # the default demo's model (MNIST MLP 784-128-64-10) on a subset, one epoch, as trained (float32)
    "mnist_mlp sgd": ("mnist_mlp.yaml", ["data.subset=4000", "data.eval_subset=500", "train.epochs=1"]),
    "mnist_mlp adamw": (
        "mnist_mlp.yaml",
        ["data.subset=4000", "data.eval_subset=500", "train.epochs=1", "train.optimizer=adamw", "train.lr=0.001"],
    ),
}


def cost_row(name: str, workdir: Path, quick: bool) -> dict:
    """Wall time of the exact sweep vs one forward replay and vs Lightning training (with capture)."""
    file, sets = COST[name]
    if quick:
        sets = [*sets, "data.subset=512"]
    cfg = load_config(ROOT / "configs" / file, sets)
    traj, _, timing = timed_run(cfg, RunDir(workdir / name.replace(" ", "-")))
    return {"regime": name, "steps": traj.num_steps, **timing}


def timed_run(cfg, run: RunDir):
    """Train ``cfg`` into ``run``, replay it forward once and sweep it exactly: (trajectory, exact scores, timings)."""
    t0 = time.perf_counter()
    train(cfg, run, force=True, progress=False)
    t_train = time.perf_counter() - t0
    traj = load_trajectory(run)
    t0 = time.perf_counter()
    replay_range(traj, traj.checkpoints[0], traj.opt_states[0], 0, traj.num_steps)
    t_forward = time.perf_counter() - t0
    t0 = time.perf_counter()
    scores = exact_scores(traj)
    t_exact = time.perf_counter() - t0
    seconds = {"train_lightning": t_train, "replay_forward": t_forward, "exact_sweep": t_exact}
    if removal_is_step(traj.spec, "auto"):  # the same sweep with the removal linearised, for its cost
        t0 = time.perf_counter()
        exact_scores(traj, removal="linear")
        seconds["exact_sweep_linear_removal"] = time.perf_counter() - t0
    timing = {
        "seconds": seconds,
        "exact_over_forward_replay": t_exact / t_forward,
        "exact_over_lightning_training": t_exact / t_train,
    }
    return traj, scores, timing


def phase_cells(first: dict, last: dict) -> str:
    """'Spearman / Pearson / scale' of the first and of the last epoch, as two table cells."""
    return " | ".join(f"{m['spearman']:.3f} / {m['pearson']:.3f} / {m['scale']:.2f}" for m in (first, last))


def table(results: list[dict], costs: list[dict] = ()) -> str:
    lines = [
        "| regime | projection | estimator | first epoch: Spearman / Pearson / scale "
        "| last epoch: Spearman / Pearson / scale |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        first, last = r["phases"]["first"], r["phases"]["last"]
        for est in first["estimators"]:
            cells = phase_cells(first["estimators"][est], last["estimators"][est])
            lines.append(f"| {r['regime']} | {r['projection']} | {est} | {cells} |")
    lines += [
        "",
        "| regime | steps | exact sweep / forward replay | exact sweep / Lightning training "
        "| removal linearised: / forward replay, / Lightning training |",
        "|---|---|---|---|---|",
    ]
    for r in [*(r for r in results if r["projection"] == "full"), *costs]:
        sec = r["seconds"]
        lin = sec.get("exact_sweep_linear_removal")
        linear = (
            "same sweep"
            if lin is None
            else (f"{lin / sec['replay_forward']:.2f}x, {lin / sec['train_lightning']:.2f}x")
        )
        lines.append(
            f"| {r['regime']} | {r['steps']} | {r['exact_over_forward_replay']:.2f}x | "
            f"{r['exact_over_lightning_training']:.2f}x | {linear} |"
        )
    return "\n".join(lines)


README_RUNS = {
    "sgd-long": "SGD, 10 epochs, lr 0.2",
    "momentum": "SGD momentum 0.9, 5 epochs",
    "adamw-5ep": "AdamW, 5 epochs, lr 3e-3",
    "adamw-15ep": "AdamW, 15 epochs, lr 1e-2",
}


CURVATURE_NAMES = {"empirical": "empirical Fisher", "fisher": "GGN", "hessian": "Hessian"}


def readme_table(results: list[dict], peer: dict | None) -> str:
    """README's mode table: Spearman first / last epoch of exact mode and of the best embedding-mode
    curvature (unprojected, and at 32x32), plus dattri-llm's row from ``peer`` (bench_peer_adamw JSON)."""
    cells = {(r["regime"], r["projection"]): r["phases"] for r in results}

    def sp(phases: dict, est: str) -> str:
        return " / ".join(f"{phases[ph]['estimators'][est]['spearman']:.3f}" for ph in ("first", "last"))

    def best(phases: dict) -> str:
        """The estimator whose worse phase ranks best, with its curvature named."""
        names = phases["last"]["estimators"]
        for prefix, label in (("adam-", "Adam-aware "), ("momentum-", "momentum-aware "), ("sgd-proxy", "")):
            pool = [k for k in names if k.startswith(prefix)]
            if pool:
                k = max(pool, key=lambda e: min(phases[ph]["estimators"][e]["spearman"] for ph in ("first", "last")))
                curvature = next(v for c, v in CURVATURE_NAMES.items() if c in k)
                return f"{label}{sp(phases, k)} ({curvature})"
        raise ValueError("no embedding-mode estimator")

    lines = [
        "| run | exact | embedding / direct (best curvature, unprojected) | embedding / direct at 32×32, the default "
        "store (SGD: Gaussian Kronecker; AdamW: per-row subsample) | at 32×32 per-row subsample (`capture.kind: "
        "rowwise`) |",
        "|---|---|---|---|---|",
    ]
    for regime, label in README_RUNS.items():
        full = cells.get((regime, "full"))
        proj = cells.get((regime, "32x32-row" if regime.startswith("adamw") else "32x32"))
        row = cells.get((regime, "32x32-row"))
        if full is None or proj is None:
            continue
        first_order = ""
        if "exact-first-order" in full["last"]["estimators"]:
            first_order = f" (removal linearised: {sp(full, 'exact-first-order')})"
        per_row = best(row) if row is not None else "—"
        lines.append(f"| {label} | {sp(full, 'exact')}{first_order} | {best(full)} | {best(proj)} | {per_row} |")
    if peer:
        runs = {r["regime"]: r["phases"] for r in peer["results"]}
        est = "dattri-llm AdamWInfluence (propagation=train)"
        row = "; ".join(sp(runs[k], est) for k in ("adamw-5ep", "adamw-15ep") if k in runs)
        lines.append(
            f"| dattri-llm {peer['dattri_llm_version']} AdamWInfluence (peer), AdamW 5 / 15 epochs | — | {row} "
            "| — | — |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny runs (smoke test)")
    ap.add_argument("--points", type=int, default=100, help="TSLOO occurrences per phase")
    ap.add_argument("--regimes", nargs="*", default=list(REGIMES))
    ap.add_argument("--projections", nargs="*", default=list(PROJECTIONS))
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/)")
    ap.add_argument("--no-cost", dest="cost", action="store_false", help="skip the cost rows on the MNIST demo model")
    ap.add_argument(
        "--update",
        action="store_true",
        help="rerun only --regimes (and the cost rows unless --no-cost); keep the other rows of the JSON",
    )
    args = ap.parse_args()
    torch.set_default_dtype(torch.float64)
    points = 8 if args.quick else args.points
    results, costs = [], []
    with tempfile.TemporaryDirectory(prefix="bench-exact-") as tmp:
        for name in COST if args.cost else ():
            costs.append(cost_row(name, Path(tmp), args.quick))
            print(table([], costs[-1:]), flush=True)
        for name in args.regimes:
            truth = None
            for projection in args.projections:
                r = run_regime(name, projection, points, Path(tmp), args.quick, truth)
                truth = r.pop("truth")
                results.append(r)
                print(table([r]), flush=True)
    payload = {
        "machine": machine_info("cpu"),
        "quick": args.quick,
        "points": points,
        "results": results,
        "cost": costs,
    }
    out = args.out or RESULTS / f"bench_exact{'_quick' if args.quick else ''}_cpu.json"
    if args.update and out.exists():
        kept = json.loads(out.read_text())
        rerun = {(r["regime"], r["projection"]) for r in results}
        results = [r for r in kept["results"] if (r["regime"], r["projection"]) not in rerun] + results
        results.sort(key=lambda r: (list(REGIMES).index(r["regime"]), list(PROJECTIONS).index(r["projection"])))
        costs = costs or kept["cost"]
        payload |= {"results": results, "cost": costs, "updated": sorted(f"{a}/{b}" for a, b in rerun)}
    write_json_atomic(out, payload)
    if not args.quick:
        replace_doc_block(ROOT / "docs" / "RESULTS.md", "bench_exact", table(results, costs), missing=DOC_HEADING)
        peer = RESULTS / "bench_peer_adamw_cpu.json"
        peer = json.loads(peer.read_text()) if peer.exists() else None
        replace_doc_block(ROOT / "README.md", "readme_modes", readme_table(results, peer))
    print(table(results, costs))


if __name__ == "__main__":
    main()
