"""Peer row for AdamW: dattri-llm 0.1.0's AdamW-influence on the same recorded dvemb runs as bench_exact.

The runs are bench_exact's AdamW regimes (``adamw-5ep``: 5 epochs, lr 3e-3; ``adamw-15ep``: 15 epochs,
lr 1e-2; weight decay 0.01; sklearn digits, MLP 64 -> 32 -> 10 tanh, batch 32, 1000 training / 300
validation rows, fp64, unprojected capture), trained by dvemb (Lightning) and then handed to dattri-llm
as an *externally recorded* run through its public store-then-attribute path:

* train side: every step's per-sample gradient contributions ``g_z = w_z grad l_z`` as dvemb stored them
  (``dvemb.store.gradstore.read_segment``), written with dattri-llm's own ``GradientStorageManager``
  (one dense ``Gradient`` record per step, rows keyed by sample id). The layout is the same on both
  sides: a Linear layer's ``[W[o, :], b[o]]`` row after row;
* dynamics: the AdamW moments before and after every step (what dattri-llm's ``OptimizerStateCallback``
  records during training), taken from dvemb's exact replay of the run (``Trajectory.step`` from the
  recorded boundary state; every recorded boundary is reproduced to 1e-10), with the step count, LR,
  betas, eps and weight decay of that step, assembled by dattri-llm's ``assemble_dynamics``;
* query: the gradient of the validation objective (mean loss over the 300 validation rows) at theta_T;
* ``AdamWInfluenceAttributor(args).attribute_from_cache(train, test, dynamics=..., loss_reduction="mean")``
  with the default ``propagation="train"`` (the paper's ``W`` summary; the query-side sweep
  ``propagation="test"`` is run too as a consistency check and timed).

dattri-llm scores ``-grad(z')^T W Z_push(z)`` with ``Z_push`` the first-order response of the optimizer
state to *removing* z, i.e. ``l_val(theta_T) - l_val(theta'_T)``; dvemb's TSLOO is
``l_val(theta'_T) - l_val(theta_T)`` (positive = helped). The scores are compared after multiplying by
-1 (:data:`SIGN`), so a Spearman of +1 means the same ranking as TSLOO. dattri-llm computes in float32
whatever it is given (its kernels call ``.float()``), and it runs under torch's default float32 dtype
as it expects; the run, its replay and the ground truth are fp64.

Ground truth and metrics are bench_exact's: exact TSLOO (dvemb.eval.groundtruth) for ``--points``
occurrences of the first and of the last epoch (``choose_points(traj, n, seed=1, ...)``), Spearman /
Pearson / least-squares scale per phase. dvemb's exact mode on the same occurrences is reported beside
it as a reference (its full table is bench_exact's).

    pip install -r benchmarks/requirements-peer.txt
    OMP_NUM_THREADS=1 python -m benchmarks.bench_peer_adamw            # both regimes, 100 points per phase
    OMP_NUM_THREADS=1 python -m benchmarks.bench_peer_adamw --quick    # smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # dattri-llm draws tqdm bars

import numpy as np
import torch

from benchmarks.bench_exact import BASE, PROJECTIONS, REGIMES, ROOT, phase_cells, phase_metrics
from benchmarks.common import RESULTS, machine_info, replace_doc_block, write_json_atomic
from dvemb.config import load_config
from dvemb.eval.groundtruth import choose_points, tsloo_points
from dvemb.replay.exact import exact_scores
from dvemb.replay.optim import Params, State
from dvemb.replay.trajectory import Trajectory, check_boundary, load_trajectory
from dvemb.store.gradstore import read_segment
from dvemb.store.rundir import RunDir
from dvemb.train.run import train
from dvemb.types import StepGrads

ADAMW_REGIMES = ("adamw-5ep", "adamw-15ep")
QUICK = ["train.epochs=2", "data.subset=256", "data.eval_subset=64"]  # bench_exact's --quick sizes
PROPAGATIONS = ("train", "test")  # dattri-llm's default first
SIGN = -1.0  # dattri-llm's score is l_val(theta_T) - l_val(theta'_T); TSLOO is the opposite difference


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def layer_params(params: Params, layers: dict[str, int]) -> dict[str, list[str]]:
    """Parameter names behind each stored layer (``weight`` then ``bias``), checked against its width."""
    out = {}
    for name, width in layers.items():
        names = [n for n in (f"{name}.weight", f"{name}.bias") if n in params]
        got = sum(params[n].numel() for n in names)
        if not names or got != width:
            raise SystemExit(f"layer {name!r}: stored width {width}, parameters {names} hold {got} (Linear only)")
        out[name] = names
    return out


def flat(tensors: dict[str, torch.Tensor], names: list[str], suffix: str = "") -> torch.Tensor:
    """A Linear layer's tensors in dattri-llm's materialized layout: ``[W[o, :], b[o]]`` row after row, flat."""
    w = tensors[names[0] + suffix]
    if len(names) == 2:
        w = torch.cat([w, tensors[names[1] + suffix][:, None]], dim=1)
    return w.reshape(-1)


def moments(state: State, names: list[str], width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(exp_avg, exp_avg_sq) of one layer; zeros before the first step (no state yet)."""
    if not state:
        return torch.zeros(width), torch.zeros(width)
    return flat(state, names, "::exp_avg"), flat(state, names, "::exp_avg_sq")


