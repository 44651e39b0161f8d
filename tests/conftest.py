"""Fixtures shared by the test modules."""

from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dvemb.cli import app

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def cli_run() -> Callable[..., Path]:
    """``cli_run(out, sets)``: ``dvemb run configs/digits_mlp.yaml --out OUT --engine local --set ...`` through the
    CLI (exit 0 asserted, with its output); returns OUT."""

    def run(out: Path, sets: list[str], config: str = "digits_mlp.yaml") -> Path:
        args = ["run", ROOT / "configs" / config, "--out", out, "--engine", "local"]
        res = CliRunner().invoke(app, [str(a) for a in args] + [a for s in sets for a in ("--set", s)])
        assert res.exit_code == 0, res.output
        return out

    return run
