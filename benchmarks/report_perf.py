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
    gpu = f"{m['gpu']} + " if m.get("gpu") else ""
    return (
        f"Measured {m['date']} on {gpu}{m['cpu_model']} ({m['cpu_cores']} cores, {m['torch_threads']} torch thread), "
        f"torch {m['torch_version']}, {m['device']}."
    )


def store_rows(r: dict, label: str) -> list[str]:
    """Rows of one store_compare result (bench_capture --disk, bench_gpu capture): one per variant."""
    rows = []
    for i, v in enumerate(r["variants"]):
        io = "write_ms_median" in v
        first = f" {label} " if i == 0 else " "
        rows.append(
            f"|{first}| {v['variant']} | {v['ms_per_step']:.2f} | **{v['ratio_median']:.2f}** "
            f"({v['ratio_min']:.2f}–{v['ratio_max']:.2f}) | "
            + (
                f"{v['write_ms_median']:.2f} / {v['write_ms_max']:.2f} | {v['close_ms_median']:.1f} | "
                f"{v['disk_ms_per_step']:.1f} |"
                if io
                else "| | |"
            )
        )
    return rows


STORE_HEADER = [
    "| workload | store | ms/step | × no capture (range) | `write()` ms median / max | flush at `close()` ms | "
    "disk ms/step |",
    "|---|---|---:|---:|---:|---:|---:|",
]


def store_summary(r: dict) -> str:
    return (
        f"slow disk {r['slow_disk_mb_per_s']:.1f} MB/s = {r['disk_fraction']:.2f} of a plain step per step "
        f"({r['store_bytes_per_step'] / 1e3:.0f} kB of rows per step); step time slow ÷ fast disk: "
        f"**async {r['async_slow_over_fast']:.2f}**, sync {r['sync_slow_over_fast']:.2f}"
    )


def disk_table(d: dict) -> str:
    """bench_capture --disk: step time with the store written sync / async on a fast / slow disk."""
    load = d["machine"].get("load_average_1_5_15min")
    busy = f" Load average while measuring: {load[0]:.1f} (1 min) on {d['machine']['cpu_cores']} cores." if load else ""
    lines = [measured(d["machine"]) + busy, "", *STORE_HEADER]
    for r in d["results"]:
        lines += store_rows(r, f"{r['model']}, B = {r['batch']}")
    lines.append("")
    lines += [f"- {r['model']}: {store_summary(r)}." for r in d["results"]]
    return "\n".join(lines)


def gpu_tables(d: dict | None) -> str:
    """bench_gpu (benchmarks/gpu.sh): GEMM peak, capture with the async store, embedding/direct, exact."""
    if d is None:
        return "Not measured yet: no `benchmarks/results/bench_gpu_cuda.json` (run `benchmarks/gpu.sh` on a GPU)."
    t = d["config"]["targets"]
    lines = [measured(d["machine"]), ""]
    for g in d.get("gemm", []):
        lines.append(f"- GEMM peak, {g['dtype']} {g['n']}³: **{g['tflops']:.0f} TFLOP/s**.")
    cap = d.get("capture")
    if cap:
        lines += [
            "",
            f"Capture: {cap['model']}, B = {cap['batch']}, {cap['precision']}, {cap['tracked_layers']} captured "
            f"layers at 32×32. Throughput with ÷ without capture (async store, real disk): "
            f"**{cap['throughput_ratio']:.2f}** ({cap['samples_per_s_without']:.1f} → "
            f"{cap['samples_per_s_with']:.1f} samples/s; target ≥ {t['capture_throughput_ratio']}); "
            f"{store_summary(cap)}.",
            "",
            *STORE_HEADER,
            *store_rows(cap, f"GPT-2 small, ctx {cap['tokens_per_sample']}"),
        ]
    if d.get("embed"):
        lines += [
            "",
            "| k (D) | layers × B | steps | mode | ms/step | GFLOP/s | × same-shape roofline |",
            "|---|---|---:|---|---:|---:|---:|",
        ]
        for r in d["embed"]:
            rf, e = r["roofline"], r["embedding"]
            lines.append(
                f"| {r['k']} ({r['dim']}) | {r['layers']} × {r['batch']} | {r['steps']} | matmul roofline | "
                f"{rf['s_per_step'] * 1e3:.3f} | {rf['gflops']:.0f} | 1.00 |"
            )
            lines.append(
                f"| | | | embedding (records on the device) | {e['s_per_step'] * 1e3:.3f} | {e['gflops']:.0f} | "
                f"**{e['roofline_ratio']:.2f}** |"
            )
            h = r.get("embedding_from_host")
            if h:
                lines.append(
                    f"| | | {h['steps']} | embedding (records in host memory) | {h['s_per_step'] * 1e3:.3f} | "
                    f"{h['gflops']:.0f} | {h['roofline_ratio']:.2f} |"
                )
            for v, x in r["direct"].items():
                lines.append(
                    f"| | | | direct V={v} ({x['speedup_vs_embedding']:.1f}× embedding) | "
                    f"{x['s_per_step'] * 1e3:.3f} | {x['gflops']:.1f} | {x['roofline_ratio']:.2f} |"
                )
    ex = d.get("exact")
    if ex:
        lines.append("")
        if ex["status"] == "measured":
            lines.append(
                f"Exact mode ({ex['model']}, B = {ex['batch']}, context {ex['context']}, {ex['steps']} steps): "
                f"**{ex['exact_over_training']:.2f}× training** the same steps ({ex['exact_s_per_step'] * 1e3:.0f} vs "
                f"{ex['train_s_per_step'] * 1e3:.0f} ms/step; target ≤ {t['exact_over_training']}×)."
            )
        else:
            lines.append(f"Exact mode: {ex['status']} — {ex['reason']}.")
    return "\n".join(lines)


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
    disk = RESULTS / "bench_capture_disk_cpu.json"
    if disk.exists():
        replace_doc_block(DOC, "bench_capture_disk", disk_table(json.loads(disk.read_text())))
    gpu = RESULTS / "bench_gpu_cuda.json"
    replace_doc_block(DOC, "bench_gpu", gpu_tables(json.loads(gpu.read_text()) if gpu.exists() else None))
    names = ("bench_capture_cpu.json", "bench_capture_elementwise_cpu.json", "bench_capture_cuda.json")
    captures = [json.loads((RESULTS / n).read_text()) for n in names if (RESULTS / n).exists()]
    storage_json = RESULTS / "bench_storage_cpu.json"
    storage = json.loads(storage_json.read_text()) if storage_json.exists() else None
    replace_doc_block(RESULTS_DOC, "performance_report", performance_report(embed, captures, storage))
    print(f"updated {DOC} and {RESULTS_DOC}")


if __name__ == "__main__":
    main()
