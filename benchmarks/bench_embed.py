"""Throughput of the DVEmb backward recursion: sequential, segmented, direct — against a matmul roofline.

Synthetic random StepGrads (B = 16 per step, two tracked layers of equal projected dim D, fp32).
For each D the same run measures:

* roofline  — ``torch.bmm`` [2,16,D]x[2,D,D] plus the in-place rank-B update ``M.baddbmm_`` with
  [2,D,16]x[2,16,D], i.e. the two matmuls one embedding step needs (4·B·D² FLOP per layer);
* sequential — ``embed_steps`` over all T steps;
* segmented  — 4 × ``embed_steps`` on T/4 steps each (meant to run in parallel, so the per-segment
  time is the wall-clock of a 4-worker run), then ``compose`` (global embeddings) and, as the cheap
  alternative, ``segment_scores`` with V = 16;
* direct     — ``direct_scores`` with V ∈ {1, 16} (4·B·D·V FLOP per layer per step).

Usage::

    python -m benchmarks.bench_embed            # full run (~3-4 min on a 2-core CPU)
    python -m benchmarks.bench_embed --quick    # smoke run (< 20 s)
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from benchmarks.common import bench_args, machine_info, make_sync, timed, write_json_atomic
from dvemb.embed.direct import direct_scores
from dvemb.embed.segments import compose, embed_steps
from dvemb.score.scores import segment_scores
from dvemb.types import Schedule, StepGrads

B = 16
LAYERS = ("layer0", "layer1")
N_SEGMENTS = 4
RESULTS = Path(__file__).resolve().parent / "results"


# --------------------------------------------------------------------------- helpers


def repeat_for(fn: Callable[[], object], sync: Callable[[], None], min_s: float) -> tuple[float, int]:
    """Call ``fn`` until ``min_s`` seconds have elapsed; (median seconds per call, calls)."""
    times: list[float] = []
    while sum(times) < min_s or not times:
        times.append(timed(fn, sync))
    return statistics.median(times), len(times)


def make_records(steps: int, dim: int, device: str, seed: int = 0) -> list[StepGrads]:
    """Random per-sample contributions g (|g| ≈ 1/B) for ``steps`` consecutive steps, w = 1/B."""
    gen = torch.Generator(device=device).manual_seed(seed)
    recs = []
    for t in range(steps):
        grads = {n: torch.randn(B, dim, generator=gen, device=device) / (B * math.sqrt(dim)) for n in LAYERS}
        recs.append(
            StepGrads(t, torch.arange(t * B, (t + 1) * B), torch.full((B,), 1.0 / B, dtype=torch.float64), grads)
        )
    return recs


def schedule(steps: int) -> Schedule:
    return Schedule(lr=[0.05] * steps, weight_decay=[1e-4] * steps)


def validation(v: int, dim: int, device: str) -> dict[str, torch.Tensor]:
    gen = torch.Generator(device=device).manual_seed(123)
    return {n: torch.randn(v, dim, generator=gen, device=device) / math.sqrt(dim) for n in LAYERS}


def embed_flops(steps: int, dim: int) -> float:
    """G Mᵀ (2·B·D²) + rank-B update (2·B·D²) per step per layer."""
    return steps * len(LAYERS) * 4.0 * B * dim * dim


def direct_flops(steps: int, dim: int, v: int) -> float:
    """G U (2·B·D·V) + U update (2·B·D·V) per step per layer."""
    return steps * len(LAYERS) * 4.0 * B * dim * v


# --------------------------------------------------------------------------- measurements


def roofline(dim: int, device: str, sync: Callable[[], None], min_s: float) -> dict:
    """GFLOP/s of the two raw matmuls of one embedding step on the same shapes (M in place)."""
    gen = torch.Generator(device=device).manual_seed(1)
    m = torch.randn(len(LAYERS), dim, dim, generator=gen, device=device) * 1e-3
    g = torch.randn(len(LAYERS), B, dim, generator=gen, device=device) * 1e-3
    gt = g.transpose(1, 2).contiguous()
    out = torch.empty(len(LAYERS), B, dim, device=device)
    n_inner = max(1, int(2e8 // (len(LAYERS) * 4 * B * dim * dim)))  # ~0.2 GFLOP per timed call

    def one_step() -> None:
        for _ in range(n_inner):
            torch.bmm(g, m, out=out)  # [2,16,D] x [2,D,D]
            m.baddbmm_(gt, g, alpha=1e-6)  # [2,D,16] x [2,16,D], rank-B in-place update

    def bmm_only() -> None:
        for _ in range(n_inner):
            torch.bmm(g, m, out=out)

    for _ in range(3):
        one_step()
    t_step, calls = repeat_for(one_step, sync, min_s)
    t_bmm, _ = repeat_for(bmm_only, sync, min_s / 4)
    per_step = t_step / n_inner
    flops = embed_flops(1, dim)
    return {
        "s_per_step": per_step,
        "gflops": flops / per_step / 1e9,
        "bmm_gflops": flops / 2 / (t_bmm / n_inner) / 1e9,
        "update_gflops": flops / 2 / (per_step - t_bmm / n_inner) / 1e9,
        "timed_calls": calls,
    }


def sequential(recs: list[StepGrads], sched: Schedule, device: str, sync: Callable[[], None]) -> dict:
    seconds = timed(lambda: embed_steps(recs, sched, torch.float32, device), sync)
    return {"seconds": seconds, "s_per_step": seconds / len(recs)}


def segmented(recs: list[StepGrads], sched: Schedule, device: str, sync: Callable[[], None], v_scores: int) -> dict:
    """4 segments one after the other (per-segment times = parallel workers), then compose."""
    size = len(recs) // N_SEGMENTS
    bounds = [(j * size, len(recs) if j == N_SEGMENTS - 1 else (j + 1) * size) for j in range(N_SEGMENTS)]
    locals_, props, seg_times = [], [], []
    for lo, hi in bounds:
        box: dict = {}

        def run(lo: int = lo, hi: int = hi, box: dict = box) -> None:
            box["out"] = embed_steps(recs[lo:hi], sched, torch.float32, device)

        seg_times.append(timed(run, sync))
        locals_.append(box["out"][0])
        props.append(box["out"][1])
    t_compose = timed(lambda: compose(locals_, props), sync)
    val = validation(v_scores, recs[0].grads[LAYERS[0]].shape[1], device)
    t_scores = timed(lambda: segment_scores(locals_, props, val), sync)
    return {
        "segment_seconds": seg_times,
        "segments_total_seconds": sum(seg_times),
        "segment_max_seconds": max(seg_times),
        "compose_seconds": t_compose,
        "segment_scores_seconds": t_scores,
        "segment_scores_v": v_scores,
        "s_per_step": sum(seg_times) / len(recs),
    }


def direct(recs: list[StepGrads], sched: Schedule, v: int, device: str, sync: Callable[[], None], min_s: float) -> dict:
    val = validation(v, recs[0].grads[LAYERS[0]].shape[1], device)

    def run() -> None:
        direct_scores(recs, sched, val, torch.float32, device)

    run()  # warm-up
    per_call, calls = repeat_for(run, sync, min_s)
    return {"s_per_step": per_call / len(recs), "repeats": calls, "steps": len(recs)}


def calibrate_steps(dim: int, device: str, sync: Callable[[], None], min_s: float) -> int:
    """Number of steps so that one sequential embed_steps takes at least ~``min_s`` (multiple of 4)."""
    probe = make_records(8, dim, device, seed=99)
    sched = schedule(8)
    embed_steps(probe, sched, torch.float32, device)  # warm-up (allocator, MKL)
    per_step = min(timed(lambda: embed_steps(probe, sched, torch.float32, device), sync) for _ in range(2)) / 8
    steps = math.ceil(1.5 * min_s / per_step / N_SEGMENTS) * N_SEGMENTS  # 1.5: margin for noisy probes
    return max(steps, 2 * N_SEGMENTS)


def bench_dim(side: int, device: str, min_s: float) -> dict:
    """All modes for one projected dim D = side² per layer."""
    dim = side * side
    sync = make_sync(device)
    steps = calibrate_steps(dim, device, sync, min_s)
    recs = make_records(steps, dim, device)
    sched = schedule(steps)
    roof = roofline(dim, device, sync, min_s)
    seq = sequential(recs, sched, device, sync)
    seg = segmented(recs, sched, device, sync, v_scores=16)
    dirs = {v: direct(recs, sched, v, device, sync, min_s) for v in (1, 16)}
    flops_step = embed_flops(1, dim)
    seq["gflops"] = flops_step / seq["s_per_step"] / 1e9
    seq["roofline_ratio"] = seq["gflops"] / roof["gflops"]
    seg["gflops"] = flops_step / seg["s_per_step"] / 1e9
    seg["roofline_ratio"] = seg["gflops"] / roof["gflops"]
    for v, d in dirs.items():
        d["gflops"] = direct_flops(1, dim, v) / d["s_per_step"] / 1e9
        d["speedup_vs_sequential"] = seq["s_per_step"] / d["s_per_step"]
    return {
        "k": f"{side}x{side}",
        "dim": dim,
        "layers": len(LAYERS),
        "batch": B,
        "steps": steps,
        "roofline": roof,
        "sequential": seq,
        "segmented": seg,
        "direct": {str(v): d for v, d in dirs.items()},
    }


# --------------------------------------------------------------------------- report


def report(results: list[dict], console: Console) -> None:
    """Two rich tables: per-mode throughput, and the segmented run's phases."""
    t = Table(title=f"DVEmb embedding throughput (B={B}, {len(LAYERS)} layers of dim D, fp32)")
    for col in ("k (D)", "steps", "mode", "ms/step", "GFLOP/s", "x roofline", "direct speed-up"):
        t.add_column(col, justify="left" if col == "mode" else "right")
    for r in results:
        roof, seq, seg = r["roofline"], r["sequential"], r["segmented"]
        t.add_row(
            f"{r['k']} ({r['dim']})",
            str(r["steps"]),
            "matmul roofline",
            f"{roof['s_per_step'] * 1e3:.3f}",
            f"{roof['gflops']:.1f}",
            "1.00",
            "",
        )
        for name, m in (("sequential", seq), ("segmented (4 segs)", seg)):
            t.add_row(
                "", "", name, f"{m['s_per_step'] * 1e3:.3f}", f"{m['gflops']:.1f}", f"{m['roofline_ratio']:.2f}", ""
            )
        for v, d in r["direct"].items():
            t.add_row(
                "",
                "",
                f"direct V={v}",
                f"{d['s_per_step'] * 1e3:.4f}",
                f"{d['gflops']:.2f}",
                "",
                f"{d['speedup_vs_sequential']:.1f}x",
            )
        t.add_section()
    console.print(t)
    s = Table(title="Segmented mode phases (seconds; segments are independent -> parallel workers)")
    for col in (
        "k (D)",
        "steps",
        "per segment",
        "segments total",
        "slowest segment",
        "sequential",
        "compose (global emb.)",
        "segment_scores V=16",
    ):
        s.add_column(col, justify="right")
    for r in results:
        seg = r["segmented"]
        s.add_row(
            f"{r['k']} ({r['dim']})",
            str(r["steps"]),
            " ".join(f"{x:.2f}" for x in seg["segment_seconds"]),
            f"{seg['segments_total_seconds']:.2f}",
            f"{seg['segment_max_seconds']:.2f}",
            f"{r['sequential']['seconds']:.2f}",
            f"{seg['compose_seconds']:.2f}",
            f"{seg['segment_scores_seconds']:.3f}",
        )
    console.print(s)


