"""prefect.yaml and serve.py declare the same deployments; `prefect deploy --all` registers them on a real
server; the server's scheduler (not the test) creates the nightly runs."""

from __future__ import annotations

import inspect
from datetime import UTC, datetime, timedelta
from typing import Any

import yaml
from conftest import POOL, ROOT, wait_for
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

from deployments.serve import build
from flows.pipeline import pipeline
from flows.query import query
from flows.retrain import retrain

SPEC = yaml.safe_load((ROOT / "prefect.yaml").read_text())
FLOWS = {"flows/pipeline.py:pipeline": pipeline, "flows/query.py:query": query, "flows/retrain.py:retrain": retrain}
BY_NAME = {f"{FLOWS[d['entrypoint']].name}/{d['name']}": d for d in SPEC["deployments"]}  # flow/deployment
DECLARED = {"pipeline/nightly-curation", "pipeline/on-demand", "query/on-demand", "retrain/retrain-curated"}


def test_prefect_yaml_declares_nightly_on_demand_query_and_retrain() -> None:
    assert set(BY_NAME) == DECLARED and len(SPEC["deployments"]) == len(DECLARED)
    nightly = BY_NAME["pipeline/nightly-curation"]
    assert nightly["schedules"] == [{"cron": "0 2 * * *", "timezone": "UTC", "active": True}]
    for name in ("pipeline/on-demand", "query/on-demand", "retrain/retrain-curated"):
        assert BY_NAME[name]["schedules"] == [], name
    for d in SPEC["deployments"]:
        assert d["work_pool"]["name"] == POOL
        names = set(inspect.signature(FLOWS[d["entrypoint"]].fn).parameters)
        assert set(d["parameters"]) <= names, d["name"]
        if "config" in d["parameters"]:
            assert (ROOT / d["parameters"]["config"]).is_file()
    assert nightly["parameters"]["publish_to"] == "datasets" and nightly["parameters"]["force"] is True
    (trigger,) = BY_NAME["retrain/retrain-curated"]["triggers"]
    assert trigger["expect"] == ["dvemb.dataset.published"]
    assert trigger["parameters"] == {"dataset": "{{ event.payload.dataset }}"}


def test_serve_builds_the_same_deployments() -> None:
    served = {f"{d.flow_name}/{d.name}": d for d in build()}
    assert set(served) == DECLARED
    for name, d in BY_NAME.items():
        s = served[name]
        assert [(x.schedule.cron, x.schedule.timezone) for x in s.schedules] == [
            (c["cron"], c["timezone"]) for c in d["schedules"]
        ]
        for key, value in d["parameters"].items():
            if key in ("out", "publish_to"):  # made absolute: the checkout's runs/ and datasets/
                assert s.parameters[key] == str(ROOT / value)
            else:
                assert s.parameters[key] == value
        assert [t.expect for t in s.triggers] == [set(t["expect"]) for t in d.get("triggers", [])]
    assert [f"{d.flow_name}/{d.name}" for d in build(only=["query/on-demand"])] == ["query/on-demand"]
    assert {f"{d.flow_name}/{d.name}" for d in build(only=["on-demand"])} == {"pipeline/on-demand", "query/on-demand"}


def test_deploy_all_registers_the_declared_deployments(deployed: dict[str, Any]) -> None:
    with get_client(sync_client=True) as client:
        pool = client.read_work_pool(POOL)
        automations = client.read_automations()
    assert pool.type == "process"
    assert set(deployed) == DECLARED
    for full_name, d in deployed.items():
        declared = BY_NAME[full_name]
        assert d.parameters == declared["parameters"]
        assert d.work_pool_name == POOL
        assert d.pull_steps == [{"prefect.deployments.steps.set_working_directory": {"directory": str(ROOT)}}]
    nightly = deployed["pipeline/nightly-curation"]
    assert [(s.schedule.cron, s.schedule.timezone, s.active) for s in nightly.schedules] == [("0 2 * * *", "UTC", True)]
    assert not deployed["pipeline/on-demand"].schedules
    # the trigger became an automation that runs retrain-curated with the event's version folder
    (auto,) = [a for a in automations if a.name == BY_NAME["retrain/retrain-curated"]["triggers"][0]["name"]]
    assert auto.trigger.expect == {"dvemb.dataset.published"}
    (action,) = auto.actions
    assert action.deployment_id == deployed["retrain/retrain-curated"].id
    assert action.parameters == {"dataset": "{{ event.payload.dataset }}"}
    schema = nightly.parameter_openapi_schema["properties"]
    assert "configs/digits_mlp.yaml" in schema["config"]["anyOf"][0]["enum"]  # the dropdown
    for p in ("overrides", "out", "force", "publish_to"):
        assert schema[p].get("description"), p
    query_form = deployed["query/on-demand"].parameter_openapi_schema
    assert not deployed["query/on-demand"].schedules and query_form["required"] == ["run", "table"]
    assert query_form["properties"]["score_mode"]["anyOf"][0]["enum"] == ["exact", "embedding", "direct"]
    assert all(p.get("description") for p in query_form["properties"].values())


def test_the_scheduler_creates_the_nightly_runs(deployed: dict[str, Any]) -> None:
    """No run is made by hand: the server's scheduler fills in the next nightly runs at 02:00 UTC."""
    nightly = deployed["pipeline/nightly-curation"]

    def scheduled() -> list:
        with get_client(sync_client=True) as client:
            runs = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[nightly.id])))
        return runs if len(runs) >= 3 else []

    runs = wait_for("the scheduler to create 3 nightly runs", scheduled, timeout=60)
    now = datetime.now(UTC)
    starts = sorted(r.expected_start_time.astimezone(UTC) for r in runs)
    assert all(r.auto_scheduled and r.state_name == "Scheduled" for r in runs)
    assert all((t.hour, t.minute, t.second) == (2, 0, 0) for t in starts)
    assert now < starts[0] <= now + timedelta(days=1)
    assert [b - a for a, b in zip(starts, starts[1:])] == [timedelta(days=1)] * (len(starts) - 1)
    assert all(r.parameters == nightly.parameters for r in runs)
