"""The ``query`` flow on a finished digits run: the same files as ``dvemb query`` of the same table (to the
byte), its artifacts, its form; a bad table fails the flow run with dvemb's named error, unretried."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from uuid import UUID

import polars as pl
import pytest
from conftest import TINY
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    FlowRunFilter,
    FlowRunFilterId,
    LogFilter,
    LogFilterFlowRunId,
)
from prefect.exceptions import PrefectHTTPStatusError
from typer.testing import CliRunner, Result

from dvemb.cli import app
from dvemb.errors import TableValidationError
from dvemb.report import TOP_N, top_samples
from dvemb.store.rundir import RunDir
from flows.query import KEYS, query

pytestmark = pytest.mark.usefixtures("prefect_server")


@pytest.fixture(scope="module")
def run(cli_run, tmp_path_factory) -> Path:
    """A finished small digits run (exact mode, embeddings written) and a new query table: a third of its
    validation rows."""
    with root_handlers_kept():
        out = cli_run(tmp_path_factory.mktemp("query-flow") / "run", TINY)
    val = pl.read_parquet(out / "data" / "val.parquet")
    val.head(val.height // 3).write_parquet(out.parent / "slice.parquet")
    return out


@contextmanager
def root_handlers_kept() -> Iterator[None]:
    """The CLI's ``logging.basicConfig(force=True)`` puts a handler on CliRunner's stream on the root logger;
    that stream is closed after the call: put back the root handlers and level of before."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


def cli_query(run: Path, table: Path, name: str, *sets: str) -> Result:
    """``dvemb query RUN TABLE --name NAME [--set …]`` in this process."""
    args = ["query", str(run), str(table), "--name", name, *(a for s in sets for a in ("--set", s))]
    with root_handlers_kept():
        return CliRunner().invoke(app, args)


def flow_run_records(state) -> tuple[list, list, str]:
    """The flow run's task runs, its table and markdown artifacts, and its log text."""
    flow_run_id: UUID = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        by_run = ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        artifacts = client.read_artifacts(artifact_filter=by_run)
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    published = [a for a in artifacts if a.type in ("table", "markdown")]
    return tasks, published, "\n".join(r.message for r in logs)


@pytest.mark.parametrize("mode", [None, "embedding"])
def test_the_flow_writes_what_the_cli_writes(run: Path, mode: str | None) -> None:
    """Flow (score_mode=mode) and CLI (--set score.mode=mode) on the same table: the same occurrence and sample
    scores, byte for byte; mode None is the run's recorded one (exact)."""
    table = run.parent / "slice.parquet"
    tag = mode or "recorded"
    res = cli_query(run, table, f"cli-{tag}", *([f"score.mode={mode}"] if mode else []))
    assert res.exit_code == 0, res.output
    state = query(run=str(run), table=str(table), name=f"flow-{tag}", score_mode=mode, return_state=True)
    assert state.is_completed(), state.message
    folder = run / "queries" / f"flow-{tag}"
    assert state.result() == str(folder)
    for f in ("occurrences.parquet", "samples.parquet", "val.parquet"):
        assert (folder / f).read_bytes() == (run / "queries" / f"cli-{tag}" / f).read_bytes(), f
    assert json.loads((folder / "query.json").read_text())["score_mode"] == (mode or "exact")
    scores = pl.read_parquet(run / "scores" / "occurrences.parquet")["score"]
    assert not pl.read_parquet(folder / "occurrences.parquet")["score"].equals(scores)  # a query of its own

    tasks, artifacts, log = flow_run_records(state)
    assert sorted(t.name.rsplit("-", 1)[0] for t in tasks) == ["publish-query-artifacts", "score-query"]
    by_key = {a.key: a for a in artifacts}
    assert set(by_key) == set(KEYS.values())
    expected = top_samples(RunDir(run), TOP_N, samples=folder / "samples.parquet")
    assert json.loads(by_key[KEYS["samples"]].data) == expected and len(expected) == 2 * TOP_N
    assert expected[0]["group"] == "most valuable" and expected[-1]["group"] == "most harmful"
    summary = by_key[KEYS["summary"]].data
    assert f"# Query `flow-{tag}`" in summary and str(table) in summary and f"{folder}/occurrences.parquet" in summary
    assert f"query flow-{tag}: {pl.read_parquet(table).height} rows, score.mode {mode or 'exact'}" in log


