"""Which compressed store can carry AdamW's elementwise state? The projection options, measured per phase.

The Adam-aware recursion (dvemb.embed.adam) multiplies stored vectors elementwise by Adam's preconditioner
``D = 1/(sqrt(v_hat) + eps)`` and by the second-moment path's ``S (.) g``. A random projection does not commute
with a diagonal, so a compressed store must give something up. The options (docs/DESIGN.md, "Adam-aware
modes"), each scored on the SAME recorded AdamW run against the same exact TSLOO points:

* ``elementwise D, unprojected`` — the shipped recursion on an unprojected store (the reference);
* ``per-row subsample 32x32`` — the shipped default store for AdamW runs (``capture.kind: rowwise``): k_s rows
  of each layer's gradient, each with its own k_a columns; D and the v path stay exact on the kept coordinates,
  inner products over them are scaled to the full ones. A real store (its own capture), not a simulation;
* ``coordinate subsample 32x32`` (``capture.kind: subsample``) — the same budget with one column set shared by
  every row (the default before). A real store;
* ``elementwise D, no v path`` — the same with the second-moment path dropped (what any store that
  cannot form ``g_t (.) g_z`` loses);
* ``rank-1 D`` — D replaced by its rank-1 (Adafactor-style, row mean x column mean / mean) fit per layer and
  step, the v path kept exact: what the rank-1 fit alone costs;
* ``frozen D per segment`` — D and S held at their values of the segment's first step (scaled by the step's
  learning rate): what a per-segment preconditioner alone costs;
* ``Kronecker, rank-1 D`` (unprojected and at 32x32) — what a Gaussian Kronecker store CAN carry: for a rank-1
  ``D_t = r c^T`` the preconditioned per-sample gradient ``(r (.) ds)(c (.) a)^T`` is again a Kronecker
  product, so capture could store ``P(D_t (.) g)`` beside ``P(g)`` (and the same for the curvature vectors).
  It cannot carry the v path (``g_t (.) dg`` is no outer product) and applies each step's D when that step's
  gradient enters the momentum (the recursion over (u, q) below). Simulated exactly from the unprojected
  store (the stored numbers equal what such a capture would compute), projected with dvemb's own seeded
  Gaussian matrices.

The two real stores are also captured with ``--seeds`` capture seeds (each its own run; the first is seed 0,
the rows above): the second table gives Spearman's median [min, max] over them per phase, and how many draws
reach 0.85 on the last epoch — so a store is judged by its distribution, not by one lucky or unlucky draw.

Two more rows say where the unprojected recursion's own error comes from: the exact reverse sweep (dvemb.replay)
with the removal linearised, once with exact Hessian-vector products and once with the batch's Gauss-Newton
product in their place (``exact_scores(curvature=...)``). If the second equals the Adam-aware recursion, the
store and the linearised optimizer lose nothing and the curvature model is all of the gap.

Run: the AdamW regimes of bench_exact (fp64 digits MLP 64 -> 32 -> 10 tanh, GGN curvature, one block).

    OMP_NUM_THREADS=1 python -m benchmarks.bench_adam_projection          # about 15 minutes on 2 cores
    OMP_NUM_THREADS=1 python -m benchmarks.bench_adam_projection --quick  # smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from dvemb.capture.projection import Projector
from dvemb.config import load_config
from dvemb.embed.adam import StoredCoordinates, adam_coefficients, adam_direct_scores
from dvemb.embed.curvature import curvature_fn
from dvemb.embed.propagator import Curvature
from dvemb.embed.recorded_state import adam_run
from dvemb.replay.exact import exact_scores
from dvemb.replay.trajectory import Trajectory, load_trajectory
from dvemb.runtask import model_at
from dvemb.score.run import val_vectors
from dvemb.store.gradstore import read_projection, read_segment
from dvemb.store.rundir import RunDir
from dvemb.train.run import train
from dvemb.types import LayerProjection, StepGrads

try:  # run as a module (python -m benchmarks.bench_adam_projection) or loaded from a path
    from benchmarks.bench_exact import BASE, PROJECTIONS, REGIMES, ROOT, ground_truth, phase_metrics
    from benchmarks.common import RESULTS, machine_info, replace_doc_block, write_json_atomic
except ImportError:  # pragma: no cover
    from bench_exact import BASE, PROJECTIONS, REGIMES, ROOT, ground_truth, phase_metrics
    from common import RESULTS, machine_info, replace_doc_block, write_json_atomic

ADAM_REGIMES = ("adamw-5ep", "adamw-15ep")
K = 32  # the projection of the compressed options: k_a = k_s = 32, as the AdamW default store
STORES = {"subsample": "coordinate subsample", "rowwise": "per-row subsample"}  # real captured stores
Coef = list[dict[str, dict[str, torch.Tensor]]]


def rank1(k: dict[str, torch.Tensor], shape: tuple[int, int], eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Adafactor's fit of one layer's preconditioner at one step, as ``D ~ r c^T``.

    v_hat (recovered from ``c1 D = c1 / (sqrt(v_hat) + eps)``) is fitted by row mean x column mean / mean;
    ``sqrt`` of that is ``a b^T`` and ``D ~ 1/(a b^T)``, with ``a, b >= sqrt(eps)`` (D <= 1/eps, as Adam's)."""
    v = ((k["c1"] / k["c1d"] - eps).clamp_min(0) ** 2).reshape(shape)
    scale = v.mean().clamp_min(1e-300) ** 0.25
    floor = eps**0.5
    return 1 / (v.mean(1).sqrt() / scale).clamp_min(floor), 1 / (v.mean(0).sqrt() / scale).clamp_min(floor)


