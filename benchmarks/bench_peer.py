"""Peer comparison: dvemb vs dattri 0.3.0 (DVEmbAttributor, TracInAttributor) on the same recorded runs.

Same runs and ground truth as ``bench_fidelity``: sklearn digits, MLP 64 -> 32 -> 10 (tanh), plain SGD,
batch 32 (w = 1/32), 992 training / 300 validation rows, fp64, the *short* (3 epochs, lr 0.07) and *long*
(10 epochs, lr 0.2) regimes, each recorded by dvemb's training (Lightning with the capture callback, a run
directory). Ground truth (dvemb.eval.groundtruth on the recorded trajectory): exact TSLOO of 320
first-epoch and as many last-epoch occurrences, and all-epoch LOO of 64 samples.

Every method sees the recorded trajectory, and is timed as

* **capture** — dvemb: its train stage (the Lightning fit with the capture callback writing the gradient
  store, plus the Fisher vectors when curvature = fisher) minus the same Lightning fit without the callback;
  dattri DVEmb: dvemb's replay of the recorded trajectory (dvemb.replay, the training arithmetic) with
  ``cache_gradients`` at every step's parameters minus the same replay without it; dattri TracIn: none
  (it reads the run's epoch-boundary checkpoints);
* **embed** — dvemb's embed stage (embedding mode; none in direct mode) / dattri ``DVEmbAttributor.cache()``
  (none for TracIn);
* **score** — dvemb's score stage (validation gradients + scores of every occurrence; direct mode embeds and
  scores in one pass); dattri ``attribute(test_loader, epoch=last)``, per-test-sample gradients averaged over
  the 300 columns.

dattri's per-sample values are spread over the sample's occurrences (dattri DVEmb: its value of each epoch
at that epoch's occurrence; TracIn: one value per sample, split evenly over its epochs), so every method is
compared per phase like an occurrence estimator. Median of ``--repeats`` runs per phase. dvemb is
block-diagonal (one M per Linear layer, bias folded in) unless ``-model``; dattri DVEmb keeps one full M
over all tracked parameters.

Check: unprojected, dattri DVEmb computes exactly dvemb's empirical-model estimator, so the benchmark stops
(writing nothing) unless their scores agree to ``AGREE_RTOL`` (max |dattri - dvemb| / max |dvemb|) in the first
epoch, the last epoch and over all occurrences; the measured deviations go to the JSON (``dattri_check``).

Install the peers into the benchmark environment only (not dvemb dependencies)::

    pip install -r benchmarks/requirements-peer.txt
    OMP_NUM_THREADS=1 python -m benchmarks.bench_peer            # writes benchmarks/results/bench_peer_cpu.json
    OMP_NUM_THREADS=1 python -m benchmarks.bench_peer --quick    # smoke run
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # dattri draws tqdm bars; keep the timings clean

import lightning as L
import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from benchmarks.bench_exact import phase_cells
from benchmarks.bench_fidelity import PROJECTIONS as FIDELITY_PROJECTIONS
from benchmarks.bench_fidelity import REGIMES, Experiment, compare, phase_truth
from benchmarks.common import (
    RESULTS,
    ROOT,
    in_order,
    machine_info,
    record,
    replace_doc_block,
    stage_scores,
    write_json_atomic,
)
from dvemb.runtask import model_at, run_config, task_of
from dvemb.store.rundir import RunDir, load_tensors
from dvemb.train.module import Trainee
from dvemb.train.run import make_datamodule

F64 = torch.float64
# dvemb per-layer (k_a, k_s); dattri's matched Kronecker projection uses k per side, n_layers * k^2 total.
PROJECTIONS = {"full": None, "32x32": 32, "8x8": 8}
N_LAYERS = 2
# Unprojected, dattri DVEmb and dvemb's empirical-model estimator are one computation (empirical Fisher, one
# curvature block over all tracked parameters), both in float64 (dattri computes in the model's dtype; dvemb's run
# is FP64), on the same trajectory (theta_gap ~ 1e-16). They differ only in summation order: a score sums N = T*B
# rank-one terms into M, then two products of length d = 2410, so its rounding error is at most
# (N + 2d) u ~ 1.6e-12 (long regime, u = 1.1e-16) of the sums of |terms|. The tolerance on
# max |dattri - dvemb| / max |dvemb| per phase leaves 600x that for cancellation and stays below float32's
# u = 6e-8 (a float32 leak fails); measured 1.6e-15 (quick) and 5e-15 (long). Real mismatches are far above it:
# test gradients at theta_{T-1} 0.1, dvemb's layer blocks 0.16-0.39.
AGREE_RTOL = 1e-9


def median_runs(fn: Callable[[], dict], repeats: int) -> dict:
    """The last of ``repeats`` calls, with every ``*_s`` timing replaced by its median (all kept in ``*_s_all``)."""
    runs = [fn() for _ in range(repeats)]
    out = dict(runs[-1])
    for k in [k for k in out if k.endswith("_s")]:
        out[k] = statistics.median(r[k] for r in runs)
        out[k + "_all"] = [r[k] for r in runs]
    return out


def theta_gap(exp: Experiment, params: dict[str, torch.Tensor]) -> float:
    """Max |theta_T(this loop) - theta_T(recorded)|: every method must see the identical trajectory."""
    want = exp.traj.checkpoints[exp.traj.num_steps]
    return max(float((params[k].detach() - v).abs().max()) for k, v in want.items())


# ----------------------------------------------------------------------------------------------------------
# dvemb


def plain_fit(run: RunDir) -> dict:
    """The Lightning fit of ``run``'s recorded config without dvemb's capture callback, from its theta_0."""
    cfg = run_config(run)
    task = task_of(run, cfg)
    model = model_at(run, 0, task)
    trainer = L.Trainer(
        max_epochs=cfg.train.epochs,
        accelerator="cpu",
        precision=cfg.train.precision,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        deterministic=True,
        default_root_dir=str(run.root / "plain-fit"),
    )
    t0 = time.perf_counter()
    trainer.fit(Trainee(model, cfg.train, task), datamodule=make_datamodule(cfg, run))
    return {"train_s": time.perf_counter() - t0, "params": dict(model.named_parameters())}


def run_dvemb(exp: Experiment, projection: tuple, curvature: str, blocks: tuple[str, ...]) -> dict:
    """A fresh run recorded by dvemb's training, then its embed + score stages in both modes per ``blocks``
    (keys ``"<blocks>:<what>"``)."""
    with tempfile.TemporaryDirectory(prefix="peer-", dir=exp.workdir) as tmp:
        run = RunDir(Path(tmp) / "run")
        _, train_s = record(exp.overrides(projection, curvature), run)
        out = {"train_s": train_s, "theta_gap": theta_gap(exp, load_tensors(run.checkpoint(exp.traj.num_steps)))}
        for bl in blocks:
            emb, t_emb = stage_scores(run, "embedding", curvature, bl)
            direct, t_dir = stage_scores(run, "direct", curvature, bl)
            emb, direct = in_order(emb, exp.order), in_order(direct, exp.order)
            out |= {
                f"{bl}:embed_s": t_emb["embed"],
                f"{bl}:score_emb_s": t_emb["score"],
                f"{bl}:direct_s": t_dir["score"],
                f"{bl}:embedding": emb,
                f"{bl}:direct": direct,
                f"{bl}:rel": float((emb - direct).abs().max() / emb.abs().max()),
            }
    return out


# ----------------------------------------------------------------------------------------------------------
# dattri


def _loss_params(model: torch.nn.Module):
    def f(params, data):  # dattri "none" signature: one sample under vmap
        x, y = data
        return F.cross_entropy(torch.func.functional_call(model, params, (x.unsqueeze(0),)), y.unsqueeze(0))

    return f


def _loss_model(model, data, device):  # dattri factorization signature: the batch mean (dattri rescales by B)
    x, y = data
    return F.cross_entropy(model(x.to(device)), y.to(device))


def replay(exp: Experiment, model: torch.nn.Module, before_step: Callable[[int], None] | None = None) -> dict:
    """dvemb's replay of the recorded trajectory with ``model`` holding theta_t while ``before_step(t)`` runs;
    ``model`` ends at theta_T (where dattri computes its test gradients)."""
    traj = exp.traj
    params, state = traj.checkpoints[0], traj.opt_states[0]

    def load(p: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for k, v in model.named_parameters():
                v.copy_(p[k])

    t0 = time.perf_counter()
    for t in range(traj.num_steps):
        load(params)
        if before_step is not None:
            before_step(t)
        params, state = traj.step(params, state, t)
    load(params)
    return {"replay_s": time.perf_counter() - t0, "theta_gap": theta_gap(exp, dict(model.named_parameters()))}


def occurrence_epochs(exp: Experiment) -> torch.Tensor:
    """The epoch of every occurrence in the recorded order [occurrences]."""
    return torch.tensor(exp.traj.epochs).repeat_interleave(torch.tensor([len(s.sample_ids) for s in exp.traj.steps]))


def per_epoch_occurrences(exp: Experiment, by_epoch: list[torch.Tensor]) -> torch.Tensor:
    """Occurrence scores in the recorded order from per-sample values of each epoch (indexed by sample id)."""
    values = torch.stack([v.to(F64) for v in by_epoch])  # [epochs, max id + 1]
    return values[occurrence_epochs(exp), exp.occ_ids]


PHASES = {"first": "first epoch", "last": "last epoch", "all": "all epochs"}


def deviation(exp: Experiment, got: torch.Tensor, want: torch.Tensor) -> dict[str, float]:
    """max |got - want| / max |want| over the first-epoch, the last-epoch and all occurrences (got, want: scores
    [occurrences] in the recorded order)."""
    epochs = occurrence_epochs(exp)
    phases = {"first": epochs == 0, "last": epochs == exp.epochs - 1, "all": torch.ones_like(epochs, dtype=torch.bool)}
    return {ph: float((got[m] - want[m]).abs().max() / want[m].abs().max()) for ph, m in phases.items()}


def check_agreement(exp: Experiment, regime: str, dattri: str, peer: dict, dvemb: dict[str, torch.Tensor]) -> list:
    """Per dvemb mode: the deviation (per phase) of dattri's unprojected DVEmb scores (``peer``: run_dattri_dvemb's
    result for variant ``dattri``) from dvemb's empirical-model scores ``dvemb`` (mode -> scores [occurrences]).
    Stops the benchmark, before anything is written, when one exceeds ``AGREE_RTOL`` or dattri did not compute in
    float64."""
    if peer["dtype"] != F64:
        raise SystemExit(
            f"bench_peer: {regime} regime: dattri DVEmb ({dattri}) computed in {peer['dtype']}, not float64; the "
            "agreement check's tolerance assumes float64. No results written."
        )
    rows = []
    for mode, want in dvemb.items():
        dev = deviation(exp, peer["occ"], want)
        for phase, d in dev.items():
            if not d <= AGREE_RTOL:  # NaN fails too
                raise SystemExit(
                    f"bench_peer: {regime} regime, {PHASES[phase]}: dattri DVEmb ({dattri}) disagrees with dvemb "
                    f"empirical-model ({mode}): max |dattri - dvemb| / max |dvemb| = {d:.3e} > {AGREE_RTOL:.0e} "
                    f"(same estimator, both float64; dattri's replay ends {peer['theta_gap']:.1e} from the recorded "
                    "theta_T). No results written."
                )
        rows.append({"dattri": dattri, "dvemb": f"empirical-model, {mode}", **dev})
    return rows


def run_dattri_dvemb(exp: Experiment, factorization: str, proj_dim: int | None) -> dict:
    from dattri.algorithm.dvemb import DVEmbAttributor
    from dattri.task import AttributionTask

    model = copy.deepcopy(exp.model)
    loss = _loss_params(model) if factorization == "none" else _loss_model
    task = AttributionTask(loss_func=loss, model=model, checkpoints=[model.state_dict()])
    att = DVEmbAttributor(task=task, proj_dim=proj_dim, factorization_type=factorization)

    def cache(t: int) -> None:
        s = exp.traj.steps[t]
        lr = exp.traj.steps[t].hyper.lr[0]
        att.cache_gradients(
            exp.traj.epochs[t], batch_data=(s.batch["x"], s.batch["y"]), indices=s.sample_ids, learning_rate=lr
        )

    r = replay(exp, model, cache)
    model.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    att.cache()
    embed_s = time.perf_counter() - t0
    loader = DataLoader(TensorDataset(*exp.val), batch_size=len(exp.val[1]), shuffle=False)
    t0 = time.perf_counter()
    last = att.attribute(loader, epoch=exp.epochs - 1).mean(dim=1)
    score_s = time.perf_counter() - t0
    by_epoch = [att.attribute(loader, epoch=e).mean(dim=1).detach() for e in range(exp.epochs - 1)] + [last.detach()]
    return {
        "train_s": r["replay_s"],
        "embed_s": embed_s,
        "score_s": score_s,
        "occ": per_epoch_occurrences(exp, by_epoch),
        "dim": att.embeddings[exp.epochs - 1].shape[1],
        "dtype": att.embeddings[exp.epochs - 1].dtype,
        "theta_gap": r["theta_gap"],
    }


def run_dattri_tracin(exp: Experiment, which: str, proj_dim: int | None) -> dict:
    from dattri.algorithm.tracin import TracInAttributor
    from dattri.task import AttributionTask

    run = next(iter(exp.runs.values()))
    steps = run.boundaries[1:] if which == "epochs" else run.boundaries[-1:]
    ckpts = [load_tensors(run.checkpoint(b)) for b in steps]  # the run's own checkpoints: no capture
    model = copy.deepcopy(exp.model)
    task = AttributionTask(loss_func=_loss_params(model), model=model, checkpoints=ckpts)
    lr = torch.tensor([exp.traj.steps[0].hyper.lr[0]] * len(ckpts))
    kwargs = {"proj_dim": proj_dim, "device": "cpu"} if proj_dim else None
    att = TracInAttributor(task=task, weight_list=lr, normalized_grad=False, projector_kwargs=kwargs, device="cpu")
    if proj_dim is None:
        att.projector_kwargs = None  # dattri projects to 512 by default; None = exact gradients
    x, y = train_data(exp)
    train_loader = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=False)
    val_loader = DataLoader(TensorDataset(*exp.val), batch_size=len(exp.val[1]), shuffle=False)
    t0 = time.perf_counter()
    scores = att.attribute(train_loader, val_loader).mean(dim=1)  # [max id + 1]
    score_s = time.perf_counter() - t0
    occ = per_epoch_occurrences(exp, [scores / exp.epochs] * exp.epochs)
    return {"train_s": 0.0, "embed_s": 0.0, "score_s": score_s, "occ": occ, "theta_gap": 0.0}


def train_data(exp: Experiment) -> tuple[torch.Tensor, torch.Tensor]:
    """Every sample's (x, y) at row = sample id (from the recorded batches; rows of unseen ids stay zero)."""
    n = int(exp.occ_ids.max()) + 1
    x = torch.zeros(n, *exp.batches[0].x.shape[1:], dtype=exp.batches[0].x.dtype)
    y = torch.zeros(n, dtype=torch.int64)
    for b in exp.batches:
        x[b.sample_ids], y[b.sample_ids] = b.x, b.y
    return x, y


