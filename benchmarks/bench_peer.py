"""Peer comparison: dvemb vs dattri 0.3.0 (DVEmbAttributor, TracInAttributor) in one run.

Same model, data, order and ground truth as ``bench_fidelity``: sklearn digits, MLP 64 -> 32 -> 10
(tanh), plain SGD, batch 32 (w = 1/32), 1000 training / 300 validation samples, fp64, the *short*
(3 epochs, lr 0.07) and *long* (10 epochs, lr 0.3) regimes. Ground truth: exact TSLOO of 320
last-epoch occurrences (and all-epoch LOO of 64 samples) by replay, as in ``bench_fidelity``.

Every method trains the model itself, in place, from the same theta_0 through the same recorded
batches (the final parameters are checked against the recorded trajectory), and is timed as

* **capture** — wall time of the training loop *with* the method's capture minus the same loop
  without it (dvemb: ``GradientCapture`` hooks riding the training backward, plus the Fisher
  vectors when curvature = fisher; dattri DVEmb: ``cache_gradients`` before every optimizer step;
  dattri TracIn: keeping the checkpoint state dicts);
* **embed** — dvemb ``embed_steps`` / dattri ``DVEmbAttributor.cache()`` (none for direct mode and
  TracIn);
* **score** — validation gradients + scores of every occurrence (dvemb ``validation_gradients`` +
  ``dot_scores``, or ``direct_scores`` which embeds and scores in one pass; dattri
  ``attribute(test_loader, epoch=last)``, per-test-sample gradients averaged over the 300 columns).

Median of ``--repeats`` runs per phase. dvemb is block-diagonal (one M per Linear layer, bias
folded in as an extra input); dattri DVEmb keeps one full M over all tracked parameters.

Install the peers into the benchmark environment only (not dvemb dependencies)::

    pip install -r benchmarks/requirements-peer.txt
    OMP_NUM_THREADS=1 python -m benchmarks.bench_peer            # writes benchmarks/results/bench_peer_cpu.json
    OMP_NUM_THREADS=1 python -m benchmarks.bench_peer --quick    # smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # dattri draws tqdm bars; keep the timings clean

import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from benchmarks.bench_fidelity import REGIMES, B, Experiment, ground_truth, train, val_batch
from benchmarks.common import RESULTS, machine_info, replace_doc_block, write_json_atomic
from dvemb.capture.fisher import fisher_vectors
from dvemb.capture.hooks import GradientCapture
from dvemb.embed.curvature import as_curvature
from dvemb.embed.direct import direct_scores
from dvemb.embed.segments import embed_steps
from dvemb.eval.metrics import pearson, spearman
from dvemb.models import MLP, MLPConfig
from dvemb.score.scores import dot_scores
from dvemb.score.validation import validation_gradients
from dvemb.task import Task, masked_cross_entropy
from dvemb.types import ProjectionConfig

ROOT = Path(__file__).resolve().parents[1]
F64 = torch.float64
# dvemb per-layer (k_a, k_s); dattri's matched Kronecker projection uses k per side, n_layers * k^2 total.
PROJECTIONS = {"full": None, "32x32": 32, "8x8": 8}
N_LAYERS = 2


# ----------------------------------------------------------------------------------------------------------
# training loops (in place, on a real nn.Module, the same arithmetic as replay.sgd_step)


def fresh_model(exp: Experiment) -> MLP:
    model = MLP(MLPConfig(d_in=64, hidden=(32,), n_classes=10, activation="tanh"))
    with torch.no_grad():
        for k, v in model.named_parameters():
            v.copy_(exp.params[0][k])
    return model


def sgd_update(model: MLP, batch, lr: float, ctx: Callable | None = None) -> None:
    """One in-place SGD step; ``ctx()`` (a context manager) wraps its forward + backward."""
    model.zero_grad(set_to_none=True)
    with ctx() if ctx is not None else contextlib.nullcontext():
        (batch.weights * masked_cross_entropy(model(batch.x), batch.y)).sum().backward()
    with torch.no_grad():
        for p in model.parameters():
            p.sub_(lr * p.grad)


def final_gap(exp: Experiment, model: MLP) -> float:
    """Max |theta_T(this loop) - theta_T(recorded)|: every method must train the identical trajectory."""
    return max(float((p.detach() - exp.params[-1][k]).abs().max()) for k, p in model.named_parameters())


def train_plain(exp: Experiment) -> tuple[float, MLP]:
    model = fresh_model(exp)
    t0 = time.perf_counter()
    for t, b in enumerate(exp.batches):
        sgd_update(model, b, exp.schedule.at(t)[0])
    return time.perf_counter() - t0, model


# ----------------------------------------------------------------------------------------------------------
# dvemb


def run_dvemb(exp: Experiment, k: int | None, curvature: str, blocks: str = "layer", kind: str = "kronecker") -> dict:
    """Capture during training, then both modes (embedding: embed_steps + dot_scores; direct)."""
    model = fresh_model(exp)
    cap = GradientCapture(model, ProjectionConfig(k_a=k, k_s=k, dtype="float64", kind=kind))
    records, curv = [], {}
    t0 = time.perf_counter()
    for t, b in enumerate(exp.batches):
        if curvature == "fisher":  # the Fisher vectors at theta_t, formed during training (as the callback does)
            curv[t] = as_curvature(fisher_vectors(model, cap, b.x, b.weights, "fisher", step=t))
        sgd_update(model, b, exp.schedule.at(t)[0], ctx=lambda b=b: cap.micro_batch(b.sample_ids, b.weights))
        records.append(cap.collect(step=t))
    train_s = time.perf_counter() - t0
    fn = (lambda rec: curv[rec.step]) if curvature == "fisher" else None

    t0 = time.perf_counter()
    embs, _ = embed_steps(records, exp.schedule, dtype=F64, curvature=fn, blocks=blocks)
    embed_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    v = validation_gradients(Task(), model, cap, [val_batch(exp.val)])
    emb_scores = torch.cat([s[:, 0] for s in dot_scores(embs, v)])
    score_emb_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    v = validation_gradients(Task(), model, cap, [val_batch(exp.val)])
    dir_scores = torch.cat(
        [s[:, 0] for s in direct_scores(records, exp.schedule, v, dtype=F64, curvature=fn, blocks=blocks)]
    )
    direct_s = time.perf_counter() - t0
    cap.remove()
    dim = sum(g.shape[1] for g in records[0].grads.values())
    agree = float((emb_scores - dir_scores).abs().max() / emb_scores.abs().max())
    return {
        "train_s": train_s,
        "embed_s": embed_s,
        "score_emb_s": score_emb_s,
        "direct_s": direct_s,
        "occ_embedding": emb_scores,
        "occ_direct": dir_scores,
        "dim": dim,
        "emb_vs_direct_rel": agree,
        "theta_gap": final_gap(exp, model),
    }


# ----------------------------------------------------------------------------------------------------------
# dattri


def _loss_params(model: MLP):
    def f(params, data):  # dattri "none" signature: one sample under vmap
        x, y = data
        return F.cross_entropy(torch.func.functional_call(model, params, (x.unsqueeze(0),)), y.unsqueeze(0))

    return f


def _loss_model(model, data, device):  # dattri factorization signature: the batch mean (dattri rescales by B)
    x, y = data
    return F.cross_entropy(model(x.to(device)), y.to(device))


def run_dattri_dvemb(exp: Experiment, factorization: str, proj_dim: int | None) -> dict:
    from dattri.algorithm.dvemb import DVEmbAttributor
    from dattri.task import AttributionTask

    model = fresh_model(exp)
    loss = _loss_params(model) if factorization == "none" else _loss_model
    task = AttributionTask(loss_func=loss, model=model, checkpoints=[model.state_dict()])
    att = DVEmbAttributor(task=task, proj_dim=proj_dim, factorization_type=factorization)
    spe = exp.steps_per_epoch
    t0 = time.perf_counter()
    for t, b in enumerate(exp.batches):
        lr = exp.schedule.at(t)[0]
        att.cache_gradients(epoch=t // spe, batch_data=(b.x, b.y), indices=b.sample_ids, learning_rate=lr)
        sgd_update(model, b, lr)
    train_s = time.perf_counter() - t0
    model.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    att.cache()
    embed_s = time.perf_counter() - t0
    last = exp.epochs - 1
    n_val = len(exp.val[1])
    loader = DataLoader(TensorDataset(*exp.val), batch_size=n_val, shuffle=False)
    t0 = time.perf_counter()
    per_sample_last = att.attribute(loader, epoch=last).mean(dim=1)
    score_s = time.perf_counter() - t0
    per_sample_all = att.attribute(loader, epoch=None).mean(dim=1)  # all-epoch values (untimed)
    dim = att.embeddings[last].shape[1]
    return {
        "train_s": train_s,
        "embed_s": embed_s,
        "score_s": score_s,
        "per_sample_last": per_sample_last.detach(),
        "per_sample_all": per_sample_all.detach(),
        "dim": dim,
        "theta_gap": final_gap(exp, model),
    }


def run_dattri_tracin(exp: Experiment, which: str, proj_dim: int | None, train_ids: torch.Tensor) -> dict:
    from dattri.algorithm.tracin import TracInAttributor
    from dattri.task import AttributionTask

    model = fresh_model(exp)
    spe = exp.steps_per_epoch
    ckpts = []
    t0 = time.perf_counter()
    for t, b in enumerate(exp.batches):
        sgd_update(model, b, exp.schedule.at(t)[0])
        end = (t + 1) % spe == 0
        if (which == "epochs" and end) or (which == "final" and t == len(exp.batches) - 1):
            ckpts.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    train_s = time.perf_counter() - t0
    gap = final_gap(exp, model)
    task = AttributionTask(loss_func=_loss_params(model), model=model, checkpoints=ckpts)
    lr = torch.tensor([exp.schedule.at(0)[0]] * len(ckpts))
    kwargs = {"proj_dim": proj_dim, "device": "cpu"} if proj_dim else None
    att = TracInAttributor(task=task, weight_list=lr, normalized_grad=False, projector_kwargs=kwargs, device="cpu")
    if proj_dim is None:
        att.projector_kwargs = None  # dattri projects to 512 by default; None = exact gradients
    x, y = full_data(exp)
    train_loader = DataLoader(TensorDataset(x[train_ids], y[train_ids]), batch_size=B, shuffle=False)
    val_loader = DataLoader(TensorDataset(*exp.val), batch_size=len(exp.val[1]), shuffle=False)
    t0 = time.perf_counter()
    scores = att.attribute(train_loader, val_loader).mean(dim=1)
    score_s = time.perf_counter() - t0
    return {"train_s": train_s, "embed_s": 0.0, "score_s": score_s, "per_train": scores, "theta_gap": gap}


_DATA: dict = {}


def full_data(exp: Experiment) -> tuple[torch.Tensor, torch.Tensor]:
    """Every sample's (x, y) indexed by sample id (from the recorded batches)."""
    key = id(exp)
    if key not in _DATA:
        n = int(max(int(b.sample_ids.max()) for b in exp.batches)) + 1
        x = torch.zeros(n, 64)
        y = torch.zeros(n, dtype=torch.int64)
        for b in exp.batches:
            x[b.sample_ids], y[b.sample_ids] = b.x, b.y
        _DATA[key] = (x, y)
    return _DATA[key]


