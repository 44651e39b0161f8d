"""Storage budget and bounded memory: half-precision gradient stores, embeddings written only when they are
reused (embed.write), ``dvemb gc`` on finished runs, and segment-at-a-time reading of a run's store."""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pytest
import torch
from typer.testing import CliRunner

from dvemb.cli import app
from dvemb.config import ConfigError, load_config
from dvemb.store import gradstore, integrity
from dvemb.store.gradstore import SegmentedRecords, SegmentWriter, read_segment
from dvemb.store.rundir import RunDir
from dvemb.types import StepGrads

ROOT = Path(__file__).resolve().parents[1]
DIMS = {"fc1": 6, "fc2": 4}
TINY = ["train.epochs=1", "data.subset=200", "embed.segments=2"]  # 7 steps, boundaries [0, 4, 7]
runner = CliRunner()


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_line(res) -> str:
    return " ".join(res.output.split())


def records(n: int, first: int = 0) -> list[StepGrads]:
    gen = torch.Generator().manual_seed(first)
    return [
        StepGrads(
            t,
            torch.arange(3) + 10 * t,
            torch.rand(3, generator=gen, dtype=torch.float64),
            # per-sample gradient scales from 1e-6 to 1e2, as in a real store
            {
                k: torch.randn(3, d, generator=gen) * 10.0 ** torch.randint(-6, 3, (3, 1), generator=gen)
                for k, d in DIMS.items()
            },
        )
        for t in range(first, first + n)
    ]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_store_reads_back_the_rounded_values_as_float32(tmp_path, dtype):
    recs = records(5)
    for mode in (False, True):
        with SegmentWriter(tmp_path / f"{mode}.arrow", DIMS, dtype=dtype, asynchronous=mode) as w:
            w.write_steps(recs)
    assert (tmp_path / "False.arrow").read_bytes() == (tmp_path / "True.arrow").read_bytes()
    back = read_segment(tmp_path / "True.arrow", expected_steps=range(5), kind="grads")
    half = getattr(torch, dtype)
    for r, b in zip(recs, back):
        assert torch.equal(b.sample_ids, r.sample_ids) and torch.equal(b.weights, r.weights)
        for k in DIMS:
            assert b.grads[k].dtype == torch.float32
            assert torch.equal(b.grads[k], r.grads[k].to(half).float())
    schema = pa.ipc.open_file(pa.memory_map(str(tmp_path / "True.arrow"))).schema
    assert schema.metadata[b"dtype"] == dtype.encode() and schema.metadata[b"dvemb_schema_version"] == b"2"
    # half the vector bytes of a float32 store (ids, weights and framing unchanged)
    big = {"a": 512, "b": 320}
    rows = [
        StepGrads(
            t, torch.arange(64), torch.ones(64, dtype=torch.float64), {k: torch.randn(64, d) for k, d in big.items()}
        )
        for t in range(4)
    ]
    size = {}
    for d in ("float32", dtype):
        with SegmentWriter(tmp_path / f"big-{d}.arrow", big, dtype=d) as w:
            w.write_steps(rows)
        size[d] = (tmp_path / f"big-{d}.arrow").stat().st_size
    payload32 = 4 * 64 * sum(big.values()) * 4
    assert size["float32"] - size[dtype] == pytest.approx(payload32 / 2, rel=1e-3)


def test_half_store_without_vectors_reads_ids_and_weights_only(tmp_path):
    recs = records(3)
    with SegmentWriter(tmp_path / "s.arrow", DIMS, dtype="bfloat16") as w:
        w.write_steps(recs)
    back = read_segment(tmp_path / "s.arrow", vectors=False)
    assert [b.step for b in back] == [0, 1, 2] and all(b.grads == {} for b in back)
    assert torch.equal(back[2].sample_ids, recs[2].sample_ids)


