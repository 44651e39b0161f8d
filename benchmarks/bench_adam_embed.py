"""What the Adam-aware embedding tier costs and when it pays: embed once, then answer queries from embeddings.

For an AdamW run whose store keeps the gradients' own coordinates, a validation query can be answered two ways
with the same numbers (fp64: to 1e-9, asserted here):

* **direct** (``score.mode: direct``): one pass of the Adam-aware recursion over the gradient store
  (dvemb.score.state.state_occurrence_scores: the stored gradients, the curvature vectors, the boundary optimizer
  states rebuilt into (m, v) per step);
* **embedding** (``score.mode: embedding``): the embed stage (dvemb.embed.run.embed_segment, ``embed.write:
  always``) writes once per segment the local (theta, m, v) embeddings, 3D floats per occurrence, and a [3D, 3D]
  propagator per layer; a query is then one pass over those (dvemb.score.scores.segment_scores).

Measured per regime and store: seconds per query of each mode at the final checkpoint (V = 1, the mean validation
gradient as the score stage uses; its own cost, the same for both modes, reported apart), seconds of the embed stage
over all segments, the break-even number of queries ``embed / (direct - embedding)``, bytes on disk (embeddings +
propagators vs the gradient store: gradients + curvature vectors), and the relative difference of the two modes'
scores. Runs: the AdamW regimes of bench_exact (fp64 digits MLP 64 -> 32 -> 10 tanh, 1000 rows, GGN curvature
vectors, per-layer blocks), unprojected and under the AdamW default store (32x32 coordinate subsample), each with
4 segments and with 1. Both modes read memory-mapped files the page cache holds (just written); each per-query
time is the best of ``--repeats`` calls. Absolute seconds are noisy on a shared machine; compare ratios.

    OMP_NUM_THREADS=1 python -m benchmarks.bench_adam_embed          # about 10 minutes on 2 cores
    OMP_NUM_THREADS=1 python -m benchmarks.bench_adam_embed --quick  # smoke run
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch

from dvemb.capture.fisher import curvature_path
from dvemb.embed.recorded_state import adam_aware
from dvemb.embed.run import embed_segment, load_embeddings
from dvemb.score.run import val_vectors
from dvemb.score.scores import segment_scores
from dvemb.score.state import state_occurrence_scores
from dvemb.store.rundir import RunDir

try:  # run as a module (python -m benchmarks.bench_adam_embed) or loaded from a path
    from benchmarks.bench_exact import BASE, PROJECTIONS, REGIMES, ROOT
    from benchmarks.common import RESULTS, machine_info, record, replace_doc_block, write_json_atomic
except ImportError:  # pragma: no cover
    from bench_exact import BASE, PROJECTIONS, REGIMES, ROOT
    from common import RESULTS, machine_info, record, replace_doc_block, write_json_atomic

ADAM_REGIMES = ("adamw-5ep", "adamw-15ep")
STORES = {"unprojected": "full", "subsample 32x32": "32x32-sub", "rowwise 32x32": "32x32-row"}
QUICK = ["train.epochs=2", "data.subset=128", "data.eval_subset=64"]
TOL = 1e-9  # embedding vs direct, relative to the largest direct score (fp64)
DOC_HEADING = (
    "### Adam-aware embedding tier: cost and break-even (`bench_adam_embed`)\n\n"
    "`OMP_NUM_THREADS=1 python -m benchmarks.bench_adam_embed` (the AdamW runs of `bench_exact`, fp64, GGN "
    "vectors, per-layer blocks; one run's times on a shared 2-core machine, the module docstring says what "
    "is timed); raw JSON `benchmarks/results/bench_adam_embed_cpu.json`.\n\n"
)
R = TypeVar("R")


def best_of(fn: Callable[[], R], repeats: int) -> tuple[R, float]:
    """fn's result and the least wall-clock seconds of ``repeats`` calls."""
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return out, best


def size(paths: list[Path]) -> int:
    """Bytes of the files ``paths`` (the missing ones count 0)."""
    return sum(p.stat().st_size for p in paths if p.exists())