def dattri_dynamics(
    traj: Trajectory, recs: list[StepGrads], layers: dict[str, list[str]]
) -> tuple[dict[int, dict], Params, float]:
    """Per-step AdamW dynamics in dattri-llm's format, theta_T, and the worst layout deviation.

    Replays every step exactly (each recorded boundary reproduced, checked) to read the moments before
    and after it. The deviation is max over steps and layers of |sum_z g_z - g_t| / max|g_t|, with g_t the
    batch gradient that dattri-llm recovers from the moments, ``(m_post - b1 m_pre) / (1 - b1)``: it is
    ~1e-15 only if dvemb's stored rows and the moments share one coordinate layout.
    """
    from dattri_llm.gradient.callbacks.optimizer_state_callback import assemble_dynamics

    b1 = traj.spec.betas[0]
    widths = {name: recs[0].grads[name].shape[1] for name in layers}
    first = next(iter(layers.values()))[0]  # a parameter whose AdamW step count is read
    params, state = traj.checkpoints[0], traj.opt_states[0]
    dyn, worst = {}, 0.0
    for t in range(traj.num_steps):
        nxt, new = traj.step(params, state, t)
        if t + 1 in traj.checkpoints:
            check_boundary(traj, t + 1, nxt, new)  # ReplayError unless the replay is the recorded run
        h = traj.steps[t].hyper
        if len(set(h.lr)) > 1 or len(set(h.weight_decay)) > 1:
            raise SystemExit(f"step {t}: per-group LR / decay {h}; dattri-llm reads one group's hyper-parameters")
        count = int(new[f"{first}::step"])
        side = {"lr": h.lr[0], "betas": traj.spec.betas, "eps": traj.spec.eps, "weight_decay": h.weight_decay[0]}
        pre = {name: moments(state, p, widths[name]) for name, p in layers.items()}
        post = {name: moments(new, p, widths[name]) for name, p in layers.items()}
        dyn[t] = assemble_dynamics({"layers": pre, "step": count - 1, **side}, {"layers": post, "step": count, **side})
        for name in layers:
            g_t = (post[name][0] - b1 * pre[name][0]) / (1 - b1)
            dev = float((recs[t].grads[name].sum(0) - g_t).abs().max() / g_t.abs().max())
            worst = max(worst, dev)
        params, state = nxt, new
    return dyn, params, worst


def query_gradient(traj: Trajectory, params: Params, layers: dict[str, list[str]]) -> dict[str, torch.Tensor]:
    """grad of the validation objective at theta_T, per layer [1, width] (autograd, fp64)."""
    p = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    g = dict(zip(p, torch.autograd.grad(traj.val_loss(p), list(p.values()))))
    return {name: flat(g, names).reshape(1, -1) for name, names in layers.items()}


def write_stores(root: Path, recs: list[StepGrads], query: dict[str, torch.Tensor], final_step: int) -> None:
    """dvemb's per-step rows into a dattri-llm train store, the query into a test store (dattri-llm's API)."""
    from dattri_llm import Gradient, GradientRecord, GradientStorageManager

    def grad(data: dict[str, torch.Tensor]) -> Gradient:
        return Gradient(
            representation=dict.fromkeys(data, "materialized"), data=data, layer_types=dict.fromkeys(data, "nn.Linear")
        )

    GradientStorageManager(str(root / "train")).save_bulk(
        [
            GradientRecord(step=r.step, input_hash=[str(int(z)) for z in r.sample_ids], gradient=grad(dict(r.grads)))
            for r in recs
        ]
    )
    GradientStorageManager(str(root / "test")).save_bulk(
        [GradientRecord(step=final_step, input_hash=["val"], gradient=grad(query))]
    )