def test_segmented_records_hold_one_segment_at_a_time(tmp_path, monkeypatch):
    bounds = [0, 3, 5, 9]
    flat = records(9)
    files = []
    for j in range(3):
        files.append(tmp_path / f"seg-{j}.arrow")
        with SegmentWriter(files[-1], DIMS, kind="grads") as w:
            w.write_steps(flat[bounds[j] : bounds[j + 1]])
    reads = []
    real = gradstore.read_segment
    monkeypatch.setattr(gradstore, "read_segment", lambda p, *a, **k: reads.append(Path(p).name) or real(p, *a, **k))
    seq = SegmentedRecords(files, bounds, kind="grads")
    assert len(seq) == 9
    back = [r.step for r in reversed(seq)]
    assert back == list(range(8, -1, -1))
    assert reads == ["seg-2.arrow", "seg-1.arrow", "seg-0.arrow"]  # each segment mapped once, newest first
    reads.clear()
    head = seq[:4]  # steps 0..3: segment 0 and the first step of segment 1
    assert [r.step for r in head] == [0, 1, 2, 3] and reads == ["seg-0.arrow", "seg-1.arrow"]
    for got, want in zip(seq, flat):
        assert got.step == want.step and torch.equal(got.grads["fc1"], want.grads["fc1"])
    assert seq[-1].step == 8 and seq[4].step == 4
    with pytest.raises(IndexError):
        seq[9]


def test_never_writing_embeddings_for_embedding_mode_is_refused():
    with pytest.raises(ConfigError, match="embed.write=never, but score.mode=embedding"):
        load_config(ROOT / "configs" / "digits_mlp.yaml", ["embed.write=never", "score.mode=embedding"])


@pytest.fixture(scope="module")
def exact_run(tmp_path_factory, cli_run) -> Path:
    """The default mode (exact) on a tiny run: the embed stage writes nothing."""
    return cli_run(tmp_path_factory.mktemp("budget") / "run", TINY)


def final_scores(run: Path) -> np.ndarray:
    occ = pl.read_parquet(run / "scores" / "occurrences.parquet")
    return occ.filter(pl.col("checkpoint") == occ["checkpoint"].max()).sort("step", "sample_id")["score"].to_numpy()


def test_exact_mode_writes_no_embeddings_and_says_how_to_get_them(exact_run, tmp_path):
    run = RunDir(exact_run)
    assert not list(run.root.glob("embeddings/*"))
    assert run.expected("embed") == []
    run.require("embed")  # nothing expected: the flows' completeness check passes
    res = cli("score", run.root, "--set", "score.mode=embedding")
    assert res.exit_code == 2 and "embed.write=always" in one_line(res) and "Traceback" not in res.output
    assert cli("status", run.root).exit_code == 0


def test_gc_drops_grads_only_once_embeddings_are_kept(exact_run, tmp_path):
    run = RunDir(shutil.copytree(exact_run, tmp_path / "run"))
    grads = [run.grads(0), run.grads(1)]
    leftover = run.root / "grads" / ".seg-0000-rank-0.arrow.tmp-dead"
    leftover.write_bytes(b"half a file")
    # no embeddings: only the temporary file goes; --dry-run deletes nothing
    res = cli("gc", run.root, "--drop-grads", "--dry-run")
    assert res.exit_code == 0 and "would drop" in res.output and all(p.exists() for p in grads + [leftover])
    res = cli("gc", run.root)
    assert res.exit_code == 0, res.output
    assert not leftover.exists() and all(p.exists() for p in grads)
    # direct scores before the gradients go
    assert cli("score", run.root, "--set", "score.mode=direct").exit_code == 0
    direct = final_scores(run.root)
    res = cli("embed", run.root, "--set", "embed.write=always")
    assert res.exit_code == 0, res.output
    res = cli("gc", run.root)
    assert res.exit_code == 0, res.output
    assert not any(p.exists() for p in grads)
    meta = run.meta()["gc"]
    assert set(meta["dropped"]) == {
        "grads/.seg-0000-rank-0.arrow.tmp-dead",
        *(p.relative_to(run.root).as_posix() for p in grads),
    }
    assert meta["bytes"] == sum(e["bytes"] for e in meta["dropped"].values()) > 0
    assert not {p.relative_to(run.root).as_posix() for p in grads} & set(integrity.read_manifest(run.root))
    res = cli("status", run.root)  # sha256 of what is left; train complete without the dropped files
    assert res.exit_code == 0 and "train   complete" in res.output, res.output
    # the embeddings still score any query: the same numbers as direct mode on the gradients
    res = cli("score", run.root, "--set", "score.mode=embedding")
    assert res.exit_code == 0, res.output
    np.testing.assert_allclose(final_scores(run.root), direct, rtol=1e-4, atol=1e-4 * np.abs(direct).max())
    assert cli("score", run.root).exit_code == 0  # exact mode needs no gradients
    for args in (["score", run.root, "--set", "score.mode=direct"], ["embed", run.root, "--set", "embed.write=always"]):
        res = cli(*args)
        assert res.exit_code == 2 and "dropped by `dvemb gc`" in one_line(res), res.output