# ----------------------------------------------------------------------------------------------------------
# the comparison


def median_runs(fn: Callable[[], dict], repeats: int, keys: tuple[str, ...]) -> dict:
    runs = [fn() for _ in range(repeats)]
    out = dict(runs[-1])
    for k in keys:
        if k in out:
            out[k] = statistics.median(r[k] for r in runs)
            out[k + "_all"] = [r[k] for r in runs]
    return out


def correlations(occ: torch.Tensor, ts: torch.Tensor, per_sample: torch.Tensor | None, loo: torch.Tensor) -> dict:
    r = {"tsloo_spearman": spearman(occ, ts), "tsloo_pearson": pearson(occ, ts)}
    if per_sample is not None and len(loo):
        r |= {"loo_spearman": spearman(per_sample, loo), "loo_pearson": pearson(per_sample, loo)}
    return r


def run_regime(name: str, epochs: int, lr: float, projections: dict, repeats: int, n_points: int, n_samples: int):
    exp = train(epochs, lr, 0)
    pick, ts, ids, loo, t_ts, t_loo = ground_truth(exp, n_points, n_samples, 0)
    rows = torch.tensor([t * B + p for t, p in pick])
    occ_sid = torch.tensor([int(exp.batches[t].sample_ids[p]) for t, p in pick])
    all_ids = torch.cat([b.sample_ids for b in exp.batches])
    train_ids = torch.unique(all_ids)
    pos_of = {int(s): i for i, s in enumerate(train_ids)}

    plain = [train_plain(exp) for _ in range(repeats)]
    plain_s = statistics.median(p[0] for p in plain)
    gap0 = final_gap(exp, plain[0][1])
    out = {
        "epochs": epochs,
        "lr": lr,
        "steps": len(exp.batches),
        "train_plain_s": plain_s,
        "train_plain_theta_gap": gap0,
        "tsloo_seconds": t_ts,
        "loo_seconds": t_loo,
        "tsloo_abs_mean": float(ts.abs().mean()),
        "methods": [],
    }

    def add(method, proj, variant, dim, corr, capture_s, embed_s, score_s, extra=None):
        row = {
            "method": method,
            "projection": proj,
            "variant": variant,
            "dim": dim,
            **corr,
            "capture_s": max(capture_s, 0.0),
            "embed_s": embed_s,
            "score_s": score_s,
            "total_s": max(capture_s, 0.0) + embed_s + score_s,
        } | (extra or {})
        out["methods"].append(row)
        print(
            f"  {name} {proj:>5} {method:<14} {variant:<28} Spearman {row['tsloo_spearman']:+.3f} "
            f"total {row['total_s']:.3f}s",
            flush=True,
        )

    timing = ("train_s", "embed_s", "score_emb_s", "direct_s", "score_s")
    for proj, k in projections.items():
        dvemb_variants = [(c, bl, "kronecker") for c in ("empirical", "fisher") for bl in ("layer", "model")]
        if k is not None:  # the elementwise tensor sketch, k*k dims per layer (dattri's "elementwise" idea)
            dvemb_variants += [("empirical", "layer", "elementwise"), ("fisher", "model", "elementwise")]
        for curv, blocks, kind in dvemb_variants:
            r = median_runs(lambda k=k, c=curv, bl=blocks, kd=kind: run_dvemb(exp, k, c, bl, kd), repeats, timing)
            cap_s = r["train_s"] - plain_s
            extra = {"train_s": r["train_s"], "theta_gap": r["theta_gap"], "emb_vs_direct_rel": r["emb_vs_direct_rel"]}
            for mode, occ, emb_s, sc_s in (
                ("embedding", r["occ_embedding"], r["embed_s"], r["score_emb_s"]),
                ("direct", r["occ_direct"], 0.0, r["direct_s"]),
            ):
                per_sample = torch.stack([occ[all_ids == z].sum() for z in ids]) if len(ids) else None
                corr = correlations(occ[rows], ts, per_sample, loo)
                label = f"{curv}{'-model' if blocks == 'model' else ''}, {mode}" + (
                    ", elementwise" if kind == "elementwise" else ""
                )
                add("dvemb", proj, label, r["dim"], corr, cap_s, emb_s, sc_s, extra)

        variants = [("none", None), ("kronecker", None)] if k is None else [("kronecker", N_LAYERS * k * k)]
        if k is not None:
            variants.append(("elementwise", N_LAYERS * k * k))
        for fact, proj_dim in variants:
            r = median_runs(lambda f=fact, p=proj_dim: run_dattri_dvemb(exp, f, p), repeats, timing)
            corr = correlations(r["per_sample_last"][occ_sid], ts, r["per_sample_all"][torch.tensor(ids)], loo)
            label = f"{fact}" + (f", proj_dim {proj_dim}" if proj_dim else ", unprojected")
            add(
                "dattri DVEmb",
                proj,
                label,
                r["dim"],
                corr,
                r["train_s"] - plain_s,
                r["embed_s"],
                r["score_s"],
                {"train_s": r["train_s"], "theta_gap": r["theta_gap"]},
            )

        tr_dim = None if k is None else N_LAYERS * k * k
        # dattri's projected TracIn regenerates its projection matrix for every batch (seconds per checkpoint),
        # so projected TracIn runs once, at the final checkpoint only; unprojected runs both variants.
        for which in ("final", "epochs") if k is None else ("final",):
            reps = repeats if k is None else 1
            r = median_runs(lambda w=which, p=tr_dim: run_dattri_tracin(exp, w, p, train_ids), reps, timing)
            sc = r["per_train"]
            occ = sc[torch.tensor([pos_of[int(s)] for s in occ_sid])]
            per_sample = sc[torch.tensor([pos_of[z] for z in ids])] if len(ids) else None
            label = ("final ckpt" if which == "final" else f"{epochs} epoch ckpts") + (
                f", proj_dim {tr_dim}" if tr_dim else ", unprojected"
            )
            add(
                "dattri TracIn",
                proj,
                label,
                tr_dim or 2410,
                correlations(occ, ts, per_sample, loo),
                r["train_s"] - plain_s,
                0.0,
                r["score_s"],
                {"train_s": r["train_s"], "theta_gap": r["theta_gap"]},
            )
    return out


