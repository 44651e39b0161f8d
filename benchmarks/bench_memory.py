"""Peak memory of the embed + score stages at T and 4T steps: segment-at-a-time streaming keeps it flat.

The default demo's model and projection (MNIST MLP 784 -> 128 -> 64 -> 10, 32x32 Kronecker projection:
D = 2368 values per occurrence, float32 store) on a ``--subset`` of MNIST, batch 64, SGD. T = ``--epochs``
epochs, 4T = 4x as many; the segment length is fixed (``--segments-per-epoch``), so 4T has 4x the segments:
memory should follow the segment, not the run. Scores at the final checkpoint only
(``score.checkpoints=false``: with every checkpoint the output table itself has K x occurrences rows).

Per point, training runs once (not measured). Then each scoring mode runs the embed and score stages
the way the pipeline does (embed every segment — embeddings are written for ``embedding`` mode only —
then score) in a FRESH Python process, which reports its peak resident set size (``ru_maxrss``: heap
and the mapped store pages it touched) and its RSS after the imports (``baseline``). The ratio
peak(4T) / peak(T) is the figure of merit (target <= 1.2).

    OMP_NUM_THREADS=1 python -m benchmarks.bench_memory               # ~6 min on 2 cores
    OMP_NUM_THREADS=1 python -m benchmarks.bench_memory --quick       # smoke run (~1 min)
    # the same measurement on another checkout (e.g. before streaming), without touching the doc:
    python benchmarks/bench_memory.py --tree /path/to/checkout --out /tmp/before.json

Writes benchmarks/results/bench_memory_cpu.json and the table block in docs/SCALE.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODES = ("exact", "direct", "embedding")
KINDS = {  # kind -> glob under the run directory
    "gradients": "grads/seg-*.arrow",
    "embeddings": "embeddings/seg-*.arrow",
    "propagators": "embeddings/*-propagator.safetensors",
    "checkpoints": "checkpoints/*.safetensors",
}


def rss_kib() -> tuple[int, int]:
    """(current, peak) resident set size of this process in KiB."""
    current = 0
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            current = int(line.split()[1])
    return current, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def config_sets(subset: int, epochs: int, per_epoch: int) -> list[str]:
    return [
        f"data.subset={subset}",
        "data.eval_subset=1000",
        f"train.epochs={epochs}",
        f"embed.segments={epochs * per_epoch}",
        "capture.dtype=float32",
        "score.checkpoints=false",
    ]


# --- child processes (they import dvemb from the working directory's checkout) ----------------------


def child_train(out: str, sets: list[str]) -> dict:
    import logging

    from dvemb.config import load_config
    from dvemb.store.rundir import RunDir
    from dvemb.train.run import train

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    t0 = time.perf_counter()
    run = train(load_config(ROOT / "configs" / "mnist_mlp.yaml", sets), RunDir(out), force=True, progress=False)
    return {"seconds": time.perf_counter() - t0, "steps": run.boundaries[-1], "segments": len(run.boundaries) - 1}


def child_measure(out: str, mode: str) -> dict:
    """embed (every segment) + score in ``mode``, as the pipeline runs them; memory and time of each."""
    import inspect

    import torch

    from dvemb.embed.run import embed_segment
    from dvemb.pipeline import config_of
    from dvemb.score.run import score
    from dvemb.store.rundir import RunDir

    torch.set_num_threads(1)
    run = RunDir(out)
    cfg = config_of(run, [f"score.mode={mode}"])
    mode_arg = [mode] if "score_mode" in inspect.signature(embed_segment).parameters else []  # older checkouts
    baseline = rss_kib()[0]
    t0 = time.perf_counter()
    for j in range(len(run.boundaries) - 1):
        embed_segment(run, j, cfg.embed, *mode_arg)
    t_embed = time.perf_counter() - t0
    peak_embed = rss_kib()[1]
    t0 = time.perf_counter()
    score(run, cfg)
    t_score = time.perf_counter() - t0
    return {
        "baseline_kib": baseline,
        "peak_after_embed_kib": peak_embed,
        "peak_kib": rss_kib()[1],
        "seconds": {"embed": t_embed, "score": t_score},
        "bytes": {k: sum(p.stat().st_size for p in run.root.glob(g)) for k, g in KINDS.items()},
    }


def spawn(tree: Path, *args: str) -> dict:
    """Run this file's child command in a fresh interpreter importing dvemb from ``tree``; its JSON result."""
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
    res = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--child", *args],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
    )
    if res.returncode != 0:
        raise SystemExit(f"child {args[:2]} failed:\n{res.stderr[-4000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


# --- the benchmark ----------------------------------------------------------------------------------


def measure_tree(tree: Path, subset: int, epochs: int, per_epoch: int, workdir: Path) -> dict:
    points = []
    for factor in (1, 4):
        out = workdir / f"run-x{factor}"
        sets = config_sets(subset, epochs * factor, per_epoch)
        trained = spawn(tree, "train", str(out), json.dumps(sets))
        modes = {mode: spawn(tree, "measure", str(out), mode) for mode in MODES}
        points.append({"factor": factor, "overrides": sets, "train": trained, "modes": modes})
        print(table_rows(points[-1:], subset), flush=True)
    ratios = {m: points[1]["modes"][m]["peak_kib"] / points[0]["modes"][m]["peak_kib"] for m in MODES}
    return {"tree": str(tree), "points": points, "peak_ratio_4T_over_T": ratios}


def table_rows(points: list[dict], subset: int) -> str:
    lines = []
    for p in points:
        for mode, m in p["modes"].items():
            b = m["bytes"]
            lines.append(
                f"| {p['train']['steps']} | {subset} | {p['train']['segments']} | {mode} | "
                f"{b['gradients'] / 2**20:,.0f} | {(b['embeddings'] + b['propagators']) / 2**20:,.0f} | "
                f"{p['train']['seconds']:.0f} | {m['seconds']['embed']:.1f} | {m['seconds']['score']:.1f} | "
                f"{m['baseline_kib'] / 1024:,.0f} | {m['peak_kib'] / 1024:,.0f} | "
                f"{(m['peak_kib'] - m['baseline_kib']) / 1024:,.0f} |"
            )
    return "\n".join(lines)


def table(result: dict) -> str:
    head = (
        f"Measured {result['machine']['date']} on {result['machine']['cpu']} ({result['machine']['cores']} cores, "
        f"1 thread). Model: MNIST MLP 784-128-64-10, 3 layers, 32x32 projection (D = 2368 per occurrence, "
        f"float32 store), batch 64, {result['segments_per_epoch']} segments per epoch.\n\n"
        "| steps | samples | segments | mode | gradients MiB | embeddings + propagators MiB | train s "
        "| embed s | score s | RSS after imports MiB | peak RSS MiB | peak - imports MiB |\n"
        "|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    ratio = ", ".join(f"{m} {r:.2f}" for m, r in result["peak_ratio_4T_over_T"].items())
    return f"{head}\n{table_rows(result['points'], result['subset'])}\n\nPeak RSS 4T / T: {ratio}."


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="smoke run: 1000 samples")
    ap.add_argument("--subset", type=int, default=10000, help="MNIST training rows")
    ap.add_argument("--epochs", type=int, default=1, help="epochs of the T point (4T: 4x)")
    ap.add_argument("--segments-per-epoch", type=int, default=2)
    ap.add_argument("--tree", type=Path, default=ROOT, help="checkout whose dvemb is measured")
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/)")
    args = ap.parse_args()
    if args.child:
        what, out, arg = args.child
        print(json.dumps(child_train(out, json.loads(arg)) if what == "train" else child_measure(out, arg)))
        return
    subset = 1000 if args.quick else args.subset
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        result = measure_tree(args.tree.resolve(), subset, args.epochs, args.segments_per_epoch, Path(tmp))
    cpu = next(
        (ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines() if "model name" in ln),
        platform.processor(),
    )
    result.update(
        subset=subset,
        epochs=args.epochs,
        segments_per_epoch=args.segments_per_epoch,
        quick=args.quick,
        machine={"cpu": cpu, "cores": os.cpu_count(), "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")},
    )
    print(table(result))
    sys.path.insert(0, str(ROOT))
    from benchmarks.common import RESULTS, replace_doc_block, write_json_atomic

    out = args.out or RESULTS / ("bench_memory_quick_cpu.json" if args.quick else "bench_memory_cpu.json")
    write_json_atomic(out, result)
    print(f"wrote {out}")
    if not args.quick and args.out is None and args.tree.resolve() == ROOT:
        replace_doc_block(ROOT / "docs" / "SCALE.md", "bench_memory", table(result))


if __name__ == "__main__":
    main()