def measure(
    regime: str, store: str, segments: int, workdir: Path, quick: bool, repeats: int, curvature: dict | None = None
) -> dict:
    """Record one run; time a direct query, the embed stage and an embedding query; compare their scores.
    curvature: ``embed`` settings (curvature, blocks) both modes use instead of the recorded ones."""
    sets = BASE + REGIMES[regime] + PROJECTIONS[STORES[store]] + [f"embed.segments={segments}"]
    if quick:
        sets += QUICK
    run = RunDir(workdir / f"{regime}-{STORES[store]}-{segments}")
    cfg, t_train = record(sets, run)
    cfg = cfg.model_copy(update={"embed": cfg.embed.model_copy(update=curvature or {})})
    if not adam_aware(run):
        raise SystemExit(f"{run.root}: not an Adam-aware run (AdamW with a store of the gradients' own coordinates)")
    b = run.boundaries
    k, T = len(b) - 1, b[-1]
    val, t_val = best_of(lambda: val_vectors(run, cfg, T), 1)
    direct, t_direct = best_of(lambda: state_occurrence_scores(run, cfg, T, val), repeats)

    embed = cfg.embed.model_copy(update={"write": "always", "dtype": "float64"})
    t_segments = []
    for j in range(k):
        t0 = time.perf_counter()
        embed_segment(run, j, embed, "embedding")
        t_segments.append(time.perf_counter() - t0)
    t_embed = sum(t_segments)

    def query() -> list[torch.Tensor]:
        local, props = load_embeddings(run)
        return segment_scores(local, props, val)

    emb, t_query = best_of(query, repeats)
    scale = max(float(d.abs().max()) for d in direct)
    rel = max(float((e - d).abs().max()) for e, d in zip(emb, direct, strict=True)) / scale
    if not rel <= TOL:
        raise AssertionError(f"{regime} {store} {segments} segments: embedding vs direct {rel:.2e} > {TOL:g}")
    saved = t_direct - t_query
    grads = size([run.grads(j) for j in range(k)])
    curv = size([curvature_path(run, j) for j in range(k)])
    embs = size([run.embeddings(j) for j in range(k)])
    props = size([run.propagator(j) for j in range(k)])
    return {
        "regime": regime,
        "store": store,
        "segments": segments,
        "curvature": f"{cfg.embed.curvature}, {cfg.embed.blocks} blocks",
        "overrides": sets,
        "steps": T,
        "occurrences": sum(len(d) for d in direct),
        "floats_per_occurrence": {"store": sum(v.shape[1] for v in val.values())},  # embeddings: 3x
        "seconds": {
            "train_lightning": t_train,
            "validation_gradient": t_val,
            "direct_per_query": t_direct,
            "embed_stage": t_embed,
            "embed_per_segment": t_segments,
            "embedding_per_query": t_query,
        },
        "direct_over_embedding_per_query": t_direct / t_query,
        "break_even_queries": t_embed / saved if saved > 0 else None,
        "bytes": {"grads": grads, "curvature": curv, "embeddings": embs, "propagators": props},
        "embedding_over_store_bytes": (embs + props) / (grads + curv),
        "max_rel_diff": rel,
    }


def mb(n: int) -> str:
    return f"{n / 2**20:.1f}"


def table(results: list[dict]) -> str:
    lines = [
        "| regime | store | curvature | segments | steps | direct s / query | embed stage s | embedding s / query "
        "| direct / embedding per query | break-even queries | MB: store (grads + curvature) "
        "| MB: embeddings + propagators | max rel. diff |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        s, by = r["seconds"], r["bytes"]
        even = "never" if r["break_even_queries"] is None else f"{r['break_even_queries']:.1f}"
        lines.append(
            f"| {r['regime']} | {r['store']} | {r.get('curvature', 'fisher, layer blocks')} | {r['segments']} "
            f"| {r['steps']} | {s['direct_per_query']:.3f} "
            f"| {s['embed_stage']:.2f} | {s['embedding_per_query']:.3f} | {r['direct_over_embedding_per_query']:.2f}x "
            f"| {even} | {mb(by['grads'] + by['curvature'])} ({mb(by['grads'])} + {mb(by['curvature'])}) "
            f"| {mb(by['embeddings'] + by['propagators'])} ({mb(by['embeddings'])} + {mb(by['propagators'])}) "
            f"| {r['max_rel_diff']:.1e} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny runs of one regime and the subsample store (smoke test)")
    ap.add_argument("--regimes", nargs="*", default=None, help=f"default: {' '.join(ADAM_REGIMES)}")
    ap.add_argument("--stores", nargs="*", default=None, choices=list(STORES), help="default: both")
    ap.add_argument("--segments", nargs="*", type=int, default=[4, 1], help="embed.segments of the runs")
    ap.add_argument(
        "--all-segments-regimes",
        nargs="*",
        default=["adamw-5ep"],
        help="regimes run with every --segments value; the others with the first only (embedding an unprojected "
        "15-epoch run takes ~20 minutes on one core)",
    )
    ap.add_argument("--repeats", type=int, default=2, help="per-query times: best of this many calls")
    ap.add_argument("--curvature", default=None, help="embed.curvature of both modes (default: as recorded, fisher)")
    ap.add_argument("--blocks", default=None, help="embed.blocks of both modes (default: as recorded, layer)")
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/)")
    args = ap.parse_args()
    torch.set_default_dtype(torch.float64)
    regimes = args.regimes or (ADAM_REGIMES[:1] if args.quick else ADAM_REGIMES)
    stores = args.stores or (["subsample 32x32"] if args.quick else list(STORES))
    override = {k: v for k, v in (("curvature", args.curvature), ("blocks", args.blocks)) if v}
    tag = "".join(f"_{v}" for v in override.values())  # a curvature of its own: its own JSON and doc block
    out = args.out or RESULTS / f"bench_adam_embed{tag}{'_quick' if args.quick else ''}_cpu.json"
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-adam-embed-") as tmp:
        for regime in regimes:
            for store in stores:
                for segments in args.segments if regime in args.all_segments_regimes else args.segments[:1]:
                    results.append(measure(regime, store, segments, Path(tmp), args.quick, args.repeats, override))
                    print(table(results[-1:]), flush=True)
                    for p in (Path(tmp) / f"{regime}-{STORES[store]}-{segments}").glob("embeddings/*"):
                        p.unlink()  # an unprojected run's propagators are ~1 GB: keep one run's on disk
                    meta = {"machine": machine_info("cpu"), "quick": args.quick, "tolerance": TOL}
                    write_json_atomic(out, meta | {"results": results})  # after every row: kept if interrupted
    if not args.quick:
        block = f"bench_adam_embed{tag}"
        heading = (
            DOC_HEADING if not tag else f"The same with `--curvature {args.curvature} --blocks {args.blocks}`:\n\n"
        )
        replace_doc_block(ROOT / "docs" / "RESULTS.md", block, table(results), missing=heading)
    print(table(results))


if __name__ == "__main__":
    main()