def ratios(reg: dict) -> list[dict]:
    """Per projection: dattri DVEmb total time / dvemb total time (vs dattri's fastest DVEmb variant there),
    the Spearman of both, and dattri's best-Spearman DVEmb variant at that projection."""
    out = []
    for proj in dict.fromkeys(m["projection"] for m in reg["methods"]):
        ms = [m for m in reg["methods"] if m["projection"] == proj]
        peers = [m for m in ms if m["method"] == "dattri DVEmb"]
        peer = min(peers, key=lambda m: m["total_s"])  # dattri's fastest DVEmb variant at this projection
        best = max(peers, key=lambda m: m["tsloo_spearman"])
        for m in ms:
            if m["method"] != "dvemb":
                continue
            out.append(
                {
                    "projection": proj,
                    "dvemb": m["variant"],
                    "dattri": peer["variant"],
                    "time_ratio": peer["total_s"] / m["total_s"],
                    "spearman_dvemb": m["tsloo_spearman"],
                    "spearman_dattri": peer["tsloo_spearman"],
                    "dattri_best": best["variant"],
                    "spearman_dattri_best": best["tsloo_spearman"],
                    "time_ratio_best": best["total_s"] / m["total_s"],
                }
            )
    return out


def run(quick: bool, repeats: int) -> dict:
    torch.set_default_dtype(F64)
    regimes = {"short": (1, 0.07)} if quick else REGIMES
    projections = {"full": None, "8x8": 8} if quick else PROJECTIONS
    n_points, n_samples = (64, 8) if quick else (320, 64)
    try:
        import dattri
    except ImportError as exc:  # the peers are benchmark-only, never dvemb dependencies
        raise SystemExit("bench_peer needs the peers: pip install -r benchmarks/requirements-peer.txt") from exc

    results = {
        "regimes": {},
        "n_tsloo_points": n_points,
        "n_loo_samples": n_samples,
        "repeats": repeats,
        "dattri_version": dattri.__version__ if hasattr(dattri, "__version__") else "0.3.0",
    }
    for name, (epochs, lr) in regimes.items():
        t0 = time.perf_counter()
        reg = run_regime(name, epochs, lr, projections, repeats, n_points, n_samples)
        reg["ratios"] = ratios(reg)
        reg["seconds"] = time.perf_counter() - t0
        results["regimes"][name] = reg
    torch.set_default_dtype(torch.float32)
    return results


