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
    """Source run in the config's score mode (exact), detectors of both modes (both noise kinds, exact-LOO
    ceilings), the influence curve and phases of both modes, every retraining variant."""
    out = tmp_path / "bench_curation.json"
    cmd = [sys.executable, "-m", "benchmarks.bench_curation", "--quick", "--out", str(out)]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    payload = json.loads(out.read_text())
    assert payload["score_mode"] == payload["config"]["score"]["mode"] == "exact"
    assert {"DVEmb (exact)", "DVEmb (embedding)", "grad-dot", "training loss"} == set(payload["detection"])
    curves = payload["influence_curve"]
    assert set(curves) == {"exact", "embedding"} and curves["exact"]["phases"] == payload["phases"]
    assert all(len(c["mean_abs_score"]) == payload["phases"]["total_steps"] for c in curves.values())
    assert set(payload["detection_by_noise"]) == {"uniform", "pairflip"}
    assert "loo_ceiling" in payload["detection_by_noise"]["pairflip"]["per_seed"][0]
    assert set(payload["detection_by_noise"]["uniform"]["per_seed"][0]["phases"]) == {"exact", "embedding"}
    variants = {r["variant"] for r in payload["retrain_summary"]}
    assert {"prior-value selection at every step", "online selection at every step"} <= variants


# The GPU machine has torch, transformers, pyarrow, rich — not polars, pydantic or prefect. This
# sitecustomize makes every Python that benchmarks/gpu.sh starts see them as not installed: no finder
# finds their modules, no distribution lists them.
HIDE = """
import sys
from importlib.abc import MetaPathFinder

ABSENT = {"polars", "pydantic", "prefect"}


class Hide(MetaPathFinder):
    def __init__(self, inner):
        self.inner = inner

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ABSENT:
            return None
        return self.inner.find_spec(name, path, target)

    def invalidate_caches(self):
        getattr(self.inner, "invalidate_caches", lambda: None)()

    def find_distributions(self, *args, **kwargs):
        dists = getattr(self.inner, "find_distributions", lambda *a, **k: ())(*args, **kwargs)
        return (d for d in dists if (d.metadata["Name"] or "").lower() not in ABSENT)


sys.meta_path[:] = [Hide(f) for f in sys.meta_path if hasattr(f, "find_spec")]
"""


def test_gpu_script_quick_mode_without_polars_pydantic_prefect(tmp_path):
    """benchmarks/gpu.sh, every section at toy shapes on the CPU, with only the GPU machine's packages."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(HIDE)
    hidden = subprocess.run(
        [sys.executable, "-c", "import importlib.util as u; print(u.find_spec('polars'), u.find_spec('pydantic'))"],
        env=os.environ | {"PYTHONPATH": str(site)},
        capture_output=True,
        text=True,
    )
    assert hidden.stdout.split() == ["None", "None"], hidden.stderr
    out = tmp_path / "bench_gpu.json"
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(site), "PYTHON": sys.executable}
    cmd = ["bash", "benchmarks/gpu.sh", "--quick", "--device", "cpu", "--threads", "1", "--out", str(out)]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "passed" in res.stdout  # the store tests ran
    payload = json.loads(out.read_text())
    assert payload["gemm"][0]["tflops"] > 0
    cap = payload["capture"]
    assert cap["hf_model"] is True  # HF GPT-2 with its Conv1D layers captured
    variants = {v["variant"]: v for v in cap["variants"]}
    assert variants["async, slow disk"]["write_ms_median"] < variants["sync, slow disk"]["write_ms_median"]
    assert payload["embed"][0]["embedding"]["gflops"] > 0 and payload["embed"][0]["direct"]
    assert payload["exact"]["status"] in {"measured", "pending"}


def test_gpu_benchmark_exact_section_runs_on_cpu():
    """The exact-mode measurement (skipped where dvemb.replay.exact needs what is not installed)."""
    pytest.importorskip("dvemb.replay.exact")
    from rich.console import Console

    from benchmarks.bench_gpu import QUICK, exact_section

    r = exact_section(QUICK, "cpu", Console(quiet=True))
    assert r["status"] == "measured", r
    assert r["exact_over_training"] > 1.0  # a sweep replays the steps and then runs them backwards


def test_peer_adamw_quick_mode(tmp_path):
    """dattri-llm's AdamW-influence on a recorded dvemb AdamW run (skipped where the peer is not installed)."""
    pytest.importorskip("dattri_llm")
    out = tmp_path / "bench_peer_adamw.json"
    cmd = [sys.executable, "-m", "benchmarks.bench_peer_adamw", "--quick", "--out", str(out)]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    r = json.loads(out.read_text())["results"][0]
    assert r["occurrences_scored"] == 2 * 256  # every occurrence of the 2 quick epochs over 256 rows has a score
    assert r["layout_check_rel"] < 1e-10  # fp64: dvemb's rows sum to the g_t dattri-llm reads off the moments
    assert r["propagations_rel_diff"] < 1e-4  # dattri-llm's W- and query-side sweeps agree (its float32)
    last = r["phases"]["last"]["estimators"]["dattri-llm AdamWInfluence (propagation=train)"]
    assert last["spearman"] > 0.5 and last["scale"] > 0  # sign turned to TSLOO's (0.98 / 0.96 measured)


def test_adam_embed_benchmark_quick_mode(tmp_path):
    """The Adam-aware embedding tier's cost benchmark on tiny AdamW runs (subsample store, 4 and 1 segments):
    both modes timed, the embed stage wrote its files, and the two modes agree (the bench asserts 1e-9)."""
    out = tmp_path / "bench_adam_embed.json"
    cmd = [sys.executable, "-m", "benchmarks.bench_adam_embed", "--quick", "--repeats", "1", "--out", str(out)]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = json.loads(out.read_text())["results"]
    assert [(r["store"], r["segments"]) for r in rows] == [("subsample 32x32", 4), ("subsample 32x32", 1)]
    for r in rows:
        assert r["max_rel_diff"] <= 1e-9
        assert r["seconds"]["direct_per_query"] > 0 and r["seconds"]["embedding_per_query"] > 0
        assert len(r["seconds"]["embed_per_segment"]) == r["segments"]
        assert min(r["bytes"].values()) > 0  # gradients, curvature vectors, embeddings, propagators on disk
    # 3D floats per occurrence and a [3D, 3D] propagator per layer and segment: 4 segments hold 4x the propagators
    assert rows[0]["bytes"]["propagators"] == 4 * rows[1]["bytes"]["propagators"]