# ----------------------------------------------------------------------------------------------------------
# the comparison


def run_regime(
    name: str, epochs: int, lr: float, projections: dict, repeats: int, n_points: int, n_samples: int, workdir: Path
) -> dict:
    exp = Experiment("digits", epochs, lr, 0, workdir)
    exp.run(FIDELITY_PROJECTIONS["full"])
    truth = phase_truth(exp, n_points, n_samples)
    plain = [plain_fit(next(iter(exp.runs.values()))) for _ in range(repeats)]
    plain_s = statistics.median(p["train_s"] for p in plain)
    base = median_runs(lambda: replay(exp, copy.deepcopy(exp.model)), repeats)
    out = {
        "epochs": epochs,
        "lr": lr,
        "steps": exp.traj.num_steps,
        "train_plain_s": plain_s,
        "train_plain_theta_gap": theta_gap(exp, plain[0]["params"]),
        "replay_plain_s": base["replay_s"],
        "tsloo_seconds": truth["first"][4] + truth["last"][4],
        "loo_seconds": truth["last"][5],
        "tsloo_abs_mean": {phase: float(t[1].abs().mean()) for phase, t in truth.items()},
        "methods": [],
        "dattri_check": {"rtol": AGREE_RTOL, "rows": []},
    }

    def add(method, proj, variant, dim, occ, capture_s, embed_s, score_s, extra=None):
        metrics = compare(exp, {method: occ, method + ":seconds": torch.tensor(0.0)}, truth, names=(method,))[method]
        metrics.pop("seconds")
        row = {
            "method": method,
            "projection": proj,
            "variant": variant,
            "dim": dim,
            **metrics,
            "capture_s": max(capture_s, 0.0),
            "embed_s": embed_s,
            "score_s": score_s,
            "total_s": max(capture_s, 0.0) + embed_s + score_s,
        } | (extra or {})
        out["methods"].append(row)
        print(
            f"  {name} {proj:>5} {method:<14} {variant:<28} Spearman last {row['last']['spearman']:+.3f} "
            f"total {row['total_s']:.3f}s",
            flush=True,
        )

    for proj, k in projections.items():
        runs = [("kronecker", c, ("layer", "model")) for c in ("empirical", "fisher")]
        if k is not None:  # the elementwise tensor sketch, k*k dims per layer (dattri's "elementwise" idea)
            runs += [("elementwise", "empirical", ("layer",)), ("elementwise", "fisher", ("model",))]
        for kind, curv, blocks in runs:
            projection = (k, k, kind)
            r = median_runs(lambda p=projection, c=curv, bl=blocks: run_dvemb(exp, p, c, bl), repeats)
            if k is None and kind == "kronecker" and curv == "empirical":  # what unprojected dattri DVEmb computes
                model_scores = {mode: r[f"model:{mode}"] for mode in ("embedding", "direct")}
                # the nearest different estimator (block-diagonal M): how far a real mismatch lands
                out["dattri_check"]["layer_blocks"] = deviation(exp, r["layer:embedding"], r["model:embedding"])
            for bl in blocks:
                extra = {"train_s": r["train_s"], "theta_gap": r["theta_gap"], "emb_vs_direct_rel": r[f"{bl}:rel"]}
                for mode in ("embedding", "direct"):
                    emb_s, sc_s = (
                        (r[f"{bl}:embed_s"], r[f"{bl}:score_emb_s"])
                        if mode == "embedding"
                        else (0.0, r[f"{bl}:direct_s"])
                    )
                    label = f"{curv}{'-model' if bl == 'model' else ''}, {mode}" + (
                        ", elementwise" if kind == "elementwise" else ""
                    )
                    add(
                        "dvemb",
                        proj,
                        label,
                        exp.dim(projection),
                        r[f"{bl}:{mode}"],
                        r["train_s"] - plain_s,
                        emb_s,
                        sc_s,
                        extra,
                    )

        variants = [("none", None), ("kronecker", None)] if k is None else [("kronecker", N_LAYERS * k * k)]
        if k is not None:
            variants.append(("elementwise", N_LAYERS * k * k))
        for fact, proj_dim in variants:
            r = median_runs(lambda f=fact, p=proj_dim: run_dattri_dvemb(exp, f, p), repeats)
            label = f"{fact}" + (f", proj_dim {proj_dim}" if proj_dim else ", unprojected")
            extra = {"train_s": r["train_s"], "theta_gap": r["theta_gap"]}
            if proj_dim is None:
                out["dattri_check"]["rows"] += check_agreement(exp, name, label, r, model_scores)
            add(
                "dattri DVEmb",
                proj,
                label,
                r["dim"],
                r["occ"],
                r["train_s"] - base["replay_s"],
                r["embed_s"],
                r["score_s"],
                extra,
            )

        tr_dim = None if k is None else N_LAYERS * k * k
        # dattri's projected TracIn regenerates its projection matrix for every batch (seconds per checkpoint),
        # so projected TracIn runs once, at the final checkpoint only; unprojected runs both variants.
        for which in ("final", "epochs") if k is None else ("final",):
            r = median_runs(lambda w=which, p=tr_dim: run_dattri_tracin(exp, w, p), repeats if k is None else 1)
            label = ("final ckpt" if which == "final" else f"{epochs} epoch ckpts") + (
                f", proj_dim {tr_dim}" if tr_dim else ", unprojected"
            )
            add(
                "dattri TracIn",
                proj,
                label,
                tr_dim or exp.dim(FIDELITY_PROJECTIONS["full"]),
                r["occ"],
                0.0,
                0.0,
                r["score_s"],
            )
    return out