def targets(results: list[dict]) -> dict:
    """Issue targets: embedding ≥ 50 % of the roofline; direct ≥ 10× faster for V ≤ 16."""
    emb = {r["k"]: r["sequential"]["roofline_ratio"] for r in results}
    spd = {r["k"]: min(d["speedup_vs_sequential"] for d in r["direct"].values()) for r in results}
    return {
        "embedding_roofline_ratio": emb,
        "embedding_target_met": {k: v >= 0.5 for k, v in emb.items()},
        "direct_min_speedup": spd,
        "direct_target_met": {k: v >= 10 for k, v in spd.items()},
    }


def main() -> None:
    args = bench_args(__doc__.split("\n\n")[0])
    console = Console(width=140)
    # (side, seconds of sequential work): >= 10 s at the biggest k, >= ~2-3 s below it.
    plan = [(16, 0.3), (32, 0.3)] if args.quick else [(16, 3.0), (32, 3.0), (64, 10.0)]
    results = []
    for side, min_s in plan:
        console.log(f"k = {side}x{side} (D = {side * side}) ...")
        results.append(bench_dim(side, args.device, min_s))
    report(results, console)
    payload = {
        "benchmark": "bench_embed",
        "quick": args.quick,
        "machine": machine_info(args.device),
        "config": {"batch": B, "layers": list(LAYERS), "segments": N_SEGMENTS, "dtype": "float32"},
        "results": results,
        "targets": targets(results),
    }
    name = "bench_embed_quick" if args.quick else "bench_embed"
    out = args.out or RESULTS / f"{name}_{args.device}.json"
    write_json_atomic(out, payload)
    console.print(json.dumps(payload["targets"], indent=2))
    console.log(f"wrote {out}")


if __name__ == "__main__":
    main()
