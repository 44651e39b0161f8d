"""``dvemb run --engine dask`` / ``--address``: the pipeline flow with Prefect's task runner swapped for
``prefect_dask.DaskTaskRunner``. A 2-worker LocalCluster (processes) started here plays the existing cluster:
the embedding segments and the scoring run on its workers, and the scores equal ``--engine local``'s exactly."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import polars as pl
import pytest
from conftest import DIGITS, _free_port
from distributed import get_task_stream
from polars.testing import assert_frame_equal
from typer.testing import CliRunner

from dvemb.cli import app
from dvemb.store.rundir import RunDir

# segments really embedded (embed.write=always + embedding mode) on 3 segments: 3 embed tasks to spread
SETS = ["data.subset=300", "train.epochs=1", "embed.segments=3", "score.mode=embedding", "embed.write=always"]


def dvemb_run(out: Path, *args: str):
    sets = [a for s in SETS for a in ("--set", s)]
    return CliRunner().invoke(app, ["run", str(DIGITS), "--out", str(out), *sets, *args])


@pytest.fixture(scope="module")
def cluster(prefect_server: str) -> Iterator[tuple]:
    """A running 2-worker Dask cluster (separate processes, one thread each) and a client to watch it."""
    from distributed import Client, LocalCluster

    with (
        LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as lc,
        Client(lc, set_as_default=False) as client,
    ):
        client.wait_for_workers(2, timeout=60)
        yield lc, client


def test_dask_cluster_runs_the_tasks_and_matches_local(cluster: tuple, tmp_path: Path) -> None:
    lc, client = cluster
    local = dvemb_run(tmp_path / "local", "--engine", "local")
    assert local.exit_code == 0, local.output
    with get_task_stream(client) as ts:  # the scheduler records which worker ran each task
        dask = dvemb_run(tmp_path / "dask", "--address", lc.scheduler_address)
    assert dask.exit_code == 0, dask.output

    a, b = RunDir(tmp_path / "local"), RunDir(tmp_path / "dask")
    assert len(b.boundaries) - 1 == 3 and all(b.embeddings(j).is_file() for j in range(3))
    for rel in ("scores/occurrences.parquet", "scores/samples.parquet"):
        assert_frame_equal(pl.read_parquet(a.root / rel), pl.read_parquet(b.root / rel), check_exact=True)
        assert (a.root / rel).read_bytes() == (b.root / rel).read_bytes(), rel
    for j in range(3):  # the embeddings the workers wrote, to the bit
        assert a.embeddings(j).read_bytes() == b.embeddings(j).read_bytes()

    # the scheduler's task stream: every embed segment and the scoring ran on the cluster's workers
    stream = ts.data
    ran = sorted((r["key"], r["worker"]) for r in stream)
    workers = set(lc.scheduler_info["workers"])
    embeds = [r for r in stream if r["key"].startswith("embed_segment")]
    assert len(embeds) == 3, ran
    assert {r["worker"] for r in embeds} <= workers, ran
    assert any(r["key"].startswith("score_occurrences") for r in stream), ran


@pytest.mark.parametrize("kind", ["closed port", "no port"])
def test_address_that_does_not_answer(tmp_path: Path, kind: str) -> None:
    """Nothing listens on the port (or the address has none): exit 2 within seconds, one line naming the
    address, nothing written."""
    address = f"tcp://127.0.0.1:{_free_port()}" if kind == "closed port" else "127.0.0.1"
    t0 = time.monotonic()
    res = dvemb_run(tmp_path / "r", "--address", address)
    took = time.monotonic() - t0
    assert res.exit_code == 2, res.output
    assert f"--address {address!r}" in res.output
    assert ("no Dask scheduler answered" if kind == "closed port" else "not a scheduler address") in res.output
    assert "Traceback" not in res.output
    assert took < 20, took
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_default_local_cluster_from_the_command_line(tmp_path: Path) -> None:
    """``dvemb -v run --engine dask`` as a user types it (a subprocess, no PREFECT_API_URL): the flow makes
    its own 2-process LocalCluster; one temporary Prefect server (this process's), which the workers report
    to (none of their own); the scores equal ``--engine local``'s."""
    sets = [a for s in SETS for a in ("--set", s)]
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    logs = {}
    for name in ("local", "dask"):
        cmd = [str(Path(sys.executable).parent / "dvemb"), "-v", "run", str(DIGITS), "--out", str(tmp_path / name)]
        res = subprocess.run([*cmd, *sets, "--engine", name], capture_output=True, text=True, timeout=600, env=env)
        assert res.returncode == 0, res.stderr[-4000:]
        logs[name] = res.stdout + res.stderr
    assert "Creating a new Dask cluster" in logs["dask"] and "Creating a new Dask cluster" not in logs["local"]
    assert logs["dask"].count("Starting temporary server") == 1, logs["dask"][-4000:]
    assert logs["dask"].count("Task run 'embed-segment-") == 3
    for rel in ("scores/occurrences.parquet", "scores/samples.parquet"):
        assert (tmp_path / "local" / rel).read_bytes() == (tmp_path / "dask" / rel).read_bytes(), rel
