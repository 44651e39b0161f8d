"""Stage ``train``: the task's data -> Lightning training with GradientLogger -> a filled run directory.

Everything that can be refused is checked before the run directory is touched: the task resolves
and builds its model, the tables pass validation (labels / token ids inside ``n_classes``), and a dry
forward pass on the first training batch gives a finite per-sample loss [B] with unique sample ids.
``resume=True`` continues an interrupted run from its last boundary checkpoint (dvemb.train.resume).

``train.devices: N`` with ``train.strategy: ddp`` trains on N processes with Lightning's DDP, started
from a fork server (each rank imports dvemb once per session; nothing re-runs the caller's script).
``data.batch_size`` is per rank, so a step's global batch has ``data.batch_size * N`` samples, the same
as a one-process run with that batch size (docs/SCALE.md). Resuming a multi-rank run starts it over.
"""

from __future__ import annotations

import logging
import multiprocessing
import platform
import signal
from dataclasses import dataclass, replace

import lightning as L
import numpy as np
import pyarrow as pa
import torch
from lightning.pytorch.strategies import DDPStrategy
from torch import nn
from torch.multiprocessing.spawn import ProcessException

import dvemb
from dvemb.capture.callback import GradientLogger
from dvemb.checks import check_loss_trajectory, check_tables, table_files
from dvemb.config import ConfigError, RunConfig
from dvemb.data import TableDataModule, corrupted_table, flip_labels, load_source, load_user_table, write_splits
from dvemb.data.hf import load_hf
from dvemb.data.tables import (
    GPT2_VOCAB,
    SOURCE_CLASSES,
    check_classes,
    table_features,
    token_lengths,
    validate_table,
)
from dvemb.errors import DvembError
from dvemb.store.atomic import write_parquet_atomic
from dvemb.store.rundir import RunDir, load_tensors
from dvemb.task import DataInfo, Task, TaskError, check_batch, load_task
from dvemb.train.module import Trainee
from dvemb.train.resume import ResumePoint, plan_resume, this_process
from dvemb.train.resumer import Resumer
from dvemb.types import ProjectionConfig

log = logging.getLogger(__name__)


class RankFailedError(DvembError):
    """A rank of a multi-rank training died or failed; the message names it (run.json: status failed)."""


@dataclass
class Prepared:
    """The run's tables as trained on (noise injected, subsets applied), what the model must fit, and the
    sample ids whose labels were flipped on purpose (None without label noise)."""

    tables: dict[str, pa.Table]
    info: DataInfo
    corrupted: np.ndarray | None = None


def source_tables(cfg: RunConfig, task: Task) -> tuple[dict[str, pa.Table], int | None]:
    """train / val [/ test] tables: the task's own (validated), a user Parquet / HF dataset, or a built-in
    source; and the source's number of classes (vocabulary for text) where it knows it."""
    d = cfg.data
    own = task.tables(cfg)
    if own is not None:
        if not isinstance(own, dict) or "train" not in own:
            raise TaskError(f"task {task.name!r}: tables(cfg) must return a dict with 'train' and 'val' tables")
        tables = {k: validate_table(t, f"task {task.name!r}: tables(cfg)[{k!r}]") for k, t in own.items()}
        where = f"task {task.name!r}: tables(cfg)"
    elif d.source in ("parquet", "hf"):
        load = load_user_table if d.source == "parquet" else lambda p: load_hf(p)["train"]
        tables = load_hf(d.train_path) if d.source == "hf" else {"train": load_user_table(d.train_path)}
        for split, p in (("val", d.val_path), ("test", d.test_path)):
            if p:
                tables[split] = load(p)
        where = "data.val_path"
    else:
        tables = load_source(d.source, seed=d.seed, val_fraction=d.val_fraction, block_size=d.block_size)
        return tables, SOURCE_CLASSES[d.source]
    if "val" not in tables:
        raise ConfigError(f"{where}: a run needs a validation table (val)")
    return tables, None


def data_info(table: pa.Table, n_out: int) -> DataInfo:
    """What a model of ``table``'s kind must fit (``n_out``: classes or vocabulary; 0 = not known)."""
    if "tokens" in table.column_names:
        return DataInfo("text", 0, n_out, int(token_lengths(table).max()) - 1)
    return DataInfo("features", int(table_features(table).shape[1]), n_out)