def test_gc_refuses_unfinished_runs_and_paths_outside_the_run(exact_run, tmp_path):
    run = RunDir(shutil.copytree(exact_run, tmp_path / "run"))
    (run.root / "scores" / "samples.parquet").unlink()
    res = cli("gc", run.root, "--drop-grads")
    assert res.exit_code == 2 and "score the run before gc" in one_line(res)
    assert run.grads(0).exists()
    shutil.copy(exact_run / "scores" / "samples.parquet", run.root / "scores" / "samples.parquet")
    meta = run.meta()
    run.update_meta(status="training")
    res = cli("gc", run.root, "--drop-grads")
    assert res.exit_code == 2 and "status 'training'" in one_line(res)
    run.update_meta(status=meta["status"])
    # grads/ is a link to a folder elsewhere: gc deletes nothing there
    elsewhere = tmp_path / "elsewhere"
    shutil.move(run.root / "grads", elsewhere)
    os.symlink(elsewhere, run.root / "grads")
    res = cli("gc", run.root, "--drop-grads")
    assert res.exit_code == 2 and "outside the run directory" in one_line(res)
    assert (elsewhere / run.grads(0).name).exists()
    assert "gc" not in run.meta()


def test_gc_of_a_run_without_run_json_is_refused(tmp_path):
    (tmp_path / "grads").mkdir()
    (tmp_path / "grads" / "seg-0000-rank-0.arrow").write_bytes(b"x")
    res = cli("gc", tmp_path)
    assert res.exit_code == 2 and "run.json" in one_line(res)
    assert (tmp_path / "grads" / "seg-0000-rank-0.arrow").exists()


@pytest.mark.slow
def test_default_demo_fits_the_storage_budget(tmp_path):
    """configs/mnist_mlp.yaml (20k MNIST, 3 epochs; ~70 s here): at most 300 MiB on disk, a float16 store."""
    out = tmp_path / "demo"
    res = cli("run", ROOT / "configs" / "mnist_mlp.yaml", "--out", out, "--engine", "local")
    assert res.exit_code == 0, res.output
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    assert total <= 300 * 2**20, total
    assert json.loads((out / "grads" / "projection.json").read_text())["dtype"] == "float16"
    assert not list(out.glob("embeddings/*"))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "extra", "key"),
    [("bench_memory", [], "peak_ratio_4T_over_T"), ("bench_store_dtype", ["--regimes", "sgd-3ep"], "results")],
)
def test_benchmark_quick_mode_writes_json(tmp_path, name, extra, key):
    """The two benchmarks of docs/SCALE.md still run (smoke mode, ~1-2 min each)."""
    import subprocess
    import sys

    out = tmp_path / f"{name}.json"
    cmd = [sys.executable, "-m", f"benchmarks.{name}", "--quick", "--out", str(out), *extra]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads(out.read_text())[key]
