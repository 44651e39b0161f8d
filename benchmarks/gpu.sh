#!/usr/bin/env bash
# One entry point for a GPU machine (an H200 here): what is installed, the CUDA tests of the gradient
# store, then every GPU measurement (benchmarks/bench_gpu.py, < 8 min on an H200). Rerunnable.
#
#   benchmarks/gpu.sh [bench_gpu flags, e.g. --sections capture,embed]
#   benchmarks/gpu.sh --quick --device cpu --out /tmp/x.json   # CPU smoke run (tests/test_benchmarks_smoke.py)
#
# Needs python3 with torch (CUDA), transformers, pyarrow, rich; no polars, pydantic or prefect.
# Writes benchmarks/results/bench_gpu_cuda.json (copied to $OUT when that is set) and prints a summary;
# `python -m benchmarks.report_perf` turns the JSON into docs/PERFORMANCE.md rows.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}

echo "== environment"
"$PY" -c '
from importlib import metadata
for name in "torch transformers lightning pyarrow tokenizers rich typer safetensors polars pydantic prefect".split():
    try:
        print(f"{name:13s} {metadata.version(name)}")
    except metadata.PackageNotFoundError:
        print(f"{name:13s} (not installed)")
'
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv || true
"$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda,
    torch.cuda.get_device_name() if torch.cuda.is_available() else "(no CUDA device)")' || exit 1

echo "== CUDA tests of the gradient store (pinned-memory copies)"
"$PY" -m pytest -q -p no:cacheprovider tests/test_gradstore_async.py || echo "!! store tests failed (measuring anyway)"

echo "== measurements"
timeout 450 "$PY" -m benchmarks.bench_gpu --device cuda "$@"
rc=$?
if [ -n "${OUT:-}" ] && [ -f benchmarks/results/bench_gpu_cuda.json ]; then
    cp benchmarks/results/bench_gpu_cuda.json "$OUT"/
fi
exit $rc