def dattri_scores(root: Path, dyn: dict[int, dict], final_step: int, propagation: str) -> tuple[dict, float]:
    """{(step, sample id): score in TSLOO's sign} from AdamWInfluenceAttributor, and its wall time."""
    from dattri_llm import AdamWInfluenceAttributor, AttributionArguments

    att = AdamWInfluenceAttributor(AttributionArguments(output_dir=str(root / f"scores-{propagation}")))
    with default_dtype(torch.float32):  # dattri-llm builds its float32 operators with the default dtype
        t0 = time.perf_counter()
        score = att.attribute_from_cache(
            str(root / "train"),
            str(root / "test"),
            dynamics=dyn,
            loss_reduction="mean",
            propagation=propagation,
            final_step=final_step,
        )
        seconds = time.perf_counter() - t0
    col = score.scores[:, 0].to(torch.float64) * SIGN
    return {(int(s), int(z)): float(v) for s, z, v in zip(score.row_steps, score.row_train_ids, col)}, seconds


def run_regime(name: str, points: int, workdir: Path, quick: bool) -> dict:
    sets = BASE + REGIMES[name] + PROJECTIONS["full"] + (QUICK if quick else [])
    cfg = load_config(ROOT / "configs" / "digits_mlp.yaml", sets)
    run = RunDir(workdir / name)
    t0 = time.perf_counter()
    train(cfg, run, force=True, progress=False)
    t_train = time.perf_counter() - t0
    traj = load_trajectory(run)
    b = run.boundaries
    recs = [r for j in range(len(b) - 1) for r in read_segment(run.grads(j), range(b[j], b[j + 1]), kind="grads")]
    layers = layer_params(traj.checkpoints[0], {n: g.shape[1] for n, g in recs[0].grads.items()})

    t0 = time.perf_counter()
    dyn, theta_t, layout_dev = dattri_dynamics(traj, recs, layers)
    t_dyn = time.perf_counter() - t0
    root = workdir / f"{name}-dattri-llm"
    t0 = time.perf_counter()
    write_stores(root, recs, query_gradient(traj, theta_t, layers), traj.num_steps)
    t_store = time.perf_counter() - t0
    peer, t_peer = {}, {}
    for prop in PROPAGATIONS:
        peer[prop], t_peer[prop] = dattri_scores(root, dyn, traj.num_steps, prop)
    t0 = time.perf_counter()
    exact = exact_scores(traj)[traj.boundaries[-1]]
    t_exact = time.perf_counter() - t0

    def peer_at(prop: str, occ: list[tuple[int, int]]) -> np.ndarray:
        return np.array([peer[prop][(t, int(traj.steps[t].sample_ids[p]))] for t, p in occ])

    phases = {}
    for phase in ("first", "last"):
        occ = choose_points(traj, points, seed=1, first_epoch=phase == "first", last_epoch=phase == "last")
        t0 = time.perf_counter()
        truth = tsloo_points(traj, occ).numpy()
        t_truth = time.perf_counter() - t0
        est = {f"dattri-llm AdamWInfluence (propagation={p})": peer_at(p, occ) for p in PROPAGATIONS}
        est["dvemb exact (reference)"] = np.array([float(exact[t][p]) for t, p in occ])
        phases[phase] = {
            "n": len(occ),
            "epoch": traj.epochs[occ[0][0]],
            "tsloo_seconds": t_truth,
            "tsloo_abs_mean": float(np.abs(truth).mean()),
            "estimators": {k: phase_metrics(v, truth) for k, v in est.items()},
        }
    both = [(peer["train"][k], peer["test"][k]) for k in peer["train"]]
    agree = max(abs(a - c) for a, c in both) / max(abs(a) for a, _ in both)
    return {
        "regime": name,
        "overrides": sets,
        "steps": traj.num_steps,
        "occurrences_scored": len(peer["train"]),
        "layout_check_rel": layout_dev,
        "propagations_rel_diff": agree,
        "seconds": {
            "train_lightning": t_train,
            "dynamics_replay": t_dyn,
            "dattri_llm_store_write": t_store,
            **{f"dattri_llm_attribute_{p}": t_peer[p] for p in PROPAGATIONS},
            "dvemb_exact_sweep": t_exact,
        },
        "phases": phases,
    }


