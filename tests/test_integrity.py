"""manifest.json (sha256 + size of every file finalised in a run) and `dvemb status` verifying files."""

import hashlib
import json
import shutil
import threading
from pathlib import Path

import pyarrow as pa
import pytest
from typer.testing import CliRunner

from dvemb.cli import app
from dvemb.errors import DamagedFileError
from dvemb.store import integrity
from dvemb.store.atomic import write_json, write_parquet_atomic
from dvemb.store.rundir import RunDir

runner = CliRunner()


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def base(tmp_path_factory, cli_run) -> Path:
    sets = ["train.epochs=1", "data.subset=200", "embed.segments=2", "embed.write=always"]
    return cli_run(tmp_path_factory.mktemp("runs") / "base", sets)


@pytest.fixture
def copy(base, tmp_path) -> Path:
    out = tmp_path / "copy"
    shutil.copytree(base, out)
    return out


def test_atomic_writes_in_a_run_are_recorded_with_size_and_sha256(tmp_path):
    run = RunDir(tmp_path / "r")
    run.create()
    run.update_meta(status="preparing")
    table = pa.table({"a": list(range(100))})
    write_parquet_atomic(table, run.root / "scores" / "x.parquet")
    files = integrity.read_manifest(run.root)
    data = (run.root / "scores" / "x.parquet").read_bytes()
    assert files["scores/x.parquet"] == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert files["run.json"]["size"] == run.run_json.stat().st_size
    assert "manifest.json" not in files
    # outside a run directory nothing is recorded
    write_parquet_atomic(table, tmp_path / "loose" / "x.parquet")
    assert not (tmp_path / "loose" / "manifest.json").exists()
    integrity.forget([run.root / "scores" / "x.parquet"])
    assert "scores/x.parquet" not in integrity.read_manifest(run.root)


def test_concurrent_writers_lose_no_entry(tmp_path):
    run = RunDir(tmp_path / "r")
    run.create()
    run.update_meta(status="training")

    def writer(i: int) -> None:
        for j in range(20):
            write_json(run.root / "eval" / f"w{i}-{j}.json", {"i": i, "j": j})

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    files = integrity.read_manifest(run.root)
    assert sorted(k for k in files if k.startswith("eval/")) == sorted(
        f"eval/w{i}-{j}.json" for i in range(4) for j in range(20)
    )
    assert not integrity.temp_leftovers(run.root)


def test_check_file_reasons(tmp_path):
    run = RunDir(tmp_path / "r")
    run.create()
    run.update_meta(status="x")
    p = run.root / "data" / "t.parquet"
    write_parquet_atomic(pa.table({"a": list(range(1000))}), p)
    entry = integrity.read_manifest(run.root)["data/t.parquet"]
    assert integrity.check_file(p, entry, deep=True) is None
    raw = bytearray(p.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # same size, other content: only the sha256 sees it
    p.write_bytes(bytes(raw))
    assert integrity.check_file(p, entry) is None
    assert integrity.check_file(p, entry, deep=True) == "content differs from its sha256 in manifest.json"
    p.write_bytes(bytes(raw[: len(raw) // 2]))
    assert "manifest.json says" in integrity.check_file(p, entry)
    assert integrity.check_file(p).startswith("unreadable parquet file")  # no manifest entry: the footer
    assert integrity.check_file(run.root / "nothing.json") == "missing"


def test_status_of_an_intact_run(base):
    res = cli("status", base)
    assert res.exit_code == 0, res.output
    for stage in ("train", "embed", "score", "curate"):
        assert f"{stage:7s} complete" in res.output
    assert "damaged" not in res.output and "status 'trained'" in res.output


@pytest.mark.parametrize(
    "damage, file, reason",
    [
        ("garbage", "checkpoints/step-000004.safetensors", "manifest.json says"),
        ("flip", "checkpoints/step-000007.safetensors", "content differs from its sha256"),
        ("half", "embeddings/seg-0001-rank-0.arrow", "manifest.json says"),
        ("half", "grads/seg-0000-rank-0.arrow", "manifest.json says"),
        ("half, no manifest", "grads/seg-0001-rank-0.arrow", "unreadable arrow file"),
        ("half", "scores/occurrences.parquet", "manifest.json says"),
        ("garbage", "run.json", "manifest.json says"),
        ("garbage", "manifest.json", "damaged manifest"),
    ],
)
def test_status_names_each_damaged_file(copy, damage, file, reason):
    p = copy / file
    raw = p.read_bytes()
    if damage == "garbage":
        p.write_bytes(b"{ not what was written")
    elif damage.startswith("half"):
        p.write_bytes(raw[: len(raw) // 2])
        if "no manifest" in damage:  # the format alone: Arrow IPC footer missing
            (copy / "manifest.json").unlink()
    else:  # one byte of tensor data: same size, readable header
        b = bytearray(raw)
        b[-3] ^= 0x01
        p.write_bytes(bytes(b))
    res = cli("status", copy)
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    line = next(ln for ln in res.output.splitlines() if ln.startswith("damaged"))
    assert file in line and reason in " ".join(res.output.split()), res.output
    if damage == "flip":  # --quick checks sizes and headers only
        assert cli("status", copy, "--quick").exit_code == 0


def test_stages_refuse_damaged_inputs_and_status_shows_leftovers(copy):
    run = RunDir(copy)
    occ = run.occurrences
    occ.write_bytes(occ.read_bytes()[:-10])
    with pytest.raises(DamagedFileError, match=r"scores/occurrences.parquet: damaged — size \d+ bytes"):
        run.require("score")
    (copy / "grads" / ".seg-0001-rank-0.arrow.tmp-abc").write_bytes(b"partial")
    res = cli("status", copy)
    assert "leftover 1 temporary file(s)" in res.output and "grads/.seg-0001-rank-0.arrow.tmp-abc" in res.output


def test_manifest_is_plain_json(base):
    m = json.loads((base / "manifest.json").read_text())
    assert m["schema_version"] == 1
    assert {"run.json", "checkpoints/step-000000.safetensors", "scores/samples.parquet"} <= set(m["files"])