# ----------------------------------------------------------------------------------------------------------
# output


def _f(x, fmt=".2f"):
    return "–" if x is None else format(x, fmt)


def table(results: dict) -> str:
    lines = []
    for name, reg in results["regimes"].items():
        lines.append(
            f"**{name}**: {reg['epochs']} epochs, lr {reg['lr']}, {reg['steps']} steps; plain training loop "
            f"{reg['train_plain_s']:.3f} s; TSLOO of {results['n_tsloo_points']} last-epoch occurrences "
            f"(mean |TSLOO| {reg['tsloo_abs_mean']:.1e}), all-epoch LOO of {results['n_loo_samples']} samples.\n"
        )
        lines.append(
            "| projection | method | variant | dim | Spearman TSLOO | Pearson TSLOO | Spearman LOO "
            "| capture s | embed s | score s | total s |"
        )
        lines.append("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for m in reg["methods"]:
            lines.append(
                f"| {m['projection']} | {m['method']} | {m['variant']} | {m['dim']} | {m['tsloo_spearman']:.2f} | "
                f"{m['tsloo_pearson']:.2f} | {_f(m.get('loo_spearman'))} | {m['capture_s']:.3f} | "
                f"{m['embed_s']:.3f} | {m['score_s']:.3f} | {m['total_s']:.3f} |"
            )
        lines.append("")
        lines.append(
            "| projection | dvemb | Spearman dvemb | vs dattri DVEmb (fastest variant) | Spearman | dattri ÷ dvemb "
            "time | dattri best-Spearman variant | Spearman | dattri ÷ dvemb time |"
        )
        lines.append("|---|---|---:|---|---:|---:|---|---:|---:|")
        for r in reg["ratios"]:
            lines.append(
                f"| {r['projection']} | {r['dvemb']} | {r['spearman_dvemb']:.2f} | {r['dattri']} | "
                f"{r['spearman_dattri']:.2f} | {r['time_ratio']:.1f}× | {r['dattri_best']} | "
                f"{r['spearman_dattri_best']:.2f} | {r['time_ratio_best']:.1f}× |"
            )
        lines.append("")
    return "\n".join(lines)


def print_rich(results: dict) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # pragma: no cover
        print(table(results))
        return
    con = Console(width=160)
    for name, reg in results["regimes"].items():
        t = Table(title=f"{name}: {reg['epochs']} epochs, lr {reg['lr']} — Spearman vs exact TSLOO, wall time")
        for col in ("proj", "method", "variant", "dim", "ρ TSLOO", "ρ LOO", "capture s", "embed s", "score s", "total"):
            t.add_column(col, justify="right" if col not in ("method", "variant") else "left")
        for m in reg["methods"]:
            t.add_row(
                m["projection"],
                m["method"],
                m["variant"],
                str(m["dim"]),
                f"{m['tsloo_spearman']:.2f}",
                _f(m.get("loo_spearman")),
                f"{m['capture_s']:.3f}",
                f"{m['embed_s']:.3f}",
                f"{m['score_s']:.3f}",
                f"{m['total_s']:.3f}",
            )
        con.print(t)
        r = Table(title=f"{name}: dattri DVEmb ÷ dvemb")
        for col in ("proj", "dvemb", "dattri", "ρ dvemb", "ρ dattri", "time ratio"):
            r.add_column(col)
        for x in reg["ratios"]:
            r.add_row(
                x["projection"],
                x["dvemb"],
                x["dattri"],
                f"{x['spearman_dvemb']:.2f}",
                f"{x['spearman_dattri']:.2f}",
                f"{x['time_ratio']:.1f}×",
            )
        con.print(r)


def write_results_md(results: dict, path: Path, notes: str = "") -> None:
    m = results["machine"]
    body = (
        f"Measured {m['date']} on {m['cpu_model']} ({m['cpu_cores']} cores, {m['torch_threads']} torch "
        f"thread(s)), torch {m['torch_version']}, dattri {results['dattri_version']}, fp64, median of "
        f"{results['repeats']} runs, total {results['seconds']:.0f} s. Raw JSON: "
        f"`benchmarks/results/bench_peer_cpu.json`. Command:\n\n```bash\npip install -r "
        f"benchmarks/requirements-peer.txt\nOMP_NUM_THREADS=1 python -m benchmarks.bench_peer\n```\n\n"
        f"{table(results)}"
    )
    replace_doc_block(path, "bench_peer", body, "## Peer comparison\n\n" + notes)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1 epoch, full + 8x8, few points (smoke run)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-md", action="store_true", help="do not touch docs/RESULTS.md")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    results = run(args.quick, 1 if args.quick else args.repeats)
    results["seconds"] = time.perf_counter() - t0
    results["machine"] = machine_info("cpu")
    name = "bench_peer_quick_cpu.json" if args.quick else "bench_peer_cpu.json"
    write_json_atomic(RESULTS / name, results)
    print_rich(results)
    if not args.quick and not args.no_md:
        write_results_md(results, ROOT / "docs" / "RESULTS.md")


if __name__ == "__main__":
    main()
