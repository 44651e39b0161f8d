"""Stage ``train``: data tables -> Lightning training with GradientLogger -> a filled run directory."""

from __future__ import annotations

import logging
import platform

import lightning as L
import pyarrow as pa
import torch

import dvemb
from dvemb.capture.callback import GradientLogger
from dvemb.config import RunConfig
from dvemb.data import TableDataModule, corrupted_table, flip_labels, load_source, load_user_table, write_splits
from dvemb.models.registry import build_model
from dvemb.store.atomic import write_parquet_atomic
from dvemb.store.rundir import RunDir
from dvemb.train.module import Trainee
from dvemb.types import ProjectionConfig

log = logging.getLogger(__name__)


def prepare_data(cfg: RunConfig, run: RunDir) -> dict[str, pa.Table]:
    """Build the train/val/test tables of the run (noise injected, subset applied) into RUN/data/."""
    d = cfg.data
    if d.source == "parquet":
        tables = {"train": load_user_table(d.train_path)}
        for split, p in (("val", d.val_path), ("test", d.test_path)):
            if p:
                tables[split] = load_user_table(p)
        if "val" not in tables:
            raise ValueError("data.val_path: a user Parquet run needs a validation table")
    else:
        tables = load_source(d.source, seed=d.seed, val_fraction=d.val_fraction, block_size=d.block_size)
    dm = TableDataModule(tables["train"], batch_size=d.batch_size, seed=d.seed, subset=d.subset)
    tables["train"] = dm.tables["train"]
    for split in ("val", "test"):
        if split in tables and d.eval_subset:
            tables[split] = TableDataModule(tables[split], subset=d.eval_subset, seed=d.seed).tables["train"]
    if d.label_noise > 0:
        tables["train"], ids = flip_labels(tables["train"], d.label_noise, seed=d.seed, kind=d.label_noise_kind)
        write_parquet_atomic(corrupted_table(ids), run.corrupted)
    write_splits({k: v for k, v in tables.items() if v.num_rows}, run.root / "data")
    return tables


GPT2_VOCAB = 50257


def model_shape(datamodule: TableDataModule) -> dict:
    """d_in / n_out / block_size of the model the data needs (recorded in run.json)."""
    ds = datamodule.datasets["train"]
    if datamodule.kind == "text":
        return {"d_in": 0, "n_out": GPT2_VOCAB, "block_size": int(ds.tokens.shape[1]) - 1}
    return {"d_in": int(ds.x.shape[1]), "n_out": max(10, int(ds.y.max()) + 1), "block_size": None}


def make_datamodule(cfg: RunConfig, run: RunDir) -> TableDataModule:
    dtype = "float64" if cfg.train.precision == "64-true" else "float32"
    val = run.data("val")
    test = run.data("test")
    return TableDataModule(
        run.data("train"),
        val,
        test if test.exists() else None,
        batch_size=cfg.data.batch_size,
        seed=cfg.data.seed,
        dtype=dtype,
    )


def train(cfg: RunConfig, run: RunDir, force: bool = False, progress: bool = True) -> RunDir:
    """Train ``cfg`` into ``run`` (created; never overwritten unless ``force``)."""
    run.create(force=force)
    run.update_meta(
        config=cfg.model_dump(mode="json"),
        status="preparing",
        versions={
            "dvemb": dvemb.__version__,
            "torch": torch.__version__,
            "lightning": L.__version__,
            "python": platform.python_version(),
        },
    )
    prepare_data(cfg, run)
    dm = make_datamodule(cfg, run)
    shape = model_shape(dm)
    run.update_meta(model_shape=shape)
    L.seed_everything(cfg.model.seed, workers=True, verbose=False)
    model = build_model(cfg.model, shape["d_in"], shape["n_out"], shape["block_size"])
    if cfg.train.precision == "64-true":
        model = model.double()
    logger = GradientLogger(
        run,
        ProjectionConfig.of(cfg.capture),
        segments=cfg.embed.segments,
        layers=cfg.capture.layers,
        reduction=cfg.train.reduction,
        curvature=cfg.embed.curvature,
        fisher_samples=cfg.embed.fisher_samples,
    )
    trainer = L.Trainer(
        max_epochs=cfg.train.epochs,
        accelerator="auto",
        devices=1,
        precision=cfg.train.precision,
        accumulate_grad_batches=cfg.train.accumulate,
        callbacks=[logger],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=progress,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        deterministic=True,
        default_root_dir=str(run.root),
    )
    trainer.fit(Trainee(model, cfg.train), datamodule=dm)
    return run