def table(results: list[dict]) -> str:
    lines = [
        "| regime | estimator | first epoch: Spearman / Pearson / scale | last epoch: Spearman / Pearson / scale |",
        "|---|---|---|---|",
    ]
    for r in results:
        first, last = r["phases"]["first"], r["phases"]["last"]
        for est in first["estimators"]:
            lines.append(
                f"| {r['regime']} | {est} | {phase_cells(first['estimators'][est], last['estimators'][est])} |"
            )
    lines += [
        "",
        "| regime | steps | Lightning training s | dattri-llm attribute s (train / test propagation) "
        "| store write s | moments replay s | dvemb exact sweep s | layout check | train vs test propagation |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        s = r["seconds"]
        lines.append(
            f"| {r['regime']} | {r['steps']} | {s['train_lightning']:.1f} | {s['dattri_llm_attribute_train']:.1f} / "
            f"{s['dattri_llm_attribute_test']:.1f} | {s['dattri_llm_store_write']:.2f} | {s['dynamics_replay']:.2f} "
            f"| {s['dvemb_exact_sweep']:.1f} | {r['layout_check_rel']:.1e} | {r['propagations_rel_diff']:.1e} |"
        )
    return "\n".join(lines)


def doc_body(payload: dict) -> str:
    m = payload["machine"]
    return (
        f"Measured {m['date']} on {m['cpu_model']} ({m['torch_threads']} torch thread(s)), torch "
        f"{m['torch_version']}, dattri-llm {payload['dattri_llm_version']}; TSLOO of {payload['points']} "
        "first-epoch and as many last-epoch occurrences per run (bench_exact's points and metrics). dattri-llm's "
        "scores are multiplied by -1 (its sign is l_val(theta_T) - l_val(theta'_T)); it computes in float32. "
        "Layout check: max |sum_z g_z - g_t| / max |g_t| over steps, g_t recovered from the moments as "
        "dattri-llm does. Raw JSON: `benchmarks/results/bench_peer_adamw_cpu.json`. Command:\n\n"
        "```bash\npip install -r benchmarks/requirements-peer.txt\n"
        "OMP_NUM_THREADS=1 python -m benchmarks.bench_peer_adamw\n```\n\n" + table(payload["results"])
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny run of adamw-5ep (smoke test)")
    ap.add_argument("--points", type=int, default=100, help="TSLOO occurrences per phase")
    ap.add_argument("--regimes", nargs="*", default=list(ADAMW_REGIMES), choices=ADAMW_REGIMES)
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/)")
    args = ap.parse_args()
    try:
        import dattri_llm
    except ImportError as exc:  # the peers are benchmark-only, never dvemb dependencies
        raise SystemExit("bench_peer_adamw needs the peers: pip install -r benchmarks/requirements-peer.txt") from exc
    torch.set_default_dtype(torch.float64)
    points = 8 if args.quick else args.points
    regimes = args.regimes[:1] if args.quick else args.regimes
    results = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-peer-adamw-") as tmp:
        for name in regimes:
            results.append(run_regime(name, points, Path(tmp), args.quick))
            print(table(results[-1:]), flush=True)
    payload = {
        "machine": machine_info("cpu"),
        "dattri_llm_version": dattri_llm.__version__,
        "quick": args.quick,
        "points": points,
        "sign_applied_to_dattri_llm": SIGN,
        "seconds": time.perf_counter() - t0,
        "results": results,
    }
    out = args.out or RESULTS / f"bench_peer_adamw{'_quick' if args.quick else ''}_cpu.json"
    write_json_atomic(out, payload)
    if not args.quick:
        heading = "## Peer: dattri-llm AdamW-influence on the recorded AdamW runs (`bench_peer_adamw`)\n\n"
        replace_doc_block(ROOT / "docs" / "RESULTS.md", "bench_peer_adamw", doc_body(payload), missing=heading)
    print(table(results))


if __name__ == "__main__":
    main()
