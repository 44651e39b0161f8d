"""Flow tests share ONE real Prefect server per session: ``prefect server start`` with its own PREFECT_HOME
in a temporary folder and a free port, services on (scheduler, triggers, automations), their loops tuned
to seconds. The settings are set here, before anything imports Prefect (Prefect reads them at import).

Fixtures: ``prefect_server`` (the server), ``deployed`` (prefect.yaml registered with ``prefect deploy
--all``), ``closed_loop`` (a worker runs a scheduled curation end to end and the trigger's retraining).
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
DIGITS = ROOT / "configs" / "digits_mlp.yaml"
POOL = "dvemb"
TINY = ["train.epochs=2", "data.subset=300", "embed.segments=2", "embed.write=always"]  # embed segments in parallel


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_HOME = Path(tempfile.mkdtemp(prefix="dvemb-flow-tests-"))
_PORT = _free_port()
PREFECT_ENV = {
    "PREFECT_HOME": str(_HOME / "prefect"),
    "PREFECT_API_URL": f"http://127.0.0.1:{_PORT}/api",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_UI_ENABLED": "false",
    # the scheduler creates runs within seconds of a deployment's registration (defaults: 60 s / 5 s loops)
    "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "2",
    "PREFECT_SERVER_SERVICES_SCHEDULER_RECENT_DEPLOYMENTS_LOOP_SECONDS": "1",
    "PREFECT_WORKER_QUERY_SECONDS": "1",
    "PREFECT_WORKER_PREFETCH_SECONDS": "1",
    "PREFECT_LOGGING_TO_API_BATCH_INTERVAL": "0.5",
    "OMP_NUM_THREADS": "1",
}
os.environ.update(PREFECT_ENV)

from dvemb.config import RunConfig, load_config  # noqa: E402


def wait_for(what: str, ok: Callable[[], Any], timeout: float, every: float = 0.5, log: Path | None = None) -> Any:
    """Poll ``ok()`` until it returns something truthy; fail naming ``what`` (and the log's tail)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := ok():
            return result
        time.sleep(every)
    tail = "\n".join(log.read_text(errors="replace").splitlines()[-60:]) if log and log.exists() else ""
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{tail}")


def _process(cmd: list[str], log: Path, **kw: Any) -> subprocess.Popen:
    return subprocess.Popen(
        cmd, cwd=ROOT, env={**os.environ, **PREFECT_ENV}, stdout=log.open("wb"), stderr=subprocess.STDOUT, **kw
    )


def _load_stop() -> Callable[[subprocess.Popen], None]:
    """scripts/ui_check.py's ``stop`` (stdlib only; loaded by path: plain ``pytest`` has no repository root on
    sys.path)."""
    spec = importlib.util.spec_from_file_location("dvemb_ui_check", ROOT / "scripts" / "ui_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.stop


_stop = _load_stop()


@pytest.fixture(scope="session")
def prefect_server() -> Iterator[str]:
    """A real Prefect server (SQLite under the temporary PREFECT_HOME); yields its API URL."""
    log = _HOME / "server.log"
    cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(_PORT)]
    proc = _process(cmd, log)
    api = PREFECT_ENV["PREFECT_API_URL"]

    def healthy() -> bool:
        if proc.poll() is not None:
            pytest.fail(f"prefect server exited:\n{log.read_text(errors='replace')[-4000:]}")
        try:
            with urllib.request.urlopen(f"{api}/health", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    try:
        t0 = time.monotonic()
        wait_for("the Prefect server", healthy, timeout=120, log=log)
        print(f"[flow tests] prefect server up in {time.monotonic() - t0:.1f} s; PREFECT_HOME={_HOME}", flush=True)
        yield api
    finally:
        if "prefect" in sys.modules:  # send the last queued log lines while the server still listens
            from prefect.logging.handlers import APILogWorker

            APILogWorker.drain_all(timeout=10)
        _stop(proc)


@pytest.fixture(scope="session")
def digits_config() -> RunConfig:
    return load_config(DIGITS)


def cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    """Run the ``prefect`` CLI from the repository root against the test server."""
    return subprocess.run(
        [sys.executable, "-m", "prefect", "--no-prompt", *args],
        cwd=ROOT,
        env={**os.environ, **PREFECT_ENV},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="session")
def deployed(prefect_server: str) -> dict[str, Any]:
    """prefect.yaml registered as a user would: the process work pool, then ``prefect deploy --all``."""
    from prefect.client.orchestration import get_client

    made = cli("work-pool", "create", POOL, "--type", "process")
    assert made.returncode == 0, made.stdout + made.stderr
    t0 = time.monotonic()
    proc = cli("deploy", "--all")
    print(f"[flow tests] prefect deploy --all in {time.monotonic() - t0:.1f} s", flush=True)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    with get_client(sync_client=True) as client:
        return {
            n: client.read_deployment_by_name(n)
            for n in ("pipeline/nightly-curation", "pipeline/on-demand", "query/on-demand", "retrain/retrain-curated")
        }


@dataclass
class ClosedLoop:
    """What a scheduled end-to-end run left: the curation and retraining flow runs and their folders."""

    curation: Any  # FlowRun of the scheduled pipeline run (created by the scheduler)
    retrain: Any  # FlowRun of retrain-curated (created by the deployment trigger)
    run_dir: Path
    datasets: Path
    version: Path
    log: Path | None  # the worker's log, when a worker ran them


def _closed_loop(deployed: dict[str, Any], tmp: Path, name: str, execute: Callable[[Any, Path], Any]) -> ClosedLoop:
    """A twin of the nightly deployment with the fast config and an interval schedule whose first run is due
    in a few seconds (the real one stays cron 0 2 * * *). The scheduler creates that run; ``execute(flow_run,
    log)`` runs it; it publishes a dataset version; the trigger creates the retraining run; ``execute`` runs
    that too. Both runs are read back in their final state."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import DeploymentScheduleCreate, DeploymentUpdate
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.client.schemas.schedules import IntervalSchedule
    from prefect.client.schemas.sorting import FlowRunSort

    nightly, retrain = deployed["pipeline/nightly-curation"], deployed["retrain/retrain-curated"]
    params = {
        **nightly.parameters,
        "overrides": TINY,
        "out": str(tmp / "runs" / "nightly-{name}-{now:%Y%m%d-%H%M%S}"),
        "publish_to": str(tmp / "datasets"),
    }
    log = tmp / "executor.log"
    due = datetime.now(UTC) + timedelta(seconds=3)  # the first run; then hourly (never reached in a test)
    hourly_from_due = IntervalSchedule(interval=timedelta(hours=1), anchor_date=due)
    with get_client(sync_client=True) as client:
        client.update_deployment(retrain.id, DeploymentUpdate(parameters={"seeds": [0, 1]}))
        test_id = client.create_deployment(
            flow_id=nightly.flow_id,
            name=name,
            entrypoint=nightly.entrypoint,
            pull_steps=nightly.pull_steps,
            work_pool_name=POOL,
            work_queue_name=nightly.work_queue_name,
            job_variables=nightly.job_variables,
            parameters=params,
            parameter_openapi_schema=nightly.parameter_openapi_schema,
            schedules=[DeploymentScheduleCreate(schedule=hourly_from_due)],
        )

        def run_of(deployment_id: Any, match: Callable[[Any], bool] = lambda r: True) -> Callable[[], Any]:
            """The deployment's earliest flow run that ``match``es (the scheduler makes several at once)."""

            def ok() -> Any:
                runs = client.read_flow_runs(
                    deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])),
                    sort=FlowRunSort.EXPECTED_START_TIME_ASC,
                )
                return next((r for r in runs if match(r)), None)

            return ok

        curation = wait_for("the scheduler to create the curation run", run_of(test_id), 60, 0.5, log)
        assert curation.expected_start_time <= due + timedelta(seconds=1), "not the run due in 3 s"
        execute(curation, log)
        curation = client.read_flow_run(curation.id)
        assert curation.state.is_completed(), f"{curation.state.message}\n{_tail(log)}"
        versions = sorted((tmp / "datasets").glob("*/v*"))
        assert len(versions) == 1, versions
        by_version = run_of(retrain.id, lambda r: r.parameters.get("dataset") == str(versions[0]))
        retraining = wait_for("the trigger to create the retraining run", by_version, 60, 0.5, log)
        execute(retraining, log)
        retraining = client.read_flow_run(retraining.id)
    return ClosedLoop(curation, retraining, _run_dir(tmp), tmp / "datasets", versions[0], log)


