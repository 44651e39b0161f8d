"""Closed loop: retrain on the curated data with the plan and compare with the baseline.

Every variant trains the same model config from the same seeds and is evaluated on the same
validation and test tables of the source run (test labels are never corrupted). A variant is a
training table plus an optional :class:`~dvemb.curate.plan.SelectionPlan`. Each fit leaves
``<out>/<variant>/seed-<s>/metrics.json`` and ``trajectory/selection.parquet`` (what it trained on).
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from dvemb.config import RunConfig
from dvemb.curate.plan import SelectionPlan
from dvemb.curate.run import read_plan
from dvemb.curate.selection import OnlineSelector, SelectingTrainee, SelectionDataModule, selection_table
from dvemb.data.datamodule import TableDataset
from dvemb.runtask import data_info, task_of
from dvemb.store.atomic import atomic_path, write_json
from dvemb.store.rundir import RunDir
from dvemb.task import Task
from dvemb.types import ProjectionConfig

log = logging.getLogger(__name__)
METRICS = ("test_acc", "test_loss", "val_acc", "val_loss")
TEXT_EVAL_BATCH = 32


@dataclass
class Variant:
    """A training table (Parquet path or Arrow table) and the plan its batches follow (None = uniform)."""

    name: str
    train: str | Path | pa.Table
    plan: SelectionPlan | None = None


def evaluate(
    task: Task, model: torch.nn.Module, table: str | Path | pa.Table, batch_size: int = 2048
) -> dict[str, float]:
    """Mean per-sample loss (the task's) and accuracy of ``model`` on a features or text table.

    Text: a sample's loss is its token-mean loss and its accuracy the fraction of next tokens predicted;
    batches are capped at ``TEXT_EVAL_BATCH`` rows (the logits are [B, S, vocab]). Accuracy is NaN for a
    task whose loss is not a cross-entropy of its logits.
    """
    ds = TableDataset(table if isinstance(table, pa.Table) else pq.read_table(table), next(model.parameters()).dtype)
    if ds.kind == "text":
        batch_size = min(batch_size, TEXT_EVAL_BATCH)
    model.eval()
    loss, correct = 0.0, 0.0
    with torch.no_grad():
        for i in range(0, len(ds), batch_size):
            b = ds.batch(np.arange(i, min(len(ds), i + batch_size)))
            loss += float(task.per_sample_loss(model, b).sum())
            acc = task.per_sample_accuracy(model, b)
            correct += float("nan") if acc is None else float(acc.sum())
    return {"loss": loss / max(1, len(ds)), "acc": correct / max(1, len(ds))}


def fit_variant(
    source: RunDir,
    cfg: RunConfig,
    variant: Variant,
    seed: int,
    out: str | Path | None = None,
    *,
    select_val: str | Path | pa.Table | None = None,
    eval_tables: dict[str, str | Path | pa.Table] | None = None,
) -> dict[str, float | int | str]:
    """Train ``variant`` with ``seed`` (model init and batch order); metrics on the source run's val/test.

    The source run's task builds the model and gives the per-sample loss (text: token mean).
    ``select_val``: the table online selection aligns with (default: the source run's validation
    table). ``eval_tables``: split name -> table to report ``<split>_loss`` / ``<split>_acc`` on
    (default: the source run's val and, when present, test).
    """
    start = time.perf_counter()
    task = task_of(source, cfg)
    dtype = torch.float64 if cfg.train.precision == "64-true" else torch.float32
    dm = SelectionDataModule(
        variant.train,
        plan=variant.plan,
        epochs=cfg.train.epochs,
        batch_size=cfg.data.batch_size,
        seed=seed,
        dtype=dtype,
    )
    L.seed_everything(seed, workers=True, verbose=False)
    model = task.build_model(data_info(source)).to(dtype)
    selector = None
    if variant.plan is not None and "online" in variant.plan.uses:
        val = select_val if select_val is not None else source.data("val")
        val = val if isinstance(val, pa.Table) else pq.read_table(val)
        rows = np.sort(np.random.default_rng([seed, 0x7A1]).permutation(val.num_rows)[: variant.plan.val_samples])
        vds = TableDataset(val.take(pa.array(rows)), dtype)
        c = cfg.capture
        selector = OnlineSelector(
            task,
            model,
            vds.batch(np.arange(len(rows))),
            ProjectionConfig.of(c),
            c.layers,
            variant.plan.val_every,
            val_chunk=TEXT_EVAL_BATCH if vds.kind == "text" else None,
            stratify=variant.plan.stratify,
        )
    trainer = L.Trainer(
        max_epochs=cfg.train.epochs,
        accelerator="cpu",
        devices=1,
        precision=cfg.train.precision,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        deterministic=True,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        warnings.filterwarnings("ignore", ".*bottleneck.*")
        trainer.fit(SelectingTrainee(model, cfg.train, task, selector), datamodule=dm)
    if selector is not None:
        selector.remove()
    metrics: dict[str, float | int | str] = {"variant": variant.name, "seed": seed}
    if eval_tables is None:
        eval_tables = {s: source.data(s) for s in ("val", "test") if source.data(s).exists()}
    for split, table in eval_tables.items():
        m = evaluate(task, model, table)
        metrics[f"{split}_loss"], metrics[f"{split}_acc"] = m["loss"], m["acc"]
    sampler = dm.train_sampler
    modes = [sampler.mode_of(t) for t in range(sampler.total_steps)]
    metrics.update(
        n_train=len(dm.datasets["train"]),
        steps=sampler.total_steps,
        selection_steps=sum(m in ("prior", "online") for m in modes),
        ordered_steps=modes.count("ordered"),
        seconds=time.perf_counter() - start,
    )
    if out is not None:
        out = Path(out)
        with atomic_path(out / "trajectory" / "selection.parquet") as tmp:
            selection_table(sampler, selector).write_parquet(tmp)
        write_json(out / "metrics.json", metrics)
    return metrics


def summarize(rows: list[dict]) -> pl.DataFrame:
    """Mean and standard deviation (ddof 1) of every metric per variant, in first-seen variant order."""
    df = pl.DataFrame(rows)
    metrics = [m for m in METRICS if m in df.columns]
    metrics += [c for c in df.columns if c.endswith(("_loss", "_acc")) and c not in metrics]
    order = list(dict.fromkeys(df["variant"].to_list()))
    agg = df.group_by("variant").agg(
        pl.len().alias("seeds"),
        pl.col("n_train").first(),
        pl.col("selection_steps").first(),
        *[pl.col(m).mean().alias(f"{m}_mean") for m in metrics],
        *[pl.col(m).std().fill_null(0.0).alias(f"{m}_sd") for m in metrics],
    )
    return (
        agg.with_columns(pl.col("variant").replace_strict(order, list(range(len(order)))).alias("_o"))
        .sort("_o")
        .drop("_o")
    )


def retrain(run: RunDir, cfg: RunConfig, seeds: list[int] | tuple[int, ...] = (0, 1, 2), out: str | Path | None = None):
    """Baseline (the run's training table, uniform batches) vs curated (curated.parquet + plan.json).

    Writes ``<out>/comparison.parquet`` and ``comparison.json`` (default out: RUN/retrain) and
    returns the summary table (one row per variant: mean and sd over ``seeds``).
    """
    run.require("curate")
    out = Path(out) if out is not None else run.root / "retrain"
    variants = [Variant("baseline", run.data("train")), Variant("curated", run.curated, read_plan(run.plan))]
    rows = [fit_variant(run, cfg, v, s, out / v.name / f"seed-{s}") for v in variants for s in seeds]
    return write_comparison(rows, out)


def write_comparison(rows: list[dict], out: str | Path) -> pl.DataFrame:
    out = Path(out)
    summary = summarize(rows)
    with atomic_path(out / "comparison.parquet") as tmp:
        summary.write_parquet(tmp)
    write_json(out / "comparison.json", {"runs": rows, "summary": summary.to_dicts()})
    return summary


def comparison_rows(summary: pl.DataFrame) -> list[dict[str, str]]:
    """Rows for a table artifact / Markdown table: mean ± sd, formatted."""
    rows = []
    for r in summary.to_dicts():
        row = {"variant": r["variant"], "train rows": str(r["n_train"]), "seeds": str(r["seeds"])}
        for m in METRICS:
            if f"{m}_mean" in r:
                row[m.replace("_", " ")] = f"{r[f'{m}_mean']:.4f} ± {r[f'{m}_sd']:.4f}"
        rows.append(row)
    return rows
