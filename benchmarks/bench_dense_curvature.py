"""Which curvature would be exact? Dense per-step matrices on the digits MLP (2410 parameters, fp64).

The DVEmb recursion is exact given H_t (docs/DESIGN.md §4); what limits fidelity is the curvature it uses.
Here every step's full 2410 x 2410 matrix is formed with ``torch.func`` and the validation gradient is
propagated backward through ``A_t = I - eta_t H_t`` (direct, validation-first scoring), for:

* the exact Hessian of the batch loss L_t = sum_z w_z l_z at theta_t;
* the Gauss-Newton matrix (= true Fisher for softmax cross-entropy), sum_z w_z J_z^T (diag p - p p^T) J_z;
* the empirical Fisher sum_z (1/w_z) g_z g_z^T;

each as one full matrix and block-diagonal per layer (what ``embed.blocks: layer`` assumes). Spearman
against the exact TSLOO of the same 320 last-epoch occurrences as ``bench_fidelity``.

    OMP_NUM_THREADS=1 python -m benchmarks.bench_dense_curvature     # ~3 min per regime on 1 core

Writes benchmarks/results/bench_dense_curvature_cpu.json and its block in docs/RESULTS.md.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.func import functional_call, grad, hessian, jacrev, vmap

from benchmarks.bench_fidelity import DATASETS, ROOT, B, Experiment, ground_truth, train
from benchmarks.common import RESULTS, machine_info, replace_doc_block, write_json_atomic
from dvemb.eval.metrics import spearman
from dvemb.task import masked_cross_entropy

CURVATURES = ("hessian", "ggn", "empirical")


def flat_fns(exp: Experiment):
    """Loss / logits as functions of one flat parameter vector, the per-layer index blocks, theta_t flat."""
    names = [n for n, _ in exp.model.named_parameters()]
    shapes = [exp.params[0][n].shape for n in names]
    sizes = [s.numel() for s in shapes]

    def unflat(theta: torch.Tensor) -> dict[str, torch.Tensor]:
        return {n: p.view(s) for n, p, s in zip(names, theta.split(sizes), shapes, strict=True)}

    def logits(theta, x):
        return functional_call(exp.model, unflat(theta), (x,))

    def losses(theta, x, y):
        return masked_cross_entropy(logits(theta, x), y)

    layer_of = [n.rsplit(".", 1)[0] for n in names]
    blocks, start = {}, 0
    for layer, size in zip(layer_of, sizes, strict=True):
        a, _ = blocks.get(layer, (start, start))
        blocks[layer] = (a, start + size)
        start += size
    flat = [torch.cat([p[n].reshape(-1) for n in names]) for p in exp.params]
    return logits, losses, list(blocks.values()), flat


def curvature(kind: str, theta, batch, logits, losses, grads: torch.Tensor) -> torch.Tensor:
    """Dense [P, P] curvature of step t's weighted loss at theta; grads: per-sample grad l_z [B, P]."""
    x, y, w = batch.x, batch.y, batch.weights
    if kind == "hessian":
        return hessian(lambda th: (w * losses(th, x, y)).sum())(theta)
    if kind == "ggn":
        jac = vmap(jacrev(lambda th, xi: logits(th, xi[None])[0]), in_dims=(None, 0))(theta, x)  # [B, C, P]
        p = torch.softmax(logits(theta, x), dim=-1)
        mid = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]  # [B, C, C]
        return torch.einsum("b,bcp,bcd,bdq->pq", w, jac, mid, jac)
    if kind == "empirical":
        return (w[:, None] * grads).T @ grads  # sum_z (1/w) (w grad l)(w grad l)^T
    raise ValueError(kind)


def block_diagonal(h: torch.Tensor, blocks: list[tuple[int, int]]) -> torch.Tensor:
    out = torch.zeros_like(h)
    for a, b in blocks:
        out[a:b, a:b] = h[a:b, a:b]
    return out


def dense_scores(exp: Experiment) -> dict[str, torch.Tensor]:
    """Occurrence scores (row t*B + position) for every curvature, full and block-diagonal."""
    logits, losses, blocks, flat = flat_fns(exp)
    T = len(exp.batches)
    xv, yv = exp.val
    v = grad(lambda th: losses(th, xv, yv).mean())(flat[T])
    u = {f"{k}-{form}": v.clone() for k in CURVATURES for form in ("full", "block")}
    scores = {name: torch.empty(T * B, dtype=torch.float64) for name in u}
    for t in reversed(range(T)):
        b, lr = exp.batches[t], exp.schedule.at(t)[0]
        per_sample = vmap(grad(lambda th, xi, yi: losses(th, xi[None], yi[None])[0]), in_dims=(None, 0, 0))
        dl = per_sample(flat[t], b.x, b.y)  # grad l_z [B, P]
        g = b.weights[:, None] * dl  # g_{t,z} = w grad l_z
        for kind in CURVATURES:
            h = curvature(kind, flat[t], b, logits, losses, dl)
            for form, m in (("full", h), ("block", block_diagonal(h, blocks))):
                name = f"{kind}-{form}"
                scores[name][t * B : (t + 1) * B] = lr * (g @ u[name])
                u[name] = u[name] - lr * (m @ u[name])
    return scores


def run(regimes: list[str], seed: int = 0) -> dict:
    torch.set_default_dtype(torch.float64)
    setup = DATASETS["digits"]
    out = {}
    for name in regimes:
        epochs, lr = setup.regimes[name]
        t0 = time.perf_counter()
        exp = train(epochs, lr, seed, "digits")
        pick, ts, *_ = ground_truth(exp, setup.n_points, 0, seed)
        rows = torch.tensor([t * B + p for t, p in pick])
        scores = dense_scores(exp)
        out[name] = {
            "epochs": epochs,
            "lr": lr,
            "spearman": {k: spearman(s[rows], ts) for k, s in scores.items()},
            "seconds": time.perf_counter() - t0,
        }
        print(name, {k: round(v, 3) for k, v in out[name]["spearman"].items()}, flush=True)
    torch.set_default_dtype(torch.float32)
    return out


def table(res: dict) -> str:
    lines = [
        "| regime | curvature | full matrix | block-diagonal per layer |",
        "|---|---|---:|---:|",
    ]
    for regime, r in res["regimes"].items():
        for k in CURVATURES:
            sp = r["spearman"]
            lines.append(
                f"| {regime} (10 epochs, lr {r['lr']}) | {k} | {sp[k + '-full']:.3f} | {sp[k + '-block']:.3f} |"
            )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--regimes", nargs="+", default=["long", "long-lr0.3"])
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    res = {"regimes": run(args.regimes), "machine": machine_info("cpu")}
    res["seconds"] = time.perf_counter() - t0
    write_json_atomic(RESULTS / "bench_dense_curvature_cpu.json", res)
    m = res["machine"]
    body = (
        f"Digits MLP, unprojected, Spearman vs exact TSLOO (320 last-epoch occurrences); measured {m['date']} on "
        f"{m['cpu_model']}, {res['seconds']:.0f} s; `python -m benchmarks.bench_dense_curvature`.\n\n{table(res)}\n"
    )
    print(body)
    replace_doc_block(ROOT / "docs" / "RESULTS.md", "bench_dense_curvature", body)


if __name__ == "__main__":
    main()