def _tail(log: Path, n: int = 60) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-n:]) if log.exists() else ""


@pytest.fixture(scope="session")
def closed_loop(deployed: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> ClosedLoop:
    """The closed loop with this process as the executor: Prefect's flow engine runs the flow runs that the
    scheduler and the trigger created (what a worker's subprocess does, without its start-up cost)."""
    from prefect.flow_engine import run_flow

    from flows.pipeline import pipeline
    from flows.retrain import retrain

    flows = {"pipeline": pipeline, "retrain": retrain}

    def execute(flow_run: Any, log: Path) -> None:
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            flow = flows[client.read_flow(flow_run.flow_id).name]
        run_flow(flow, flow_run=flow_run, parameters=flow_run.parameters, return_type="state")

    return _closed_loop(deployed, tmp_path_factory.mktemp("closed-loop"), "nightly-curation-test", execute)


@pytest.fixture(scope="session")
def worker_loop(deployed: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> ClosedLoop:
    """The closed loop run by ``prefect worker start --pool dvemb`` (a subprocess per flow run)."""
    tmp = tmp_path_factory.mktemp("worker-loop")
    log = tmp / "executor.log"
    worker = _process([sys.executable, "-m", "prefect", "worker", "start", "--pool", POOL], log)

    def execute(flow_run: Any, _log: Path) -> None:
        from prefect.client.orchestration import get_client

        def final() -> Any:
            if worker.poll() is not None:
                pytest.fail(f"worker exited:\n{_tail(log)}")
            with get_client(sync_client=True) as client:
                fr = client.read_flow_run(flow_run.id)
            return fr.state and fr.state.is_final()

        wait_for(f"the worker to run {flow_run.name}", final, 400, 1, log)

    try:
        return _closed_loop(deployed, tmp, "nightly-curation-worker-test", execute)
    finally:
        _stop(worker)


def _run_dir(tmp: Path) -> Path:
    runs = sorted((tmp / "runs").glob("nightly-*"))
    assert len(runs) == 1, runs
    return runs[0]


def manifest_of(version: Path) -> dict:
    return json.loads((version / "manifest.json").read_text())
