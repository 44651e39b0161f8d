"""Storage bytes per training occurrence of a real run directory, by kind of file.

Runs the pipeline (``dvemb.pipeline.run_local``) on each config into a temp dir — or measures the run
directories given with ``--run-dir`` — and divides the bytes of each kind of file by the number of
occurrences (rows of trajectory/batches.parquet). The payload of one occurrence is its projected
gradient, D = sum over layers of k_s * k_a values of the capture dtype; ``overhead`` is how much the
Arrow file carries on top (sample id, weight, step framing).

    OMP_NUM_THREADS=1 python -m benchmarks.bench_storage        # ~1 min on 2 CPU cores

Writes benchmarks/results/bench_storage_cpu.json; ``python -m benchmarks.report_perf`` puts the table
into docs/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from pathlib import Path

import polars as pl

from benchmarks.common import RESULTS, machine_info, write_json_atomic
from dvemb.config import load_config
from dvemb.pipeline import config_of, run_local
from dvemb.store.rundir import RunDir

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ("configs/mnist_mlp.yaml", "configs/mnist_noisy.yaml")
KINDS = {  # kind -> glob under the run directory
    "gradients": "grads/seg-*.arrow",
    "curvature vectors": "grads/curv-*.arrow",
    "embeddings": "embeddings/seg-*.arrow",
    "segment propagators": "embeddings/*-propagator.safetensors",
    "checkpoints": "checkpoints/*.safetensors",
    "trajectory": "trajectory/*.parquet",
    "scores": "scores/*.parquet",
}
DTYPE_BYTES = {"float32": 4, "float64": 8, "float16": 2, "bfloat16": 2}


def measure(run: RunDir) -> dict:
    """Bytes per occurrence of each kind of file, next to the projected-gradient payload."""
    cfg = config_of(run)
    proj = json.loads(run.projection.read_text())
    dim = sum(layer["dim"] for layer in proj["layers"].values())
    payload = dim * DTYPE_BYTES[proj["dtype"]]
    n_occ = pl.read_parquet(run.batches).height
    kinds = {}
    for kind, pattern in KINDS.items():
        files = sorted(run.root.glob(pattern))
        total = sum(f.stat().st_size for f in files)
        kinds[kind] = {"files": len(files), "bytes": total, "bytes_per_occurrence": total / n_occ}
    grads = kinds["gradients"]["bytes_per_occurrence"]
    return {
        "config": cfg.name,
        "curvature": cfg.embed.curvature,
        "score_mode": cfg.score.mode,
        "layers": {n: f"{v['k_s']}x{v['k_a']} of {v['d_out']}x{v['d_in']}" for n, v in proj["layers"].items()},
        "dim": dim,
        "dtype": proj["dtype"],
        "occurrences": n_occ,
        "payload_bytes_per_occurrence": payload,
        "gradient_overhead": grads / payload - 1,
        "kinds": kinds,
    }


def table(results: list[dict]) -> str:
    lines = [
        "| run | D (dtype) | occurrences | gradient payload B/occ | " + " | ".join(KINDS) + " |",
        "|---|---:|---:|---:|" + "---:|" * len(KINDS),
    ]
    for r in results:
        cells = [f"{r['kinds'][k]['bytes_per_occurrence']:,.0f}" if r["kinds"][k]["files"] else "—" for k in KINDS]
        lines.append(
            f"| {r['config']} ({r['curvature']} curvature, {r['score_mode']} scoring) | {r['dim']} ({r['dtype']}) | "
            f"{r['occurrences']} | {r['payload_bytes_per_occurrence']:,} | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run-dir", type=Path, action="append", default=[], help="measure this finished run")
    ap.add_argument("--out", type=Path, default=RESULTS / "bench_storage_cpu.json")
    args = ap.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    results = [measure(RunDir(p)) for p in args.run_dir]
    if not args.run_dir:
        with tempfile.TemporaryDirectory(prefix="bench_storage_") as tmp:
            for i, path in enumerate(CONFIGS):
                run = run_local(load_config(ROOT / path), Path(tmp) / f"run{i}", progress=False)
                results.append(measure(run))
    print(table(results))
    write_json_atomic(args.out, {"benchmark": "bench_storage", "machine": machine_info("cpu"), "results": results})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
