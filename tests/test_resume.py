"""Resume (docs/RELIABILITY.md): a killed, cancelled or failed training continues from its last boundary
checkpoint and the finished run is bit-identical to one trained in one go; embedding and scoring redo only
what is missing; a resume that cannot be right is refused."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from dvemb.cli import app
from dvemb.config import load_config
from dvemb.pipeline import run_local
from dvemb.store import integrity
from dvemb.store.rundir import RunDir
from dvemb.train.module import Trainee
from dvemb.train.resume import this_process
from dvemb.train.run import train

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "configs" / "digits_mlp.yaml"
# float64, SGD momentum (optimizer state) and a warmup + cosine schedule (scheduler position); 57 steps, 5 segments;
# scored from the embeddings (so the gradient shards, embeddings and propagators all feed the scores)
SETS = [
    "score.mode=embedding",
    "train.precision=64-true",
    "train.epochs=3",
    "data.subset=600",
    "embed.segments=5",
    "train.momentum=0.9",
    "train.schedule=cosine",
    "train.warmup_steps=5",
]
runner = CliRunner()


def cli(*args: str):
    return runner.invoke(app, list(args))


def digests(root: Path) -> dict[str, str]:
    """md5 of every file of a run, except the ones that name the run's folder or record times."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if not p.is_file() or rel in ("run.json", "manifest.json", "report.md") or rel.startswith("plots/"):
            continue
        if rel.startswith("checkpoints/resume-"):  # loop bookkeeping: once seen to differ between two runs
            continue  # whose every other file matched; what it restores is checked through those files
        data = p.read_bytes()
        if rel == "curation/plan.json":  # names its source run's folder
            data = json.dumps({k: v for k, v in json.loads(data).items() if k != "source_run"}).encode()
        out[rel] = hashlib.md5(data).hexdigest()
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """``ref``: the pipeline in one go. ``killed``: the same run SIGKILLed (another process) in the middle of
    a segment after its first inner boundary — then resumed by one test below."""
    root = tmp_path_factory.mktemp("resume")
    ref, killed = root / "ref", root / "killed"
    args = ["run", str(DIGITS), "--engine", "local", "--out", str(killed), *[a for s in SETS for a in ("--set", s)]]
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}  # the same float64 sums as this process
    code = "from dvemb.cli import app; app(prog_name='dvemb')"
    log = (root / "killed.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-c", code, *args], cwd=ROOT, env=env, stdout=log, stderr=log)
    got_killed = threading.Event()

    def kill_mid_segment() -> None:
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline:
            boundary = list((killed / "checkpoints").glob("resume-*.safetensors"))
            if boundary and list((killed / "grads").glob(".seg-*.tmp-*")):  # a segment's shard half-written
                proc.kill()
                got_killed.set()
                return
            time.sleep(0.005)

    watcher = threading.Thread(target=kill_mid_segment)
    watcher.start()
    try:
        run_local(load_config(DIGITS, SETS), ref, progress=False)  # meanwhile: the uninterrupted run
    finally:
        watcher.join()
        proc.wait(timeout=60)
        log.close()
    tail = (root / "killed.log").read_text(errors="replace")[-2000:]
    assert got_killed.is_set(), f"the training ended before it could be killed: {tail}"
    return {"ref": ref, "killed": killed, "root": root}


