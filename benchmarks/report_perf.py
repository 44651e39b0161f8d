"""Regenerate the measured tables of docs/PERFORMANCE.md and the performance report of docs/RESULTS.md
from benchmarks/results/*.json.

python -m benchmarks.report_perf
"""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.bench_storage import table as storage_table
from benchmarks.common import RESULTS, replace_doc_block

DOC = Path(__file__).resolve().parent.parent / "docs" / "PERFORMANCE.md"
RESULTS_DOC = DOC.with_name("RESULTS.md")


def measured(m: dict) -> str:
    """The "Measured <date> on <machine>" line of a benchmark JSON's ``machine``."""
    return (
        f"Measured {m['date']} on {m['cpu_model']} ({m['cpu_cores']} cores, {m['torch_threads']} torch thread), "
        f"torch {m['torch_version']}, {m['device']}."
    )


def embed_table(d: dict) -> str:
    lines = [
        measured(d["machine"]),
        "",
        "| k (D) | steps | mode | ms/step | GFLOP/s | × roofline | direct speed-up |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for r in d["results"]:
        rf, sq, sg = r["roofline"], r["sequential"], r["segmented"]
        lines.append(
            f"| {r['k']} ({r['dim']}) | {r['steps']} | matmul roofline | {rf['s_per_step'] * 1e3:.3f} | "
            f"{rf['gflops']:.1f} | 1.00 | |"
        )
        lines.append(
            f"| | | sequential | {sq['s_per_step'] * 1e3:.3f} | {sq['gflops']:.1f} | **{sq['roofline_ratio']:.2f}** | |"
        )
        lines.append(
            f"| | | segmented (4 segs) | {sg['s_per_step'] * 1e3:.3f} | {sg['gflops']:.1f} | "
            f"{sg['roofline_ratio']:.2f} | |"
        )
        for v, x in r["direct"].items():
            lines.append(
                f"| | | direct V={v} | {x['s_per_step'] * 1e3:.3f} | {x['gflops']:.2f} | | "
                f"**{x['speedup_vs_sequential']:.1f}×** |"
            )
    return "\n".join(lines)


def capture_table(d: dict) -> str:
    lines = [
        measured(d["machine"]),
        "",
        "| workload | B | tracked layers | data | steps/s without | steps/s with | ratio (median) | range |",
        "|---|---:|---:|---|---:|---:|---:|---|",
    ]
    for r in d["results"]:
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['tracked_layers']} | {r['data']} | {r['steps_per_s_without']:.2f} | "
            f"{r['steps_per_s_with']:.2f} | **{r['ratio_median']:.2f}** | {r['ratio_min']:.2f}–{r['ratio_max']:.2f} |"
        )
    return "\n".join(lines)


def segments_table(d: dict) -> str:
    lines = [
        "| k (D) | per segment | segments total | slowest | sequential | compose (global embeddings) | "
        "`segment_scores` V=16 |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in d["results"]:
        sg = r["segmented"]
        per = " ".join(f"{x:.2f}" for x in sg["segment_seconds"])
        lines.append(
            f"| {r['k']} | {per} | {sum(sg['segment_seconds']):.2f} | {sg['segment_max_seconds']:.2f} | "
            f"{r['sequential']['seconds']:.2f} | {sg['compose_seconds']:.2f} | "
            f"{sg['segment_scores_seconds']:.3f} |"
        )
    return "\n".join(lines)


def performance_report(embed: dict, captures: list[dict], storage: dict | None) -> str:
    """The summary of docs/RESULTS.md: one line per measured ratio, then the storage table."""
    lines = ["| quantity | workload | measured | machine |", "|---|---|---:|---|"]
    for cap in captures:
        m = cap["machine"]
        where = m.get("gpu") or f"{m['cpu_model']}, {m['torch_threads']} thread"
        kind = cap["config"]["projection"].get("kind", "kronecker")
        for r in cap["results"]:
            lines.append(
                f"| capture overhead (time with / without, k = 32×32 {kind}) | {r['model']}, B = {r['batch']} | "
                f"**{r['ratio_median']:.2f}×** ({r['steps_per_s_without'] * r['batch']:.1f} → "
                f"{r['steps_per_s_with'] * r['batch']:.1f} samples/s) | {where} |"
            )
    m = embed["machine"]
    where = f"{m['cpu_model']}, {m['torch_threads']} thread"
    for r in embed["results"]:
        lines.append(
            f"| embedding mode ÷ matmul roofline (same run) | D = {r['dim']}, B = {r['batch']} | "
            f"**{r['sequential']['roofline_ratio']:.2f}** | {where} |"
        )
        ups = [x["speedup_vs_sequential"] for x in r["direct"].values()]
        lines.append(
            f"| direct ÷ embedding mode speed-up (V = {', '.join(r['direct'])}) | D = {r['dim']} | "
            f"**{min(ups):.1f}–{max(ups):.1f}×** | {where} |"
        )
    if storage:
        lines += ["", "Storage per training occurrence (bytes; `python -m benchmarks.bench_storage`):", ""]
        lines.append(storage_table(storage["results"]))
    return "\n".join(lines)


def main() -> None:
    embed = json.loads((RESULTS / "bench_embed_cpu.json").read_text())
    replace_doc_block(DOC, "bench_embed", embed_table(embed))
    replace_doc_block(DOC, "bench_segments", segments_table(embed))
    replace_doc_block(DOC, "bench_capture", capture_table(json.loads((RESULTS / "bench_capture_cpu.json").read_text())))
    names = ("bench_capture_cpu.json", "bench_capture_elementwise_cpu.json", "bench_capture_cuda.json")
    captures = [json.loads((RESULTS / n).read_text()) for n in names if (RESULTS / n).exists()]
    storage_json = RESULTS / "bench_storage_cpu.json"
    storage = json.loads(storage_json.read_text()) if storage_json.exists() else None
    replace_doc_block(RESULTS_DOC, "performance_report", performance_report(embed, captures, storage))
    print(f"updated {DOC} and {RESULTS_DOC}")


if __name__ == "__main__":
    main()
