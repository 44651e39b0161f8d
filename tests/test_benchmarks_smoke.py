"""The benchmark scripts still run (their --quick smoke mode); the numbers live in docs/, not here."""

import json
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