def prepare_data(cfg: RunConfig, task: Task) -> Prepared:
    """The run's tables in memory: validated, subsets applied, classes checked, label noise injected."""
    d = cfg.data
    tables, source_classes = source_tables(cfg, task)
    tables["train"] = TableDataModule(tables["train"], batch_size=d.batch_size, seed=d.seed, subset=d.subset).tables[
        "train"
    ]
    for split in ("val", "test"):
        if split in tables and d.eval_subset:
            tables[split] = TableDataModule(tables[split], subset=d.eval_subset, seed=d.seed).tables["train"]
    check_tables(tables, table_files(d))
    info = data_info(tables["train"], d.n_classes or source_classes or 0)
    if info.kind == "text" and not info.n_out:
        info = replace(info, n_out=GPT2_VOCAB)  # token tables are GPT-2 ids unless data.n_classes says otherwise
    n = task.n_classes(info)
    if not n:
        raise ConfigError(
            f"data.n_classes: the number of {'classes' if info.kind == 'features' else 'tokens in the vocabulary'} "
            f"of this {info.kind} table is not known; set data.n_classes (or override n_classes in task {task.name!r})"
        )
    info = replace(info, n_out=int(n))
    for split, t in tables.items():
        check_classes(t, info.n_out, f"{split} table")
    corrupted = None
    if d.label_noise > 0:
        tables["train"], corrupted = flip_labels(
            tables["train"], d.label_noise, seed=d.seed, num_classes=info.n_out, kind=d.label_noise_kind
        )
    return Prepared({k: v for k, v in tables.items() if v.num_rows}, info, corrupted)


def write_data(prepared: Prepared, run: RunDir) -> None:
    """RUN/data/<split>.parquet (and corrupted.parquet with label noise)."""
    if prepared.corrupted is not None:
        write_parquet_atomic(corrupted_table(prepared.corrupted), run.corrupted)
    write_splits(prepared.tables, run.root / "data")


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
        world_size=cfg.train.world_size,
    )


def strategy(cfg: RunConfig) -> str | DDPStrategy:
    """Lightning's strategy: DDP for several ranks, started from a fork server (fast: dvemb is imported
    there once; never ``fork`` itself, unsafe once polars or CUDA run; never the subprocess launcher, which
    re-runs the calling script — a CLI or a Prefect flow)."""
    if cfg.train.world_size == 1:
        return "auto"
    multiprocessing.set_forkserver_preload(["dvemb.train.run"])
    return DDPStrategy(start_method="forkserver")


def check_devices(cfg: RunConfig) -> None:
    """ConfigError, before anything is written, when the training's GPUs are not all here."""
    t = cfg.train
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0  # no CUDA context: ranks can still start
    if (t.accelerator == "gpu" or (t.accelerator == "auto" and gpus)) and gpus < t.world_size:
        raise ConfigError(
            f"train.devices={t.devices} (accelerator {t.accelerator}): this machine has {gpus} CUDA device(s); "
            "use fewer devices, or train.accelerator=cpu for CPU processes"
        )


def build_model(cfg: RunConfig, task: Task, info: DataInfo) -> nn.Module:
    """The task's freshly initialised model (seeded with ``task.init_seed()``), in the training precision."""
    L.seed_everything(task.init_seed(), workers=True, verbose=False)
    try:
        model = task.build_model(info)
    except TaskError:
        raise
    except Exception as e:  # noqa: BLE001 - user code: name the method that failed
        raise TaskError(f"task {task.name!r}: build_model(info) failed ({type(e).__name__}: {e}) for {info}") from e
    if not isinstance(model, nn.Module):
        raise TaskError(f"task {task.name!r}: build_model(info) must return a torch.nn.Module, got {type(model)}")
    return model.double() if cfg.train.precision == "64-true" else model.float()  # whatever torch's default dtype


def preflight(cfg: RunConfig, task: Task, model: nn.Module, prepared: Prepared) -> None:
    """Forward only, on the first training batch: what the task gives is checked before anything is written."""
    dtype = torch.float64 if cfg.train.precision == "64-true" else torch.float32
    dm = TableDataModule(prepared.tables["train"], batch_size=cfg.data.batch_size, seed=cfg.data.seed, dtype=dtype)
    batch = dm.datasets["train"].batch(dm.train_sampler.plan(0)[0])
    was_training = model.training
    with torch.random.fork_rng(devices=[]):  # the training run draws the same random numbers as without it
        model.eval()  # no dropout, no batch-norm statistics updated
        try:
            check_batch(task, model, batch)
        finally:
            model.train(was_training)