def ratios(reg: dict) -> list[dict]:
    """Per projection: dattri DVEmb total time / dvemb total time (vs dattri's fastest DVEmb variant there),
    the last-epoch Spearman of both, and dattri's best-Spearman DVEmb variant at that projection."""
    out = []
    for proj in dict.fromkeys(m["projection"] for m in reg["methods"]):
        ms = [m for m in reg["methods"] if m["projection"] == proj]
        peers = [m for m in ms if m["method"] == "dattri DVEmb"]
        peer = min(peers, key=lambda m: m["total_s"])  # dattri's fastest DVEmb variant at this projection
        best = max(peers, key=lambda m: m["last"]["spearman"])
        for m in ms:
            if m["method"] != "dvemb":
                continue
            out.append(
                {
                    "projection": proj,
                    "dvemb": m["variant"],
                    "dattri": peer["variant"],
                    "time_ratio": peer["total_s"] / m["total_s"],
                    "spearman_dvemb": m["last"]["spearman"],
                    "spearman_dattri": peer["last"]["spearman"],
                    "dattri_best": best["variant"],
                    "spearman_dattri_best": best["last"]["spearman"],
                    "time_ratio_best": best["total_s"] / m["total_s"],
                }
            )
    return out


def run(quick: bool, repeats: int) -> dict:
    try:
        import dattri  # noqa: F401 - the peers are benchmark-only, never dvemb dependencies
    except ImportError as exc:
        raise SystemExit("bench_peer needs the peers: pip install -r benchmarks/requirements-peer.txt") from exc
    from importlib.metadata import version

    torch.set_default_dtype(F64)
    regimes = {"short": (2, REGIMES["short"][1])} if quick else REGIMES
    projections = {"full": None, "8x8": 8} if quick else PROJECTIONS
    n_points, n_samples = (32, 8) if quick else (320, 64)
    results = {
        "regimes": {},
        "quick": quick,
        "n_tsloo_points": n_points,
        "n_loo_samples": n_samples,
        "repeats": repeats,
        "dattri_version": version("dattri"),
    }
    with tempfile.TemporaryDirectory(prefix="bench-peer-") as tmp:
        for name, (epochs, lr) in regimes.items():
            t0 = time.perf_counter()
            reg = run_regime(name, epochs, lr, projections, repeats, n_points, n_samples, Path(tmp) / name)
            reg["ratios"] = ratios(reg)
            reg["seconds"] = time.perf_counter() - t0
            results["regimes"][name] = reg
    torch.set_default_dtype(torch.float32)
    return results