def test_sigkill_mid_training_then_resume_is_bit_identical(runs) -> None:
    ref, run = runs["ref"], RunDir(runs["killed"])
    meta = run.meta()
    assert meta["status"] == "training"  # what it was doing when killed; the dead process tells the rest
    b = max(int(p.stem.split("-")[1]) for p in run.root.glob("checkpoints/resume-*.safetensors"))
    assert 0 < b < meta["boundaries"][-1]
    assert integrity.temp_leftovers(run.root)  # the segment in progress left its temporary file

    res = cli("status", str(run.root))
    assert res.exit_code == 0, res.output
    assert f"training was killed: its process (pid {meta['process']['pid']}) is gone" in res.output
    assert f"last boundary checkpoint: step {b} of {meta['boundaries'][-1]}" in res.output
    assert f"dvemb run --out {run.root} --resume --engine local" in res.output

    res = cli("run", "--out", str(run.root), "--resume", "--engine", "local")
    assert res.exit_code == 0, res.output
    meta = run.meta()
    assert meta["status"] == "trained" and meta["resumed_from"] == [b] and "process" not in meta
    assert not integrity.temp_leftovers(run.root)
    assert not (run.root / "trajectory" / "segments").exists()  # the parts were merged and removed
    want, got = digests(ref), digests(run.root)
    assert {"scores/occurrences.parquet", "scores/samples.parquet", "grads/seg-0004-rank-0.arrow"} <= set(want)
    assert got == want  # scores, values, checkpoints, optimizer states, gradients, trajectory, embeddings
    assert not integrity.damaged(run.root, integrity.run_files(run.root), deep=True)  # the manifest is true


