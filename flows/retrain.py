"""Flow ``retrain``: the closed loop — retrain on a published curated dataset version and compare it with
the full table and a random subset of the same size (same budget), seed for seed.

Started by the ``retrain-curated`` deployment's trigger when the nightly curation publishes a version
(event ``dvemb.dataset.published``), or by hand with any version folder. Every (variant, seed) fit is one
task, run one after the other; the comparison becomes a table and a markdown artifact.
"""

from __future__ import annotations

import logging
from pathlib import Path

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from dvemb.config import RunConfig
from dvemb.curate.publish import VARIANTS, comparison_markdown, fit, read_version, source_run
from dvemb.curate.retrain import comparison_rows, write_comparison
from dvemb.pipeline import config_yaml
from flows.common import resolve_out

log = logging.getLogger("dvemb.flows")


@task(name="load-dataset-version", cache_policy=NO_CACHE)
def load(dataset: str) -> tuple[str, dict]:
    """The version folder and its manifest (files checked against their sha256, source tables unchanged)."""
    folder, manifest = read_version(dataset)
    source_run(manifest)
    cfg = RunConfig.model_validate(manifest["source"]["config"])
    log.info(
        "dataset %s %s: %d rows at %s (source run %s); config:\n%s",
        manifest["name"],
        manifest["version"],
        manifest["rows"],
        folder,
        manifest["source"]["run"],
        config_yaml(cfg),
    )
    return str(folder), manifest


@task(name="retrain-variant", task_run_name="retrain-{variant}-seed-{seed}", cache_policy=NO_CACHE)
def retrain_variant(folder: str, manifest: dict, variant: str, seed: int, out: str) -> dict:
    """One fit (``full``, ``curated`` or ``random``) with ``seed``; its metrics row."""
    row = fit(Path(folder), manifest, variant, seed, out)
    log.info(
        "retrain %s seed %d: %d rows, %d steps, val acc %.4f%s",
        variant,
        seed,
        row["n_train"],
        row["steps"],
        row["val_acc"],
        f", test acc {row['test_acc']:.4f}" if "test_acc" in row else "",
    )
    return row


@task(name="compare-variants", cache_policy=NO_CACHE)
def compare(out: str, rows: list[dict], manifest: dict) -> str:
    """<out>/comparison.{parquet,json}, the table and markdown artifacts; returns the parquet path."""
    summary = write_comparison(rows, out)
    create_table_artifact(
        comparison_rows(summary),
        key="dvemb-retrain-comparison",
        description=f"{manifest['name']} {manifest['version']}: curated vs full vs random (same budget), "
        "mean ± sd over seeds on the same validation and test sets",
    )
    create_markdown_artifact(
        comparison_markdown(summary, manifest),
        key="dvemb-retrain-summary",
        description="retraining on the curated version, in words",
    )
    path = Path(out) / "comparison.parquet"
    log.info("comparison -> %s", path)
    return str(path)


@flow(name="retrain")
def retrain(dataset: str, seeds: list[int] = [0, 1, 2], out: str = "") -> str:  # noqa: B006 (form default)
    """Retrain on a published curated dataset version: curated vs full vs random (same budget).

    Args:
        dataset: a published version folder (datasets/<name>/vNNNN) or its manifest.json. The
            retrain-curated deployment's trigger passes the version the nightly curation just published.
        seeds: one fit per variant and seed (model init and batch order); the same seeds for every variant.
        out: folder for the fits and the comparison. Empty: <datasets>/<name>/retrain/<version>-<time>.
    """
    folder, manifest = load(dataset)
    if not out:
        out = str(Path(folder).parent / "retrain" / f"{manifest['version']}-{{now:%Y%m%d-%H%M%S}}")
    out = resolve_out(out)
    rows = [retrain_variant(folder, manifest, v, s, out) for s in seeds for v in VARIANTS]
    return compare(out, rows, manifest)
