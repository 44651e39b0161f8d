"""Flow tests share ONE Prefect test harness (a temporary local API, ~12 s to start) per session."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"

from dvemb.config import RunConfig, load_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
DIGITS = ROOT / "configs" / "digits_mlp.yaml"


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    """A temporary Prefect API for the whole session (request it; the slow UI check does not need it)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield


@pytest.fixture(scope="session")
def digits_config() -> RunConfig:
    return load_config(DIGITS)
