"""The pipeline flow on a remote run directory: ``dvemb run --out s3://…`` (Prefect's thread runner, or a Dask
cluster: slow) against a real S3-compatible server (moto_server, a subprocess). Every task works on a staged
copy of the run; the three embedding segments run in parallel and upload their files, one task records them
in manifest.json; the scores and embeddings in the bucket equal an ``--engine local`` run's to the bit."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import pyarrow.fs as pafs
import pytest
from conftest import DIGITS
from typer.testing import CliRunner

from dvemb.cli import app

SETS = ["data.subset=300", "train.epochs=1", "embed.segments=3", "score.mode=embedding", "embed.write=always"]
BUCKET = "dvemb-flow"


@pytest.fixture(scope="module", autouse=True)
def staging_cache(tmp_path_factory) -> Iterator[None]:
    """The module's own staging cache (set before the Dask workers start, so they inherit it)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DVEMB_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


def dvemb_run(out: str, *args: str):
    sets = [a for s in SETS for a in ("--set", s)]
    return CliRunner().invoke(app, ["run", str(DIGITS), "--out", out, *sets, *args])


@pytest.fixture(scope="module")
def local_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("local") / "run"
    res = dvemb_run(str(out), "--engine", "local")
    assert res.exit_code == 0, res.output
    return out


@pytest.mark.parametrize("engine", ["prefect", pytest.param("dask", marks=pytest.mark.slow)])
def test_pipeline_flow_writes_the_run_to_s3(
    prefect_server: str, s3: pafs.FileSystem, local_run: Path, engine: str
) -> None:
    """prefect: the segments in threads of the flow's process, sharing one staged copy (~10 s); dask: on a
    2-process LocalCluster's workers (~35 s, slow)."""
    uri = f"s3://{BUCKET}/runs/{engine}"
    if engine == "dask":
        from distributed import LocalCluster

        with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as lc:
            res = dvemb_run(uri, "--address", lc.scheduler_address)
    else:
        res = dvemb_run(uri, "--engine", "prefect")
    assert res.exit_code == 0, res.output

    prefix = f"{BUCKET}/runs/{engine}/"
    objects = {}
    for i in s3.get_file_info(pafs.FileSelector(prefix, recursive=True)):
        if i.type == pafs.FileType.File:
            with s3.open_input_stream(i.path) as f:
                objects[i.path.removeprefix(prefix)] = f.read()
    manifest = json.loads(objects.pop("manifest.json"))["files"]
    assert set(objects) == set(manifest)  # every segment's files, recorded by the one compose task
    for rel, data in objects.items():
        assert hashlib.sha256(data).hexdigest() == manifest[rel]["sha256"], rel
    assert "report.md" in manifest and "curation/plan.json" in manifest
    embeddings = [f"embeddings/seg-000{j}-rank-0.arrow" for j in range(3)]
    for rel in ["scores/occurrences.parquet", "scores/samples.parquet", *embeddings]:  # to the bit
        assert objects[rel] == (local_run / rel).read_bytes(), rel
