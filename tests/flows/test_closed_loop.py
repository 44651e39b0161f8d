"""The closed loop on a schedule, end to end on a real server with a process worker: the scheduler creates
the curation run, the worker runs it, it publishes a dataset version, the deployment trigger starts the
retraining on that version, and the retraining's comparison is an artifact."""

from __future__ import annotations

import json
import stat

import polars as pl
import pytest
from conftest import TINY, ClosedLoop, manifest_of
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, LogFilter, LogFilterFlowRunId

from dvemb.curate.publish import publish_version, read_version, sha256, versions
from dvemb.errors import StoreError
from dvemb.store.rundir import RunDir

pytestmark = pytest.mark.usefixtures("prefect_server")


def artifacts_of(flow_run_id) -> dict:
    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    return {a.key: a for a in arts}


def logs_of(flow_run_id) -> list[str]:
    """Every log line of the flow run (its tasks' included), oldest first."""
    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    return [f"{log.name}: {log.message}" for log in logs]


def test_the_scheduler_started_the_curation_and_the_trigger_the_retraining(closed_loop: ClosedLoop) -> None:
    cur, ret = closed_loop.curation, closed_loop.retrain
    assert cur.auto_scheduled, "the curation run must come from the schedule, not from a hand-made run"
    assert cur.state.is_completed(), cur.state.message
    assert ret.state.is_completed(), f"{ret.state.message}\n{closed_loop.log}"
    assert not ret.auto_scheduled
    assert ret.parameters["dataset"] == str(closed_loop.version)  # templated from the event's payload
    assert ret.created_by is not None and ret.created_by.type == "AUTOMATION"
    assert ret.expected_start_time >= cur.start_time


def test_published_version_is_complete_and_immutable(closed_loop: ClosedLoop) -> None:
    run = RunDir(closed_loop.run_dir)
    folder, manifest = read_version(closed_loop.version)
    curated = pl.read_parquet(folder / "curated.parquet")
    assert manifest["version"] == folder.name == "v0001"
    assert manifest["rows"] == curated.height == json.loads(run.plan.read_text())["n_kept"]
    assert manifest["files"]["curated.parquet"]["sha256"] == sha256(run.curated)
    assert manifest["source"]["run"] == str(run.root)
    assert manifest["source"]["flow_run_id"] == str(closed_loop.curation.id)
    assert manifest["source"]["overrides"] == TINY
    assert manifest["source"]["config"]["train"]["epochs"] == 2  # the override, on top of digits_mlp.yaml
    assert manifest["source"]["config"]["train"]["lr"] == 0.1  # the file's value, not the default 0.05
    for f in ("curated.parquet", "plan.json", "manifest.json"):
        assert not (folder / f).stat().st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH)
    # a second publication is a new version; the first one is untouched
    before = {f.name: sha256(f) for f in folder.iterdir()}
    second = publish_version(run, closed_loop.datasets)
    assert second.name == "v0002" and second.parent == folder.parent
    assert {f.name: sha256(f) for f in folder.iterdir()} == before
    assert [v.name for v in versions(closed_loop.datasets, manifest["name"])] == ["v0001", "v0002"]
    assert manifest_of(second)["files"]["curated.parquet"] == manifest["files"]["curated.parquet"]


def test_a_changed_version_file_is_refused(closed_loop: ClosedLoop, tmp_path) -> None:
    copy = tmp_path / "v0001"
    copy.mkdir()
    for f in closed_loop.version.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    (copy / "plan.json").write_text("{}")
    with pytest.raises(StoreError, match="plan.json"):
        read_version(copy)


def test_retrain_compares_curated_full_and_random_on_the_same_budget(closed_loop: ClosedLoop) -> None:
    arts = artifacts_of(closed_loop.retrain.id)
    assert {"dvemb-retrain-comparison", "dvemb-retrain-summary"} <= set(arts)
    table = arts["dvemb-retrain-comparison"].data
    rows = json.loads(table) if isinstance(table, str) else table
    assert [r["variant"] for r in rows] == ["full", "curated", "random"]
    manifest = manifest_of(closed_loop.version)
    n_train = pl.read_parquet(RunDir(closed_loop.run_dir).data("train")).height
    assert [int(r["train rows"]) for r in rows] == [n_train, manifest["rows"], manifest["rows"]]
    assert all(r["seeds"] == "2" for r in rows)  # the test sets the deployment's seeds to [0, 1]
    assert "curated − random" in arts["dvemb-retrain-summary"].data


def test_curation_logs_show_dvemb_progress(closed_loop: ClosedLoop) -> None:
    logs = "\n".join(logs_of(closed_loop.curation.id))
    for expected in (
        "config ",  # the resolved config, at the start
        "epochs: 2",
        "train: ",
        "loss ",
        "embed: segment 2/2",
        "score: ",
        "curate: kept ",
        "published ",
    ):
        assert expected in logs, expected
    assert str(closed_loop.run_dir) in logs


def test_curation_summary_states_config_and_kept_dropped(closed_loop: ClosedLoop) -> None:
    arts = artifacts_of(closed_loop.curation.id)
    assert {"dvemb-run-summary", "dvemb-top-samples", "dvemb-influence-by-step", "dvemb-dataset-version"} <= set(arts)
    summary = arts["dvemb-run-summary"].data
    plan = json.loads(RunDir(closed_loop.run_dir).plan.read_text())
    assert "Config file: `" in summary and "configs/digits_mlp.yaml" in summary
    assert all(f"`{o}`" in summary for o in TINY)
    assert "## Resolved config" in summary and "lr: 0.1" in summary
    assert f"kept **{plan['n_kept']}** of {plan['n_train']}" in summary
    assert f"dropped **{plan['n_dropped']}** (drop=negative: value < 0" in summary
    ph = plan["phases"]
    if ph["early_end"] == 0:
        assert "early phase: **empty**" in summary
    assert "data:image/png;base64," in arts["dvemb-influence-by-step"].data


@pytest.mark.slow
def test_a_process_worker_runs_the_closed_loop(worker_loop: ClosedLoop) -> None:
    """The same chain with `prefect worker start --pool dvemb` executing both runs (one subprocess each)."""
    cur, ret = worker_loop.curation, worker_loop.retrain
    assert cur.auto_scheduled and cur.state.is_completed(), f"{cur.state.message}\n{worker_loop.log}"
    assert ret.state.is_completed(), f"{ret.state.message}\n{worker_loop.log.read_text()[-3000:]}"
    assert ret.created_by is not None and ret.created_by.type == "AUTOMATION"
    assert ret.parameters["dataset"] == str(worker_loop.version)
    assert "dvemb-retrain-comparison" in artifacts_of(ret.id)
    assert any("curate: kept" in line for line in logs_of(cur.id))