def test_a_bad_table_fails_the_flow_run_with_the_named_error(run: Path) -> None:
    """A table one feature too narrow: the flow run fails with the CLI's TableValidationError message (file and
    column named), in its state and its log; the task is not retried; nothing is left under queries/."""
    table = run.parent / "narrow.parquet"
    val = pl.read_parquet(run / "data" / "val.parquet")
    val.with_columns(pl.col("x").arr.to_list().list.head(63)).write_parquet(table)
    res = cli_query(run, table, "narrow-cli")
    assert res.exit_code == 2, res.output
    message = " ".join(res.output.split()).removeprefix("error: ")
    assert str(table) in message and "column 'x' has 63 features per row" in message

    state = query(run=str(run), table=str(table), name="narrow", return_state=True)
    assert state.is_failed()
    with pytest.raises(TableValidationError) as e:
        state.result()
    assert " ".join(str(e.value).split()) == message and str(e.value) in state.message
    tasks, artifacts, log = flow_run_records(state)
    assert [(t.name.rsplit("-", 1)[0], t.run_count) for t in tasks] == [("score-query", 1)]  # not retried
    assert str(e.value) in log and not artifacts
    assert not (run / "queries" / "narrow").exists() and not (run / "queries" / "narrow-cli").exists()


def test_the_form_has_a_described_field_per_parameter() -> None:
    schema = query.parameters.model_dump()
    assert schema["required"] == ["run", "table"]
    props = schema["properties"]
    assert list(props) == ["run", "table", "name", "score_mode", "force"]
    assert all(p.get("description") for p in props.values())
    assert props["score_mode"]["anyOf"][0]["enum"] == ["exact", "embedding", "direct"]
    assert props["score_mode"]["default"] is None and props["force"]["default"] is False


def test_the_on_demand_deployment_runs_the_flow(run: Path, deployed: dict[str, Any]) -> None:
    """``query/on-demand`` as the UI's Custom run does it: the server validates the form's values (a score_mode
    outside the dropdown is refused) and creates the flow run; Prefect's flow engine runs it here (what a
    worker's subprocess does): the files are the CLI's of the same table and mode."""
    from prefect.flow_engine import run_flow

    table = run.parent / "slice.parquet"
    dep = deployed["query/on-demand"]
    params = {"run": str(run), "table": str(table), "name": "deployed", "score_mode": "direct"}
    with get_client(sync_client=True) as client:
        with pytest.raises(PrefectHTTPStatusError, match="Validation failed for field 'score_mode'"):
            client.create_flow_run_from_deployment(dep.id, parameters={**params, "score_mode": "fast"})
        flow_run = client.create_flow_run_from_deployment(dep.id, parameters=params)
        run_flow(query, flow_run=flow_run, parameters=flow_run.parameters, return_type="state")
        flow_run = client.read_flow_run(flow_run.id)
    assert flow_run.state.is_completed(), flow_run.state.message
    res = cli_query(run, table, "cli-direct", "score.mode=direct")
    assert res.exit_code == 0, res.output
    for f in ("occurrences.parquet", "samples.parquet"):
        assert (run / "queries" / "deployed" / f).read_bytes() == (run / "queries" / "cli-direct" / f).read_bytes()


BUCKET = "dvemb-query-flow"


def test_a_query_of_a_run_in_s3(cli_run, s3, run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """run = s3://… (a real S3-compatible server): the task stages the run, queries it and pushes queries/NAME
    to the bucket, every file in manifest.json; the scores are the local run's query of the same table."""
    monkeypatch.setenv("DVEMB_CACHE", str(tmp_path / "cache"))
    uri = f"s3://{BUCKET}/runs/digits"
    with root_handlers_kept():
        cli_run(uri, TINY)  # the same seed and config as ``run``: the same run
    table = run.parent / "slice.parquet"
    state = query(run=uri, table=str(table), name="remote", score_mode="embedding", return_state=True)
    assert state.is_completed(), state.message
    assert state.result() == f"{uri}/queries/remote"

    def read(rel: str) -> bytes:
        with s3.open_input_stream(f"{BUCKET}/runs/digits/{rel}") as f:
            return f.read()

    manifest = json.loads(read("manifest.json"))["files"]
    for f in ("val.parquet", "occurrences.parquet", "samples.parquet", "query.json"):
        data = read(f"queries/remote/{f}")
        assert hashlib.sha256(data).hexdigest() == manifest[f"queries/remote/{f}"]["sha256"], f
    res = cli_query(run, table, "local-twin", "score.mode=embedding")
    assert res.exit_code == 0, res.output
    local = run / "queries" / "local-twin" / "occurrences.parquet"
    assert read("queries/remote/occurrences.parquet") == local.read_bytes()
