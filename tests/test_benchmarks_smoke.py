"""The benchmark scripts still run (their --quick smoke mode); the numbers live in docs/, not here."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["bench_embed", "bench_capture"])
def test_benchmark_quick_mode_writes_json(tmp_path, name):
    out = tmp_path / f"{name}.json"
    cmd = [
        sys.executable,
        "-m",
        f"benchmarks.{name}",
        "--quick",
        "--device",
        "cpu",
        "--threads",
        "1",
        "--out",
        str(out),
    ]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    payload = json.loads(out.read_text())
    assert payload["machine"]["device"] == "cpu" and payload["results"]


def test_curation_benchmark_quick_mode(tmp_path):
    """Source run, detectors (both noise kinds, exact-LOO ceilings), every retraining variant."""
    out = tmp_path / "bench_curation.json"
    cmd = [sys.executable, "-m", "benchmarks.bench_curation", "--quick", "--out", str(out)]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    payload = json.loads(out.read_text())
    assert set(payload["detection_by_noise"]) == {"uniform", "pairflip"}
    assert "loo_ceiling" in payload["detection_by_noise"]["pairflip"]["per_seed"][0]
    variants = {r["variant"] for r in payload["retrain_summary"]}
    assert {"prior-value selection at every step", "online selection at every step"} <= variants
