"""Run directories on an object store: ``--out s3://bucket/prefix/run`` against a REAL S3-compatible server
(moto in server mode, a subprocess on a free port; pyarrow's S3 client talks HTTP to it). The remote run's
scores equal a local run's to the bit; its listing is manifest.json plus exactly the files it lists, each
with the listed sha256; a second machine (empty cache) checks and re-scores it from the URI; a tampered
object, a missing bucket, an endpoint that does not answer are named (exit 2); a run is never overwritten
without --force, and --force deletes only the run's own prefix. ``--resume`` on the URI, from a machine whose
cache is empty, finishes a stopped run bit-identical to an uninterrupted one without redoing what was done."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import time
from pathlib import Path

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from dvemb.cli import app
from dvemb.store import remote
from dvemb.store.rundir import RunDir
from dvemb.train.module import Trainee

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "digits_mlp.yaml"
TINY = ["train.epochs=1", "data.subset=200", "embed.segments=2", "embed.write=always"]  # 7 steps, 2 segments
BUCKET = "dvemb-test"
URI = f"s3://{BUCKET}/runs/r1"
runner = CliRunner()


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def run_args(out, *extra) -> list:
    return ["run", CONFIG, "--out", out, "--engine", "local", *[a for s in TINY for a in ("--set", s)], *extra]


def one_line(res) -> str:
    return " ".join(res.output.split())


def assert_clean_error(res, *needles: str) -> None:
    assert res.exit_code == 2, res.output
    assert isinstance(res.exception, SystemExit), repr(res.exception)
    assert "Traceback" not in res.output and res.output.count("error:") == 1, res.output
    for n in needles:
        assert n in one_line(res), f"{n!r} not in {res.output!r}"


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    """Each test is a fresh machine: its own, empty staging cache."""
    monkeypatch.setenv("DVEMB_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def remote_files(fs: pafs.FileSystem, prefix: str) -> dict[str, bytes]:
    """Every object under ``prefix`` of the test bucket, read directly (relative key -> bytes)."""
    infos = fs.get_file_info(pafs.FileSelector(f"{BUCKET}/{prefix}", recursive=True, allow_not_found=True))
    out = {}
    for i in infos:
        if i.type == pafs.FileType.File:
            with fs.open_input_stream(i.path) as f:
                out[i.path[len(BUCKET) + len(prefix) + 2 :]] = f.read()
    return out


@pytest.fixture(scope="module")
def runs(s3, tmp_path_factory) -> dict:
    """The tiny digits run written to a local folder and to s3://…/runs/r1 (with its push timed)."""
    tmp = tmp_path_factory.mktemp("runs")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DVEMB_CACHE", str(tmp / "cache"))
        local = cli(*run_args(tmp / "local"))
        assert local.exit_code == 0, local.output
        t0 = time.perf_counter()
        res = cli(*run_args(URI))
        took = time.perf_counter() - t0
    assert res.exit_code == 0, res.output
    assert f"done: {URI}" in one_line(res)
    assert f"report {URI}/report.md" in one_line(res)  # the summary names the URI, not the staged copy
    return {"local": RunDir(tmp / "local"), "seconds": took}


def listed_objects(fs: pafs.FileSystem, prefix: str) -> tuple[dict[str, bytes], dict[str, dict]]:
    """The run's objects and its manifest's entries, asserting that the listing is exactly manifest.json plus
    the files it lists, each with its size and sha256 (read back from the store)."""
    objects = remote_files(fs, prefix)
    manifest = json.loads(objects.pop("manifest.json"))["files"]
    assert set(objects) == set(manifest)
    for rel, data in objects.items():
        assert (len(data), hashlib.sha256(data).hexdigest()) == (manifest[rel]["size"], manifest[rel]["sha256"]), rel
    return objects, manifest