# ----------------------------------------------------------------------------------------------------------
# output


def table(results: dict) -> str:
    lines = []
    for name, reg in results["regimes"].items():
        ts = reg["tsloo_abs_mean"]
        lines.append(
            f"**{name}**: {reg['epochs']} epochs, lr {reg['lr']}, {reg['steps']} steps; Lightning fit without "
            f"capture {reg['train_plain_s']:.2f} s, replay of the trajectory {reg['replay_plain_s']:.2f} s; TSLOO "
            f"of {results['n_tsloo_points']} first-epoch and as many last-epoch occurrences (mean |TSLOO| "
            f"{ts['first']:.1e} / {ts['last']:.1e}), all-epoch LOO of {results['n_loo_samples']} samples.\n"
        )
        chk = reg["dattri_check"]
        worst = {ph: max(r[ph] for r in chk["rows"]) for ph in ("first", "last")}
        lines.append(
            f"Check: unprojected dattri DVEmb (both variants) equals dvemb empirical-model (both modes) to max "
            f"|dattri - dvemb| / max |dvemb| {worst['first']:.1e} (first epoch) / {worst['last']:.1e} (last epoch), "
            f"tolerance {chk['rtol']:.0e}; dvemb's layer blocks differ from empirical-model by "
            f"{chk['layer_blocks']['first']:.1e} / {chk['layer_blocks']['last']:.1e}.\n"
        )
        lines.append(
            "| projection | method | variant | dim | first epoch: Spearman / Pearson / scale "
            "| last epoch: Spearman / Pearson / scale | LOO: Spearman / Pearson "
            "| capture s | embed s | score s | total s |"
        )
        lines.append("|---|---|---|---:|---|---|---|---:|---:|---:|---:|")
        for m in reg["methods"]:
            lines.append(
                f"| {m['projection']} | {m['method']} | {m['variant']} | {m['dim']} | "
                f"{phase_cells(m['first'], m['last'])} | {m['loo']['spearman']:.2f} / {m['loo']['pearson']:.2f} | "
                f"{m['capture_s']:.3f} | {m['embed_s']:.3f} | {m['score_s']:.3f} | {m['total_s']:.3f} |"
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


def write_results_md(results: dict, path: Path) -> None:
    m = results["machine"]
    quick = " --quick" if results["quick"] else ""
    body = (
        f"Measured {m['date']} on {m['cpu_model']} ({m['cpu_cores']} cores, {m['torch_threads']} torch "
        f"thread(s)), torch {m['torch_version']}, dattri {results['dattri_version']}, fp64, median of "
        f"{results['repeats']} runs, total {results['seconds']:.0f} s. Raw JSON: "
        f"`benchmarks/results/bench_peer{'_quick' if quick else ''}_cpu.json`. Command:\n\n```bash\npip install -r "
        f"benchmarks/requirements-peer.txt\nOMP_NUM_THREADS=1 python -m benchmarks.bench_peer{quick}\n```\n\n"
        + (
            "**Quick run** (2 epochs of the short regime, fewer points): a smoke run, not the full comparison.\n\n"
            if quick
            else ""
        )
        + table(results)
    )
    replace_doc_block(path, "bench_peer", body, "## Peer comparison\n\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2 epochs, full + 8x8, few points (smoke run)")
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
    print(table(results))
    if not args.no_md:
        write_results_md(results, ROOT / "docs" / "RESULTS.md")


if __name__ == "__main__":
    main()