def as_rank1(coef: Coef, shapes: dict[str, tuple[int, int]], eps: float) -> Coef:
    """The coefficients with D replaced by its rank-1 fit (the v path untouched)."""
    return [
        {n: k | {"c1d": k["c1"] * torch.outer(*rank1(k, shapes[n], eps)).reshape(-1)} for n, k in step.items()}
        for step in coef
    ]


def without_v(coef: Coef) -> Coef:
    """The coefficients with the second-moment path dropped (S = 0)."""
    return [{n: k | {"c1s": torch.zeros_like(k["c1s"])} for n, k in step.items()} for step in coef]


def frozen(coef: Coef, steps: list[int], bounds: list[int]) -> Coef:
    """The coefficients with D and S held at the segment's first step, rescaled by each step's c1."""
    out, first = [], {}
    for t, step in zip(steps, coef):
        if t in bounds or not first:
            first = {n: k for n, k in step.items()}
        out.append(
            {
                n: k
                | {
                    "c1d": first[n]["c1d"] * (k["c1"] / first[n]["c1"]),
                    "c1s": first[n]["c1s"] * (k["c1"] / first[n]["c1"]),
                }
                for n, k in step.items()
            }
        )
    return out


class Kronecker:
    """dvemb's seeded Gaussian Kronecker projection of each layer (identity where k >= d), applied to
    full [n, d_out * d_in] vectors, and the rank-1 preconditioning ``D (.) G = diag(r) G diag(c)`` before it."""

    def __init__(self, specs: dict[str, LayerProjection], k: int | None):
        self.shapes = {n: s.shape for n, s in specs.items()}
        self.proj = {
            n: Projector(dataclasses.replace(s, k_a=k or s.d_in, k_s=k or s.d_out, kind="kronecker"), torch.float64)
            for n, s in specs.items()
        }

    def __call__(self, n: str, x: torch.Tensor, rc: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        m = x.reshape(-1, *self.shapes[n])
        if rc is not None:
            m = rc[0][:, None] * m * rc[1][None, :]
        p = self.proj[n]
        if p.p_s is not None:
            m = p.p_s @ m
        if p.p_a is not None:
            m = m @ p.p_a.T
        return m.reshape(m.shape[0], -1)


def scalar(x: torch.Tensor | float) -> float:
    """A layer's one LR-like coefficient (a projected layer is one parameter group)."""
    return float(torch.as_tensor(x).mean())


def kronecker_scores(
    records: list[StepGrads],
    coef: Coef,
    clip: list[float],
    curvature: Callable[[StepGrads], Curvature],
    validation: dict[str, torch.Tensor],
    b1: float,
    eps: float,
    proj: Kronecker,
) -> list[torch.Tensor]:
    """Per-step scores [B] at T from a Kronecker store of P(g), P(D_t (.) g) (rank-1 D_t; no v path).

    Linearised AdamW with the preconditioner applied as gradients enter the momentum:
    ``p' = b1 p + (1 - b1) D_t (.) dg``, ``dtheta' = decay dtheta - c1 p'``. Adjoint (u for theta, q for p):
    ``qbar = q - c1 u``; the occurrence's score ``-clip (1 - b1) <qbar, P(D_t (.) g_z)>``;
    ``q <- b1 qbar``, ``u <- decay u + clip H_t ((1 - b1) D_t (.) qbar)`` with H_t's vectors f entering as
    the pair (P(f), P(D_t (.) f)).
    """
    names = list(proj.shapes)
    u = {n: proj(n, validation[n])[0] for n in names}
    q = {n: torch.zeros_like(u[n]) for n in names}
    out = []
    for rec, c in zip(reversed(records), reversed(coef)):
        cl = clip[rec.step]
        rc = {n: rank1(c[n], proj.shapes[n], eps) for n in names}
        qbar = {n: q[n] - scalar(c[n]["c1"]) * u[n] for n in names}
        out.append(-cl * (1 - b1) * sum(proj(n, rec.grads[n], rc[n]) @ qbar[n] for n in names))
        cv = curvature(rec)
        fq = sum(proj(n, cv.vectors[n], rc[n]) @ qbar[n] for n in names) * cv.coef * (1 - b1)
        for n in names:
            q[n] = b1 * qbar[n]
            u[n] = scalar(c[n]["decay"]) * u[n] + cl * (proj(n, cv.vectors[n]).T @ fq)
    out.reverse()
    return out


class _Logits(nn.Module):
    """``task.logits(model, batch)`` as a module, so ``functional_call`` can swap the parameters."""

    def __init__(self, traj: Trajectory):
        super().__init__()
        self.model, self.task = traj.net.model, traj.net.task

    def forward(self, batch: dict) -> torch.Tensor:
        return self.task.logits(self.model, batch)


def ggn_product(traj: Trajectory) -> Callable:
    """``(theta_t, t, c) -> G_t c``: the Gauss-Newton matrix of step t's weighted softmax cross-entropy,
    ``sum_z w_z J_z^T (diag(p_z) - p_z p_z^T) J_z``, times c (a JVP and a VJP of the logits)."""
    net = _Logits(traj)

    def product(params: dict, t: int, c: dict) -> list[torch.Tensor]:
        step = traj.steps[t]
        fixed = {f"model.{k}": v.detach() for k, v in params.items() if k not in c}

        def logits(trained: dict) -> torch.Tensor:
            return functional_call(net, fixed | {f"model.{k}": v for k, v in trained.items()}, (step.batch,))

        at = {k: params[k].detach() for k in c}
        out, jc = torch.func.jvp(logits, (at,), (c,))
        p = torch.softmax(out, -1)
        u = step.weights[:, None] * (p * jc - p * (p * jc).sum(-1, keepdim=True))
        (gc,) = torch.func.vjp(logits, at)[1](u)
        return [gc[k] for k in c]

    return product


def metrics(est: np.ndarray, truth: np.ndarray) -> dict:
    """bench_exact's phase metrics, or the count of non-finite estimates where the recursion diverged."""
    bad = int((~np.isfinite(est)).sum())
    return {"non_finite": bad} if bad else phase_metrics(est, truth)


def spread(values: list[float]) -> dict:
    """Median, min and max of a metric over capture seeds, and how many draws reach 0.85."""
    v = np.array(values)
    return {
        "median": float(np.median(v)),
        "min": float(v.min()),
        "max": float(v.max()),
        "n": len(v),
        "at_least_085": int((v >= 0.85).sum()),
    }


def measure(regime: str, points: int, workdir: Path, quick: bool, seeds: int) -> dict:
    """Train the unprojected store and the coordinate stores of ``regime``; every option against the same TSLOO."""
    sets = BASE + REGIMES[regime]
    if quick:
        sets += ["train.epochs=2", "data.subset=256", "data.eval_subset=64"]
    runs, cfgs = {}, {}

    def record(name: str, extra: list[str]) -> RunDir:
        cfgs[name] = load_config(ROOT / "configs" / "digits_mlp.yaml", sets + extra)
        runs[name] = RunDir(workdir / f"{regime}-{name}")
        train(cfgs[name], runs[name], force=True, progress=False)
        return runs[name]

    record("full", PROJECTIONS["full"])
    run = runs["full"]
    traj = load_trajectory(run)
    b, T = run.boundaries, run.boundaries[-1]
    truth = ground_truth(traj, points)
    model = model_at(run, 0)
    params = dict(model.named_parameters())
    specs = read_projection(run.projection)
    coords = StoredCoordinates(model, specs, torch.float64)
    adam = adam_run(run)
    records = [r for j in range(len(b) - 1) for r in read_segment(run.grads(j), range(b[j], b[j + 1]), kind="grads")]
    curv = curvature_fn(run, "fisher", range(len(b) - 1))
    val = val_vectors(run, cfgs["full"], T)
    coef = adam_coefficients(records, adam, coords, params)
    shapes = {n: s.shape for n, s in specs.items()}

    def recursion(c: Coef) -> list[torch.Tensor]:
        return [s[:, 0] for s in adam_direct_scores(records, adam, coords, params, val, curv, "model", coef=c)]

    def store_scores(kind: str, seed: int) -> tuple[list[torch.Tensor], int]:
        """The shipped recursion on a real ``kind`` store at 32x32 captured with ``capture.seed`` (its own run)."""
        store = record(f"{kind}-{seed}", [f"capture.k_a={K}", f"capture.k_s={K}", f"capture.kind={kind}",
                                          f"capture.seed={seed}"])  # fmt: skip
        recs = [r for j in range(len(b) - 1) for r in read_segment(store.grads(j), range(b[j], b[j + 1]), kind="grads")]
        crd = StoredCoordinates(model, read_projection(store.projection), torch.float64)
        v, cv = val_vectors(store, cfgs[f"{kind}-{seed}"], T), curvature_fn(store, "fisher", range(len(b) - 1))
        c = adam_coefficients(recs, adam, crd, params)
        scores = [s[:, 0] for s in adam_direct_scores(recs, adam, crd, params, v, cv, "model", coef=c)]
        shutil.rmtree(store.root)  # one store on disk at a time
        return scores, sum(sp.dim for sp in crd.specs.values())

    def phases(s: list[torch.Tensor]) -> dict:
        return {ph: metrics(np.array([float(s[t][p]) for t, p in occ]), gt) for ph, (occ, gt) in truth.items()}

    seeded = {kind: [store_scores(kind, seed) for seed in range(seeds)] for kind in STORES}
    options = {
        "elementwise D, unprojected": (recursion(coef), sum(s.dim for s in specs.values())),
        **{f"{label} {K}x{K}": seeded[kind][0] for kind, label in STORES.items()},
        "elementwise D, no v path, unprojected": (recursion(without_v(coef)), None),
        "rank-1 D, unprojected": (recursion(as_rank1(coef, shapes, adam.eps)), None),
        "frozen D per segment, unprojected": (recursion(frozen(coef, [r.step for r in records], b)), None),
    }
    for k in (None, K):
        kr = Kronecker(specs, k)
        dim = 2 * sum(p.spec.dim for p in kr.proj.values())  # P(g) and P(D (.) g)
        name = f"Kronecker, rank-1 D, no v path, {'unprojected' if k is None else f'{k}x{k}'}"
        options[name] = (kronecker_scores(records, coef, adam.clip, curv, val, adam.betas[0], adam.eps, kr), dim)
    fp64 = load_trajectory(run, fp64=True)
    options["exact sweep, Hessian, removal linearised"] = (exact_scores(fp64, removal="linear")[T], None)
    options["exact sweep, batch GGN for the Hessian"] = (
        exact_scores(fp64, removal="linear", curvature=ggn_product(fp64))[T],
        None,
    )
    return {
        "regime": regime,
        "steps": T,
        "options": {name: {"floats_per_vector": dim, "phases": phases(s)} for name, (s, dim) in options.items()},
        "seed_spread": {
            f"{label} {K}x{K}": {
                ph: {m: spread([phases(s)[ph][m] for s, _ in seeded[kind]]) for m in ("spearman", "pearson", "scale")}
                for ph in truth
            }
            for kind, label in STORES.items()
        },
    }


def cell(m: dict) -> str:
    """'Spearman / Pearson / scale', or where the recursion diverged."""
    if "non_finite" in m:
        return f"diverged ({m['non_finite']} non-finite)"
    return f"{m['spearman']:.3f} / {m['pearson']:.3f} / {m['scale']:.2f}"


def spread_table(results: list[dict]) -> str:
    """Spearman per phase over the capture seeds: median [min, max]."""
    lines = [
        "| regime | store | capture seeds | first epoch: Spearman median [min, max] "
        "| last epoch: Spearman median [min, max] | last epoch: draws >= 0.85 |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in results:
        for name, ph in r["seed_spread"].items():
            cells = [f"{ph[p]['spearman']['median']:.3f} [{ph[p]['spearman']['min']:.3f}, "
                     f"{ph[p]['spearman']['max']:.3f}]" for p in ("first", "last")]  # fmt: skip
            hit = ph["last"]["spearman"]["at_least_085"]
            n = ph["last"]["spearman"]["n"]
            lines.append(f"| {r['regime']} | {name} | {n} | {cells[0]} | {cells[1]} | {hit} / {n} |")
    return "\n".join(lines)


def table(results: list[dict]) -> str:
    lines = [
        "| regime | store (option) | floats per stored vector | first epoch: Spearman / Pearson / scale "
        "| last epoch: Spearman / Pearson / scale |",
        "|---|---|---:|---:|---:|",
    ]
    for r in results:
        for name, o in r["options"].items():
            dim = o["floats_per_vector"]
            cells = " | ".join(cell(o["phases"][ph]) for ph in ("first", "last"))
            lines.append(f"| {r['regime']} | {name} | {dim if dim else '—'} | {cells} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny runs (smoke test)")
    ap.add_argument("--points", type=int, default=100, help="TSLOO occurrences per phase")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--seeds", type=int, default=8, help="capture seeds per coordinate store (the spread table)")
    args = ap.parse_args()
    torch.set_default_dtype(torch.float64)
    points = 8 if args.quick else args.points
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-adam-proj-") as tmp:
        for regime in ADAM_REGIMES:
            results.append(measure(regime, points, Path(tmp), args.quick, 2 if args.quick else args.seeds))
            print(table(results[-1:]), spread_table(results[-1:]), sep="\n\n", flush=True)
    payload = {"machine": machine_info("cpu"), "quick": args.quick, "points": points, "results": results}
    out = args.out or RESULTS / f"bench_adam_projection{'_quick' if args.quick else ''}_cpu.json"
    write_json_atomic(out, payload)
    if not args.quick:
        text = table(results) + "\n\n" + spread_table(results)
        replace_doc_block(ROOT / "docs" / "RESULTS.md", "bench_adam_projection", text)
    print(table(results), spread_table(results), sep="\n\n")


if __name__ == "__main__":
    main()
