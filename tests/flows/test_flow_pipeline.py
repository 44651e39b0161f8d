"""End to end: the pipeline flow on digits_mlp fills the run directory and publishes its artifacts."""

from __future__ import annotations

import json
from pathlib import Path
from uuid import UUID

import polars as pl
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
from prefect.states import Failed

from dvemb.config import RunConfig
from dvemb.errors import StoreError
from dvemb.report import plot_path
from dvemb.store.rundir import RunDir
from flows.common import resolve_out, transient
from flows.pipeline import pipeline

pytestmark = pytest.mark.usefixtures("prefect_harness")


@pytest.fixture(scope="module")
def finished(digits_config: RunConfig, tmp_path_factory: pytest.TempPathFactory) -> tuple[RunDir, UUID]:
    out = tmp_path_factory.mktemp("flows") / "digits"
    state = pipeline(config=digits_config, out=str(out), return_state=True)
    assert state.is_completed(), state.message
    assert state.result() == str(out)
    return RunDir(out), state.state_details.flow_run_id


def test_run_directory_holds_every_stage_output(finished: tuple[RunDir, UUID]) -> None:
    run, _ = finished
    for stage in ("train", "embed", "score", "curate"):
        run.require(stage)
    k = len(run.boundaries) - 1
    assert k == run.meta()["config"]["embed"]["segments"]
    expected = [
        "run.json",
        "data/train.parquet",
        "data/val.parquet",
        "trajectory/steps.parquet",
        "trajectory/batches.parquet",
        "grads/projection.json",
        *[f"checkpoints/step-{b:06d}.safetensors" for b in run.boundaries],
        *[f"grads/seg-{j:04d}-rank-0.arrow" for j in range(k)],
        *[f"embeddings/seg-{j:04d}-rank-0.arrow" for j in range(k)],
        *[f"embeddings/seg-{j:04d}-propagator.safetensors" for j in range(k)],
        "scores/occurrences.parquet",
        "scores/samples.parquet",
        "curation/curated.parquet",
        "curation/plan.json",
        "report.md",
        "plots/influence_by_step.png",
    ]
    missing = [p for p in expected if not (run.root / p).is_file()]
    assert not missing
    assert plot_path(run).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    plan = json.loads(run.plan.read_text())
    assert plan["n_kept"] == pl.read_parquet(run.curated).height
    assert not list(run.root.rglob(".*.tmp-*")), "a temporary file was left behind"


def test_every_recorded_occurrence_has_a_final_score(finished: tuple[RunDir, UUID]) -> None:
    run, _ = finished
    batches = pl.read_parquet(run.batches).select("step", "sample_id")
    occ = pl.read_parquet(run.occurrences)
    final = occ.filter(pl.col("checkpoint") == run.boundaries[-1]).select("step", "sample_id", "score")
    assert final.height == batches.height
    joined = batches.join(final, on=["step", "sample_id"], how="left")
    assert joined.height == batches.height
    assert joined["score"].null_count() == 0
    assert joined["score"].is_finite().all()
    assert sorted(occ["checkpoint"].unique()) == run.boundaries[1:]


def test_artifacts_published(finished: tuple[RunDir, UUID]) -> None:
    _, flow_run_id = finished
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    by_key = {a.key: a for a in artifacts}
    assert set(by_key) == {"dvemb-run-summary", "dvemb-top-samples", "dvemb-influence-by-step"}
    assert by_key["dvemb-run-summary"].type == "markdown"
    assert "segment boundaries" in by_key["dvemb-run-summary"].data
    table = by_key["dvemb-top-samples"]
    assert table.type == "table"
    rows = json.loads(table.data) if isinstance(table.data, str) else table.data
    assert [r["group"] for r in rows] == ["most valuable"] * 10 + ["most harmful"] * 10
    values = [float(r["value"]) for r in rows]
    assert values[:10] == sorted(values[:10], reverse=True) and values[10:] == sorted(values[10:])
    assert "data:image/png;base64," in by_key["dvemb-influence-by-step"].data


def test_existing_run_directory_is_not_overwritten(finished: tuple[RunDir, UUID], digits_config: RunConfig) -> None:
    run, _ = finished
    before = run.occurrences.stat().st_mtime_ns
    state = pipeline(config=digits_config, out=str(run.root), return_state=True)
    assert state.is_failed()
    assert "--force" in (state.message or "") or "not empty" in (state.message or "")
    assert run.occurrences.stat().st_mtime_ns == before


def test_retry_condition_skips_dvemb_errors() -> None:
    assert transient(None, None, Failed(data=StoreError("missing grads"))) is False
    assert transient(None, None, Failed(data=OSError("disk hiccup"))) is True


def test_out_placeholders_are_filled(tmp_path: Path) -> None:
    out = resolve_out(str(tmp_path / "nightly-{now:%Y}"))
    assert Path(out).is_absolute() and "{" not in out


def test_retrain_flow_compares_baseline_and_curated(finished: tuple[RunDir, UUID], digits_config: RunConfig) -> None:
    """The closed loop on the finished run: one seed per variant, a comparison table and its artifact."""
    from flows.retrain import retrain

    run, _ = finished
    state = retrain(config=digits_config, out=str(run.root), seeds=[0], return_state=True)
    assert state.is_completed(), state.message
    table = pl.read_parquet(run.root / "retrain" / "comparison.parquet")
    assert table["variant"].to_list() == ["baseline", "curated"]
    assert table["seeds"].to_list() == [1, 1]
    curated_rows = pl.read_parquet(run.curated).height
    assert table["n_train"].to_list() == [pl.read_parquet(run.data("train")).height, curated_rows]
    assert table.filter(pl.col("variant") == "baseline")["selection_steps"].to_list() == [0]
    with get_client(sync_client=True) as client:
        flow_run_id = state.state_details.flow_run_id
        arts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    assert "dvemb-retrain-comparison" in {a.key for a in arts}
