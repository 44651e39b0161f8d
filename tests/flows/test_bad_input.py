"""Bad input fails the flow run before training, names the field or path in the run's log, is not retried;
a retry of the same flow run takes over its own unfinished run directory."""

from __future__ import annotations

from pathlib import Path
from uuid import UUID

import pytest
import torch
from conftest import DIGITS, TINY
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterFlowRunId
from prefect.states import Failed

from dvemb.config import ConfigError
from dvemb.errors import StoreError
from dvemb.store.rundir import RunExistsError
from flows.common import permanent, resolve_out, transient
from flows.pipeline import pipeline, resolve
from flows.train import train_model

pytestmark = pytest.mark.usefixtures("prefect_server")


def failed_before_training(state, out: Path) -> tuple[str, list]:
    """The run failed; its log (flow + tasks); its task runs. Nothing was trained into ``out``."""
    assert state.is_failed()
    flow_run_id: UUID = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    assert [t.name.rsplit("-", 1)[0] for t in tasks] == ["resolve-config"]  # no training task ran
    assert tasks[0].run_count == 1  # not retried
    assert not (out / "checkpoints").exists()
    return "\n".join(log.message for log in logs), tasks


@pytest.mark.parametrize(
    ("config", "overrides", "named"),
    [
        ("configs/no_such.yaml", [], "configs/no_such.yaml"),
        (str(DIGITS), ["train.epoch=3"], "train.epoch"),  # an override naming no field
        (str(DIGITS), ["nosection.lr=3"], "nosection"),
        (str(DIGITS), ["train.epochs=0"], "train.epochs"),  # a value the field refuses
    ],
)
def test_bad_config_or_override_fails_before_training(tmp_path: Path, config: str, overrides: list, named: str) -> None:
    out = tmp_path / "run"
    state = pipeline(config=config, overrides=overrides, out=str(out), return_state=True)
    log, _ = failed_before_training(state, out)
    assert named in log and named in state.message
    with pytest.raises(ConfigError):
        state.result()


def test_config_file_that_does_not_validate(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(DIGITS.read_text().replace("lr: 0.1", "lr: -1"))
    state = pipeline(config=str(bad), out=str(tmp_path / "run"), return_state=True)
    log, _ = failed_before_training(state, tmp_path / "run")
    assert str(bad) in log and "train.lr" in log


def test_existing_out_without_force_names_the_parameter(tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "run.json").write_text('{"status": "trained", "boundaries": [0, 1]}')
    (out / "checkpoints").mkdir()
    (out / "checkpoints" / "step-000000.safetensors").write_bytes(b"x")
    state = pipeline(config=str(DIGITS), overrides=TINY, out=str(out), return_state=True)
    assert state.is_failed()
    with pytest.raises(RunExistsError) as e:
        state.result()
    assert str(out) in str(e.value) and "set force=true" in str(e.value)
    assert (out / "checkpoints" / "step-000000.safetensors").read_bytes() == b"x"  # untouched


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_missing_cuda_device_is_named_and_not_retried(tmp_path: Path) -> None:
    out = tmp_path / "run"
    state = pipeline(config=str(DIGITS), overrides=[*TINY, "embed.device=cuda"], out=str(out), return_state=True)
    log, _ = failed_before_training(state, out)
    assert "embed.device" in log and "CUDA device" in log


def test_permanent_errors_are_not_retried() -> None:
    for exc in (
        StoreError("missing grads"),
        ConfigError("train.lr"),
        RunExistsError("out"),
        AssertionError("Torch not compiled with CUDA enabled"),
        RuntimeError("No CUDA GPUs are available"),
        RuntimeError("CUDA error: invalid device ordinal"),
    ):
        assert permanent(exc) and transient(None, None, Failed(data=exc)) is False, exc
    for exc in (OSError("disk hiccup"), RuntimeError("CUDA out of memory"), ConnectionError("reset")):
        assert transient(None, None, Failed(data=exc)) is True, exc


def test_a_retry_continues_its_own_run_directory(tmp_path: Path) -> None:
    """UI Retry / a flow retry of the same run: its first attempt trained into out, then the process died;
    the retry does not fail with "exists" (any other run would: see above) nor start over: it continues
    the run it owns (training resumes from its last checkpoint; here there is nothing left to train)."""
    out = tmp_path / "run"
    trained: list[dict[str, int]] = []

    @flow(retries=1, retry_delay_seconds=0)
    def attempt() -> str:
        cfg, run, force, _ = resolve(str(DIGITS), [*TINY, "train.epochs=1"], str(out), False)
        train_model(cfg, run, force)
        trained.append({p.name: p.stat().st_mtime_ns for p in (out / "checkpoints").glob("*.safetensors")})
        if len(trained) == 1:
            raise OSError("worker lost")  # after training: the retry must keep what was trained
        return run

    state = attempt(return_state=True)
    assert state.is_completed(), state.message
    assert state.result() == str(out) and len(trained) == 2
    assert trained[0] and trained[1] == trained[0]  # the same checkpoint files: continued, not retrained


def test_out_placeholders_are_filled(tmp_path: Path) -> None:
    out = resolve_out(str(tmp_path / "nightly-{name}-{now:%Y}"), name="x")
    assert Path(out).is_absolute() and "{" not in out and "nightly-x-" in out
