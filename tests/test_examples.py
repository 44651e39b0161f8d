"""The user-side examples run end to end: a user-written task file through ``dvemb run`` (local engine)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from typer.testing import CliRunner

from dvemb.cli import app

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def at_root(monkeypatch):
    """Tasks named ``examples.<file>:<Class>`` import from the working directory, as a user runs them."""
    monkeypatch.chdir(ROOT)


def run_cli(config: str, out: Path, *sets: str) -> None:
    args = ["run", config, "--out", str(out), "--engine", "local"]
    for s in sets:
        args += ["--set", s]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output


def assert_every_occurrence_scored(run: Path) -> pl.DataFrame:
    """Each (step, sample_id) trained on has one finite score at the final checkpoint; returns the scores."""
    batches = pl.read_parquet(run / "trajectory" / "batches.parquet").select("step", "sample_id")
    occ = pl.read_parquet(run / "scores" / "occurrences.parquet")
    final = occ.filter(pl.col("checkpoint") == occ["checkpoint"].max())
    assert final.height == batches.height > 0
    assert final.join(batches, on=["step", "sample_id"], how="anti").height == 0
    assert batches.join(final, on=["step", "sample_id"], how="anti").height == 0
    assert np.isfinite(final["score"].to_numpy()).all() and final["score"].abs().max() > 0
    assert (run / "report.md").is_file()
    return final


def test_digits_cnn_user_task_runs_end_to_end(tmp_path, at_root):
    """examples/digits_cnn.py (Conv2d + Linear): both convolutions captured, every occurrence scored."""
    run = tmp_path / "cnn"
    run_cli("configs/digits_cnn.yaml", run, "data.subset=128", "train.epochs=2", "embed.segments=2")
    meta = json.loads((run / "run.json").read_text())
    assert meta["config"]["task"] == "examples.digits_cnn:DigitsCNN"
    layers = json.loads((run / "grads" / "projection.json").read_text())["layers"]
    assert {n: s["layer"] for n, s in layers.items()} == {"1": "conv2d", "3": "conv2d", "6": "linear"}
    assert layers["1"]["d_in"] == 1 * 3 * 3 + 1 and layers["3"]["d_in"] == 8 * 3 * 3 + 1
    final = assert_every_occurrence_scored(run)
    assert final["step"].n_unique() == 2 * 4  # 128 rows / 32 per batch, 2 epochs
