#!/usr/bin/env bash
# Set up dvemb in ./.venv (idempotent): torch 2.13.0 CPU first, so no resolver ever picks a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=.venv/.dvemb-setup-$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -f "$stamp" ]; then
  .venv/bin/python -m pip install -q --disable-pip-version-check "torch==2.13.0"
  .venv/bin/python -m pip install -q --disable-pip-version-check -e ".[dev]"
  .venv/bin/python -c "import torch, dvemb; assert torch.__version__.startswith('2.13.0'), torch.__version__"
  rm -f .venv/.dvemb-setup-*; touch "$stamp"
fi
export PREFECT_SERVER_ANALYTICS_ENABLED=false