def _versions() -> dict[str, str]:
    return {
        "dvemb": dvemb.__version__,
        "torch": torch.__version__,
        "lightning": L.__version__,
        "python": platform.python_version(),
    }


def _start(cfg: RunConfig, task: Task, run: RunDir, force: bool) -> nn.Module:
    """A new run: data prepared and checked, the run directory made, run.json and the data written."""
    prepared = prepare_data(cfg, task)
    model = build_model(cfg, task, prepared.info)
    preflight(cfg, task, model, prepared)
    run.create(force=force)
    run.update_meta(
        config=cfg.model_dump(mode="json"),
        status="preparing",
        process=this_process(),
        versions=_versions(),
        model_shape=prepared.info.as_dict(),
    )
    write_data(prepared, run)
    return model


def _continue(cfg: RunConfig, task: Task, run: RunDir, point: ResumePoint) -> nn.Module:
    """A resumed run: the model rebuilt as recorded, with the weights of the boundary it continues from."""
    meta = run.meta()
    model = build_model(cfg, task, DataInfo.from_dict(meta["model_shape"]))
    model.load_state_dict(load_tensors(run.checkpoint(point.step)))
    was, now = meta.get("versions", {}), _versions()
    changed = {k: f"{was.get(k)} -> {v}" for k, v in now.items() if k != "dvemb" and was.get(k) != v}
    if changed:
        log.warning("resuming %s with other versions (%s): the result may differ in the last bits", run.root, changed)
    resumed = [*meta.get("resumed_from", []), point.step]
    run.update_meta(
        status="training", process=this_process(), resumed_from=resumed, remove_keys=("error", "failed_at_step")
    )
    log.info("resuming %s at step %d (epoch %d, batch %d)", run.root, point.step, point.state.epoch, point.state.batch)
    return model


def train(cfg: RunConfig, run: RunDir, force: bool = False, progress: bool = True, resume: bool = False) -> RunDir:
    """Train ``cfg`` into ``run`` (created; never overwritten unless ``force``).

    resume: continue ``run``'s own interrupted training (same config) from its last boundary checkpoint;
    a finished training is kept as it is; a run that never reached a boundary after step 0 (or no run
    at all) is started (over)."""
    task = load_task(cfg)
    check_devices(cfg)
    point = plan_resume(run, cfg) if resume else None  # a multi-rank run keeps no resume state: None unless done
    if point is not None and point.done:
        log.info("%s: training is complete; kept", run.root)
        check_loss_trajectory(run)
        return run
    if point is None:
        model = _start(cfg, task, run, force=force or (resume and run.run_json.exists()))
    else:
        model = _continue(cfg, task, run, point)
    dm = make_datamodule(cfg, run)
    if point is not None:
        dm.train_sampler.resume_at(point.state.epoch, point.state.batch)
    logger = GradientLogger(
        run,
        ProjectionConfig.of(cfg.capture),
        segments=cfg.embed.segments,
        layers=cfg.capture.layers,
        reduction=cfg.train.reduction,
        curvature=cfg.embed.curvature,
        fisher_samples=cfg.embed.fisher_samples,
        resume_step=point.step if point is not None else None,
    )
    trainer = L.Trainer(
        max_epochs=cfg.train.epochs,
        accelerator=cfg.train.accelerator,
        devices=cfg.train.world_size,
        strategy=strategy(cfg),
        use_distributed_sampler=False,  # the planned sampler gives each rank its slice of the global batch
        precision=cfg.train.precision,
        accumulate_grad_batches=cfg.train.accumulate,
        callbacks=[Resumer(run, logger, point.state if point is not None else None), logger],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=progress,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        deterministic=True,
        default_root_dir=str(run.root),
    )
    sigint = signal.getsignal(signal.SIGINT)
    try:
        trainer.fit(Trainee(model, cfg.train, task), datamodule=dm)
    except SystemExit:  # Lightning ends a Ctrl-C with exit(1) (SIGINT ignored), after run.json said 'cancelled'
        signal.signal(signal.SIGINT, sigint)
        raise KeyboardInterrupt from None
    except ProcessException as e:  # a rank died: GradientLogger.on_exception has said which in run.json
        raise RankFailedError(f"{run.root}: {run.meta().get('error') or e}") from None
    check_loss_trajectory(run)
    return run
