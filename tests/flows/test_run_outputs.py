"""What the scheduled curation run left in its run directory and report: every stage's files, a score for
every recorded occurrence, and an influence plot that batch size cannot spike."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
from conftest import ClosedLoop

from dvemb.report import influence_by_step, plot_path, top_samples
from dvemb.store.rundir import RunDir


def test_run_directory_holds_every_stage_output(closed_loop: ClosedLoop) -> None:
    run = RunDir(closed_loop.run_dir)
    for stage in ("train", "embed", "score", "curate"):
        run.require(stage)
    k = len(run.boundaries) - 1
    assert k == run.meta()["config"]["embed"]["segments"] == 2
    expected = [
        "run.json",
        "data/train.parquet",
        "data/val.parquet",
        "trajectory/steps.parquet",
        "trajectory/batches.parquet",
        "grads/projection.json",
        *[f"checkpoints/step-{b:06d}.safetensors" for b in run.boundaries],
        *[f"embeddings/seg-{j:04d}-propagator.safetensors" for j in range(k)],
        "scores/occurrences.parquet",
        "scores/samples.parquet",
        "curation/curated.parquet",
        "curation/plan.json",
        "report.md",
        "plots/influence_by_step.png",
    ]
    assert not [p for p in expected if not (run.root / p).is_file()]
    assert plot_path(run).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads(run.plan.read_text())["n_kept"] == pl.read_parquet(run.curated).height
    assert not list(run.root.rglob(".*.tmp-*")), "a temporary file was left behind"


def test_every_recorded_occurrence_has_a_final_score(closed_loop: ClosedLoop) -> None:
    run = RunDir(closed_loop.run_dir)
    batches = pl.read_parquet(run.batches).select("step", "sample_id")
    occ = pl.read_parquet(run.occurrences)
    final = occ.filter(pl.col("checkpoint") == run.boundaries[-1]).select("step", "sample_id", "score")
    joined = batches.join(final, on=["step", "sample_id"], how="left")
    assert final.height == batches.height == joined.height
    assert joined["score"].null_count() == 0 and joined["score"].is_finite().all()


def test_influence_plot_is_per_unit_weight(closed_loop: ClosedLoop) -> None:
    """300 rows in batches of 32: each epoch ends with a batch of 12 (weight 1/12, not 1/32). The old curve,
    the mean score per step, is mean(score) = weight x mean(score / weight): 32/12 = 2.7x taller on those
    steps for the same per-sample influence. The plotted curve is mean(score / weight), recomputed here."""
    run = RunDir(closed_loop.run_dir)
    per_step = influence_by_step(run)
    occ = pl.read_parquet(run.occurrences)
    occ = occ.filter(pl.col("checkpoint") == occ["checkpoint"].max())
    batches = pl.read_parquet(run.batches)
    steps = pl.read_parquet(run.steps)
    for row in per_step.to_dicts():
        s = occ.filter(pl.col("step") == row["step"]).sort("sample_id")
        w = batches.filter(pl.col("step") == row["step"]).sort("sample_id")
        assert s["sample_id"].to_list() == w["sample_id"].to_list()
        lr = steps.filter(pl.col("step") == row["step"])["lr"].item()
        score, weight = s["score"].to_numpy(), w["weight"].to_numpy()
        np.testing.assert_allclose(row["per_weight"], np.mean(score / weight), rtol=1e-12)
        np.testing.assert_allclose(row["per_lr"], np.mean(np.abs(score) / (weight * lr)), rtol=1e-12)
        np.testing.assert_allclose(row["mean_score"], row["batch_weight"] * row["per_weight"], rtol=1e-9)
    short = per_step.filter(pl.col("n") < 32)
    assert short.height == 2 and (short["batch_weight"] - 1 / 12).abs().max() < 1e-12


def test_top_samples_table(closed_loop: ClosedLoop) -> None:
    rows = top_samples(RunDir(closed_loop.run_dir))
    assert [r["group"] for r in rows] == ["most valuable"] * 10 + ["most harmful"] * 10
    values = [float(r["value"]) for r in rows]
    assert values[:10] == sorted(values[:10], reverse=True) and values[10:] == sorted(values[10:])