def test_scores_on_s3_equal_local_and_listing_matches_manifest(s3, runs) -> None:
    objects, manifest = listed_objects(s3, "runs/r1")
    # the same files as the local run (run.json differs: timings), and the same scores to the bit
    local = runs["local"]
    assert set(manifest) == set(json.loads((local.root / "manifest.json").read_text())["files"])
    for rel in ("scores/occurrences.parquet", "scores/samples.parquet", "curation/curated.parquet"):
        assert pq.read_table(f"{BUCKET}/runs/r1/{rel}", filesystem=s3).equals(pq.read_table(local.root / rel)), rel
        assert objects[rel] == (local.root / rel).read_bytes(), rel
    assert len(objects) >= 20 and sum(map(len, objects.values())) > 1_000_000


def test_second_machine_checks_and_rescores_from_the_uri(s3, runs, cache) -> None:
    before = remote_files(s3, "runs/r1")
    res = cli("status", URI)  # an empty cache: every object read in the store, then pulled and checked
    assert res.exit_code == 0, res.output
    for stage in ("train", "embed", "score", "curate"):
        assert f"{stage} complete" in one_line(res), res.output
    copy = remote.staging_dir(URI)
    assert copy.is_relative_to(cache) and RunDir(copy).occurrences.is_file()

    shutil.rmtree(cache)  # another fresh machine re-scores: pulls, scores, pushes what changed
    res = cli("score", URI)
    assert res.exit_code == 0, res.output
    after = remote_files(s3, "runs/r1")
    assert after.keys() == before.keys()
    for rel in ("scores/occurrences.parquet", "scores/samples.parquet"):  # scoring is deterministic
        assert after[rel] == before[rel] == (runs["local"].root / rel).read_bytes(), rel
    # the query-string endpoint works too (no AWS_ENDPOINT_URL)
    endpoint = os.environ.pop("AWS_ENDPOINT_URL")
    try:
        host = endpoint.removeprefix("http://")
        res = cli("status", "--quick", f"{URI}?endpoint_override={host}&scheme=http")
    finally:
        os.environ["AWS_ENDPOINT_URL"] = endpoint
    assert res.exit_code == 0 and "score complete" in one_line(res), res.output