def test_resume_redoes_only_missing_or_damaged_outputs(runs) -> None:
    run = RunDir(shutil.copytree(runs["ref"], runs["root"] / "partial"))
    run.embeddings(1).unlink()
    integrity.forget([run.embeddings(1)])
    with open(run.propagator(3), "r+b") as f:  # cut in half: the manifest's size no longer matches
        f.truncate(run.propagator(3).stat().st_size // 2)
    run.samples.unlink()
    kept = [run.embeddings(0), run.embeddings(2), run.propagator(4), run.checkpoint(57), run.grads(2)]
    before = {p: p.stat().st_mtime_ns for p in kept}

    sets = [a for s in SETS for a in ("--set", s)]
    res = cli("run", str(DIGITS), "--out", str(run.root), "--resume", "--engine", "local", *sets)
    assert res.exit_code == 0, res.output
    assert {p: p.stat().st_mtime_ns for p in kept} == before  # training and intact segments are not redone
    assert digests(run.root) == digests(runs["ref"])


def test_resume_refuses_what_cannot_be_right(runs, tmp_path) -> None:
    run = RunDir(shutil.copytree(runs["ref"], tmp_path / "copy"))
    res = cli("run", "--out", str(run.root), "--resume", "--force", "--engine", "local")
    assert res.exit_code == 2 and "--resume and --force" in res.output
    sets = [a for s in SETS for a in ("--set", s)]
    res = cli(
        "run", str(DIGITS), "--out", str(run.root), "--resume", "--engine", "local", *sets, "--set", "train.lr=0.2"
    )
    assert res.exit_code == 2, res.output
    assert "cannot resume with a config other than the run's own (train.lr: 0.1 in run.json, 0.2 given" in res.output
    res = cli("train", "--resume")
    assert res.exit_code == 2 and "--resume without CONFIG needs --out RUN" in res.output
    res = cli("run", "--out", str(run.root), "--resume")
    assert res.exit_code == 2 and "resume with --engine local" in res.output
    run.update_meta(status="training", process=this_process())  # a training process that is alive
    res = cli("train", "--out", str(run.root), "--resume")
    assert res.exit_code == 2 and f"still training (pid {os.getpid()}" in res.output
    res = cli("status", str(run.root))
    assert f"training in progress: pid {os.getpid()}" in res.output


def test_a_finished_training_is_kept_or_refused_never_redone(runs, tmp_path) -> None:
    run = RunDir(shutil.copytree(runs["ref"], tmp_path / "copy"))
    # killed after its last file, before run.json said 'trained': nothing is trained again
    run.update_meta(status="training", process={"pid": 2**22 + 1, "host": this_process()["host"], "start": None})
    before = {p: p.stat().st_mtime_ns for p in run.root.rglob("*.safetensors")}
    res = cli("train", "--out", str(run.root), "--resume")
    assert res.exit_code == 0, res.output
    assert run.meta()["status"] == "trained" and "process" not in run.meta()
    assert {p: p.stat().st_mtime_ns for p in run.root.rglob("*.safetensors")} == before
    with open(run.grads(0), "r+b") as f:  # a finished training's file damaged: only --force trains again
        f.truncate(100)
    res = cli("train", "--out", str(run.root), "--resume")
    assert res.exit_code == 2
    assert "training finished but its files are damaged (grads/seg-0000-rank-0.arrow: size 100 bytes" in res.output
    assert "train it again with --force" in res.output


DROPOUT_TASK = '''
from torch import nn
from dvemb.task import ClassificationTask


class DropoutMLP(ClassificationTask):
    """Dropout draws from torch's global RNG at every step."""

    def build_model(self, info):
        return nn.Sequential(nn.Linear(info.d_in, 32), nn.Tanh(), nn.Dropout(0.3), nn.Linear(32, info.n_classes))
'''


def test_interrupted_training_resumes_exactly_with_rng_adamw_accumulation(tmp_path, monkeypatch) -> None:
    """Every piece of the state matters here: dropout (RNG), AdamW (moments + step), warmup + cosine
    (scheduler), accumulation and clipping; interrupted mid-epoch, at an epoch's start and right at a
    boundary, by an error and by Ctrl-C (status 'cancelled'). Without the RNG restored, or with the
    wrong batch position, the files after the boundary differ."""
    (tmp_path / "droptask.py").write_text(DROPOUT_TASK)
    monkeypatch.syspath_prepend(str(tmp_path))
    sets = [
        "task=droptask:DropoutMLP",
        "data.subset=400",
        "data.batch_size=25",  # 16 micro-batches, 8 steps an epoch
        "embed.segments=6",
        "train.optimizer=adamw",
        "train.lr=0.01",
        "train.weight_decay=0.1",
        "train.schedule=cosine",
        "train.warmup_steps=5",
        "train.accumulate=2",
        "train.grad_clip=0.5",
        "train.precision=64-true",
    ]
    cfg = load_config(DIGITS, sets)
    ref = train(cfg, RunDir(tmp_path / "ref"), progress=False)
    assert ref.boundaries == [0, 4, 8, 12, 16, 20, 24]  # epochs start at steps 0, 8, 16
    want = digests(ref.root)
    real = Trainee.training_step
    stops = [  # (step that raises, how, status) -> resumed at (epoch, micro-batch)
        (6, RuntimeError, "failed"),  # -> 4 (0, 8): mid-epoch, the epoch's validation still to come
        (9, KeyboardInterrupt, "cancelled"),  # -> 8 (1, 0): an epoch's start
        (16, OSError, "failed"),  # -> 16 (2, 0): its resume state was written before the step ran
    ]
    for stop_at, exc, status in stops:

        def dying(self, batch, batch_idx, stop_at=stop_at, exc=exc):
            if self.trainer.global_step == stop_at:
                raise exc("stop")
            return real(self, batch, batch_idx)

        monkeypatch.setattr(Trainee, "training_step", dying)
        run = RunDir(tmp_path / f"stop-{stop_at}")
        with pytest.raises(exc):
            train(cfg, run, progress=False)
        meta = run.meta()
        assert meta["status"] == status and meta["failed_at_step"] == stop_at
        monkeypatch.setattr(Trainee, "training_step", real)
        train(cfg, run, progress=False, resume=True)
        resumed = max(b for b in ref.boundaries[1:-1] if b <= stop_at)
        assert run.meta()["resumed_from"] == [resumed] and run.meta()["status"] == "trained"
        assert digests(run.root) == want, stop_at
    train(cfg, run, progress=False, resume=True)  # a finished training is kept as it is
    assert digests(run.root) == want and run.meta()["resumed_from"] == [16]