def test_tampered_object_is_named_and_never_staged(s3, runs, cache) -> None:
    key = f"{BUCKET}/runs/r1/scores/samples.parquet"
    with s3.open_input_stream(key) as f:
        good = f.read()
    bad = bytearray(good)
    bad[len(bad) // 2] ^= 0xFF  # same size, other content
    with s3.open_output_stream(key) as f:
        f.write(bytes(bad))
    try:
        res = cli("status", URI)
        assert res.exit_code == 2, res.output
        assert f"damaged {URI}/scores/samples.parquet: content differs from its sha256" in one_line(res)
        res = cli("curate", URI)  # a fresh machine pulls: the download is checked before it is kept
        assert_clean_error(res, f"{URI}/scores/samples.parquet: damaged", "manifest.json says")
        copy = remote.staging_dir(URI)
        assert not (copy / "scores" / "samples.parquet").exists()
        assert not list(copy.rglob(".*.tmp-*"))  # no half-written download left
    finally:
        with s3.open_output_stream(key) as f:
            f.write(good)
    assert cli("status", "--quick", URI).exit_code == 0


def test_existing_run_is_never_overwritten_without_force(s3, runs) -> None:
    before = remote_files(s3, "runs/r1")
    res = cli(*run_args(URI))
    assert_clean_error(res, f"out '{URI}': holds a run (run.json); set --force")
    assert remote_files(s3, "runs/r1") == before


def test_force_deletes_only_the_run_prefix(s3, runs) -> None:
    """A finished run at runs/old (train-only, fast) is replaced with --force; runs/old-sibling/ and
    runs/keep.txt survive; a prefix with objects but no run.json is never deleted, --force or not."""
    old = f"s3://{BUCKET}/runs/old"
    sets = [a for s in TINY for a in ("--set", s)]
    assert cli("train", CONFIG, "--out", old, *sets).exit_code == 0
    for key in ("runs/old-sibling/keep.txt", "runs/keep.txt", "runs/old/checkpoints/stray.txt", "foreign/x.txt"):
        with s3.open_output_stream(f"{BUCKET}/{key}") as f:
            f.write(b"keep")
    res = cli("train", CONFIG, "--out", old, *sets, "--force")
    assert res.exit_code == 0, res.output
    objects = remote_files(s3, "runs/old")
    assert "checkpoints/stray.txt" not in objects and "run.json" in objects
    assert remote_files(s3, "runs/old-sibling") == {"keep.txt": b"keep"}
    assert remote_files(s3, "runs")["keep.txt"] == b"keep"

    # a stage's error names the URI, not the staged copy
    assert_clean_error(cli("gc", old), f"{old}: the scores are not written", f"{old}: stage 'score' is incomplete")

    for force in ([], ["--force"]):
        res = cli("train", CONFIG, "--out", f"s3://{BUCKET}/foreign", *sets, *force)
        assert_clean_error(res, f"s3://{BUCKET}/foreign: holds 1 object(s) but no run.json", "never deletes it")
    assert remote_files(s3, "foreign") == {"x.txt": b"keep"}


def test_missing_bucket_and_unreachable_endpoint_fail_fast(s3, cache, monkeypatch) -> None:
    res = cli(*run_args("s3://no-such-bucket/runs/r1"))
    assert_clean_error(res, "s3://no-such-bucket/runs/r1: bucket 'no-such-bucket' does not exist")
    res = cli("score", f"s3://{BUCKET}")
    assert_clean_error(res, f"s3://{BUCKET}: a run needs a prefix inside the bucket")

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{sock.getsockname()[1]}")
    for args in (run_args(URI), ["status", URI]):
        t0 = time.monotonic()
        res = cli(*args)
        took = time.monotonic() - t0
        assert_clean_error(res, URI, "Could not connect to server")
        assert took < 20, took  # pyarrow's default: 3 attempts with back-off, about 6 s
    assert not cache.exists()  # nothing staged, nothing written


# files that name the run's folder or record times; checkpoints/resume-*: loop bookkeeping (tests/test_resume.py)
UNCOMPARED = ("run.json", "report.md", "curation/plan.json", "plots/", "checkpoints/resume-")


def assert_equals_uninterrupted(objects: dict[str, bytes], local: RunDir) -> None:
    """The remote run holds the files of the uninterrupted local run, each bit-identical (but UNCOMPARED)."""
    assert set(objects) == set(json.loads((local.root / "manifest.json").read_text())["files"])
    compared = [rel for rel in objects if not rel.startswith(UNCOMPARED)]
    assert {"scores/occurrences.parquet", "scores/samples.parquet", "embeddings/seg-0001-rank-0.arrow"} <= set(compared)
    for rel in compared:
        assert objects[rel] == (local.root / rel).read_bytes(), rel


def kept_state(fs: pafs.FileSystem, uri: str, rels: list[str]) -> dict[str, tuple]:
    """Per file of the run: (mtime_ns in the staged copy, bytes and modification time of its object)."""
    copy, base = remote.staging_dir(uri), uri.removeprefix("s3://")
    out = {}
    for rel in rels:
        with fs.open_input_stream(f"{base}/{rel}") as f:
            out[rel] = ((copy / rel).stat().st_mtime_ns, f.read(), fs.get_file_info(f"{base}/{rel}").mtime)
    return out


def test_resume_on_the_uri_continues_a_failed_training_on_another_machine(s3, runs, cache, monkeypatch) -> None:
    """Training fails at step 5 (of 7; boundaries 0, 4, 7): what it finished is pushed. A second machine
    (empty cache) is told how to continue, resumes from step 4 (CONFIG left out: the run's own), and the
    finished run in the bucket is the uninterrupted run's, file for file, bit for bit."""
    uri = f"s3://{BUCKET}/runs/failed-train"
    real = Trainee.training_step

    def dying(self, batch, batch_idx):
        if self.trainer.global_step == 5:
            raise RuntimeError("the machine went away")
        return real(self, batch, batch_idx)

    monkeypatch.setattr(Trainee, "training_step", dying)
    res = cli(*run_args(uri))
    monkeypatch.setattr(Trainee, "training_step", real)
    assert res.exit_code == 1 and "RuntimeError: the machine went away" in one_line(res), res.output
    stopped, _ = listed_objects(s3, "runs/failed-train")
    meta = json.loads(stopped["run.json"])
    assert (meta["status"], meta["failed_at_step"]) == ("failed", 5)
    assert {"checkpoints/resume-000004.safetensors", "grads/seg-0000-rank-0.arrow"} <= set(stopped)
    assert not any(rel.startswith(("grads/seg-0001", "embeddings/", "scores/")) for rel in stopped)

    shutil.rmtree(cache)  # another machine
    res = cli("status", uri)
    assert res.exit_code == 0, res.output
    assert f"last boundary checkpoint: step 4 of 7; continue with: dvemb run --out {uri} --resume" in one_line(res)
    kept = ["data/train.parquet", "checkpoints/step-000004.safetensors", "checkpoints/optimizer-000004.safetensors"]
    kept += ["grads/seg-0000-rank-0.arrow", "trajectory/segments/steps-0000.parquet"]
    before = kept_state(s3, uri, kept)

    res = cli("run", "--out", uri, "--resume", "--engine", "local")
    assert res.exit_code == 0 and f"done: {uri}" in one_line(res), res.output
    objects, _ = listed_objects(s3, "runs/failed-train")
    meta = json.loads(objects["run.json"])
    assert meta["status"] == "trained" and meta["resumed_from"] == [4] and "error" not in meta
    assert not any(rel.startswith("trajectory/segments/") for rel in objects)  # merged, then dropped everywhere
    kept.remove("trajectory/segments/steps-0000.parquet")
    assert kept_state(s3, uri, kept) == {rel: before[rel] for rel in kept}  # not redone, not uploaded again
    assert_equals_uninterrupted(objects, runs["local"])


def test_ctrl_c_on_a_uri_run_uploads_what_it_finished_and_resumes_elsewhere(s3, runs, cache, monkeypatch) -> None:
    """Ctrl-C at step 5 (of 7): the CLI says how to continue with the URI, the finished files and run.json
    ('cancelled') are pushed, and a second machine (empty cache) resumes from step 4 to the uninterrupted run."""
    uri = f"s3://{BUCKET}/runs/ctrl-c"
    real = Trainee.training_step

    def interrupted(self, batch, batch_idx):
        if self.trainer.global_step == 5:
            raise KeyboardInterrupt
        return real(self, batch, batch_idx)

    monkeypatch.setattr(Trainee, "training_step", interrupted)
    res = cli(*run_args(uri))
    monkeypatch.setattr(Trainee, "training_step", real)
    assert res.exit_code == 130 and f"continue with: dvemb run --out {uri} --resume" in one_line(res), res.output
    stopped, _ = listed_objects(s3, "runs/ctrl-c")
    assert json.loads(stopped["run.json"])["status"] == "cancelled"
    assert {"checkpoints/resume-000004.safetensors", "grads/seg-0000-rank-0.arrow"} <= set(stopped)

    shutil.rmtree(cache)  # another machine
    res = cli("run", "--out", uri, "--resume", "--engine", "local")
    assert res.exit_code == 0 and f"done: {uri}" in one_line(res), res.output
    objects, _ = listed_objects(s3, "runs/ctrl-c")
    assert json.loads(objects["run.json"])["resumed_from"] == [4]
    assert_equals_uninterrupted(objects, runs["local"])


def test_resume_on_the_uri_redoes_only_what_is_missing(s3, runs, cache) -> None:
    """Trained and one of two segments embedded, nothing more: a second machine's ``dvemb run CONFIG --resume``
    embeds segment 1 only, scores and curates; the kept files are neither recomputed in its copy nor
    uploaded again; the finished run is the uninterrupted one's."""
    uri = f"s3://{BUCKET}/runs/half-embedded"
    sets = [a for s in TINY for a in ("--set", s)]
    assert cli("train", CONFIG, "--out", uri, *sets).exit_code == 0
    assert cli("embed", uri, "--segment", "0").exit_code == 0

    shutil.rmtree(cache)  # another machine
    res = cli("status", uri)
    assert res.exit_code == 0, res.output
    assert "train complete" in one_line(res) and "embed incomplete; missing embeddings/seg-0001" in one_line(res)
    kept = [rel for rel in remote_files(s3, "runs/half-embedded") if rel not in ("run.json", "manifest.json")]
    assert {
        "embeddings/seg-0000-rank-0.arrow",
        "grads/seg-0001-rank-0.arrow",
        "checkpoints/step-000007.safetensors",
    } <= set(kept)
    before = kept_state(s3, uri, kept)

    res = cli(*run_args(uri, "--resume"))
    assert res.exit_code == 0 and f"done: {uri}" in one_line(res), res.output
    objects, _ = listed_objects(s3, "runs/half-embedded")
    assert kept_state(s3, uri, kept) == before
    assert "resumed_from" not in json.loads(objects["run.json"])  # training was finished: kept as it was
    assert_equals_uninterrupted(objects, runs["local"])


def test_resume_on_the_uri_refuses_what_cannot_be_right(s3, runs, cache) -> None:
    """As for a local run directory (tests/test_resume.py): another config, no run there, --force with it;
    each a one-line error naming the URI (exit 2), and the bucket untouched."""
    before = remote_files(s3, "runs")
    res = cli(*run_args(URI, "--resume", "--set", "train.lr=0.2"))
    assert_clean_error(
        res, f"{URI}: cannot resume with a config other than the run's own (train.lr: 0.1 in run.json, 0.2 given"
    )
    assert str(cache) not in res.output  # the run is named as the user gave it, never by its staged copy
    none = f"s3://{BUCKET}/runs/none"
    assert_clean_error(cli("run", "--out", none, "--resume", "--engine", "local"), f"{none}: no run.json")
    with s3.open_output_stream(f"{BUCKET}/runs/not-a-run/x.txt") as f:
        f.write(b"keep")
    assert_clean_error(cli(*run_args(f"s3://{BUCKET}/runs/not-a-run", "--resume")), "holds 1 object(s) but no run.json")
    assert_clean_error(cli("run", "--out", URI, "--resume", "--force", "--engine", "local"), "--resume and --force")
    assert remote_files(s3, "runs") == {**before, "not-a-run/x.txt": b"keep"}


def test_gc_on_the_uri_drops_objects_inside_the_run_only(s3, runs) -> None:
    """``dvemb gc URI`` (embeddings kept, so the gradient store goes): the manifest stops listing the dropped
    files, then their objects are deleted; the run stays complete and verified. Runs last: it changes r1."""
    before = remote_files(s3, "runs")
    res = cli("gc", URI)
    assert res.exit_code == 0 and "dropped" in res.output, res.output
    objects = remote_files(s3, "runs/r1")
    listed = json.loads(objects.pop("manifest.json"))["files"]
    assert set(objects) == set(listed)
    assert any(k.startswith("r1/grads/seg-") for k in before)
    assert not any(k.startswith("grads/seg-") for k in objects)
    others = {k: v for k, v in before.items() if not k.startswith("r1/")}
    assert others and others == {k: v for k, v in remote_files(s3, "runs").items() if not k.startswith("r1/")}
    res = cli("status", URI)
    assert res.exit_code == 0 and "train complete" in one_line(res) and "score complete" in one_line(res), res.output
