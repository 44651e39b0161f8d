"""Executing a curation plan (curation/plan.json) in the next training run.

:class:`PlanSampler` yields the batches of every step as the plan says (uniform / ordered / prior
selection), deterministically from ``(seed, epoch, position)``; for ``online`` steps it yields the
candidate pool and :class:`SelectingTrainee` keeps the ``B`` candidates whose projected gradient
aligns best with the validation gradient at the current parameters (GradientCapture hooks).
Everything chosen is recorded: :func:`selection_table` -> ``trajectory/selection.parquet``
(step, epoch, mode, sample_id, score, selected).

With an empty plan (or ``plan=None``) the batches are exactly those of ``PlannedBatchSampler``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import polars as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from dvemb.capture.hooks import GradientCapture
from dvemb.config import TrainConfig
from dvemb.curate.plan import MODES, SelectionPlan
from dvemb.data.datamodule import TableDataModule, TableDataset, TableLike, _identity
from dvemb.task import Batch, Task
from dvemb.train.module import Trainee
from dvemb.types import ProjectionConfig

_POOL_SALT = 0x9001
SELECTION_SCHEMA = {
    "step": pl.Int64,
    "epoch": pl.Int64,
    "mode": pl.Utf8,
    "sample_id": pl.Int64,
    "score": pl.Float64,
    "selected": pl.Boolean,
}


@dataclass(frozen=True)
class StepPlan:
    """One step: the rows trained on (``rows``) or, for online steps, the candidate ``pool`` and ``k``."""

    step: int
    epoch: int
    mode: str
    rows: np.ndarray | None
    pool: np.ndarray | None = None
    pool_scores: np.ndarray | None = None
    k: int = 0


class PlanSampler(Sampler):
    """Batches of a plan; the batches of epoch ``e`` depend only on ``(seed, e)`` and the plan.

    ``n`` rows, ``batch_size`` B, ``epochs`` of the next run (windows are mapped onto
    ``epochs * ceil(n / B)`` steps). ``prior`` [n] (row-aligned) is needed by ordered / prior
    steps; ``sample_ids`` [n] names rows in the record. A uniform step at position i of epoch e
    takes ``permutation_e[iB:(i+1)B]``, as PlannedBatchSampler does; a selection step draws its
    pool of ``pool_factor * B`` rows (at most n) without replacement from all rows. ``labels`` [n]
    (row-aligned class labels) are needed by a plan with ``stratify`` and prior steps.
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        plan: SelectionPlan | None,
        epochs: int,
        seed: int = 0,
        prior: np.ndarray | None = None,
        sample_ids: np.ndarray | None = None,
        labels: np.ndarray | None = None,
    ) -> None:
        if n < 1:
            raise ValueError("the selection sampler needs at least one training row")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.n, self.batch_size, self.seed, self.epochs = n, batch_size, seed, epochs
        self.plan_ = plan or SelectionPlan(source_total_steps=0)
        self.steps_per_epoch = -(-n // batch_size)
        self.total_steps = epochs * self.steps_per_epoch
        self.modes = self.plan_.step_modes(self.total_steps)
        self.sizes = np.array([min(batch_size, n - i * batch_size) for i in range(self.steps_per_epoch)])
        self.sample_ids = np.arange(n, dtype=np.int64) if sample_ids is None else np.asarray(sample_ids, np.int64)
        needs_prior = {"ordered", "prior"} & self.plan_.uses
        if needs_prior and prior is None:
            raise ValueError(f"plan modes {sorted(needs_prior)} need prior values (curated table column 'prior_value')")
        self.prior = None if prior is None else np.asarray(prior, dtype=np.float64)
        if self.plan_.stratify and "prior" in self.plan_.uses and labels is None:
            raise ValueError("a stratified plan with prior selection needs class labels (training column 'label')")
        self.labels = None if labels is None or not self.plan_.stratify else np.asarray(labels)
        if self.prior is not None:
            self.queue = np.lexsort((self.sample_ids, -self.prior))  # most valuable first, ties by id
            ordered = self.modes == MODES.index("ordered")
            sizes = np.tile(self.sizes, epochs)
            self._offset = np.concatenate([[0], np.cumsum(np.where(ordered, sizes, 0))])
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def mode_of(self, step: int) -> str:
        return MODES[int(self.modes[step])] if 0 <= step < self.total_steps else "uniform"

    def plan(self, epoch: int) -> list[StepPlan]:
        """The steps of ``epoch`` (online steps carry their pool; the selection happens in training)."""
        perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
        out = []
        for i, size in enumerate(self.sizes):
            step = epoch * self.steps_per_epoch + i
            mode = self.mode_of(step)
            size = int(size)
            if mode == "uniform":
                out.append(StepPlan(step, epoch, mode, perm[i * self.batch_size : i * self.batch_size + size]))
            elif mode == "ordered":
                rows = self.queue[(self._offset[step] + np.arange(size)) % self.n]
                out.append(StepPlan(step, epoch, mode, rows))
            else:
                rng = np.random.default_rng([self.seed, epoch, i, _POOL_SALT])
                pool = rng.choice(self.n, size=min(self.n, self.plan_.pool_factor * size), replace=False)
                if mode == "prior":
                    scores = self.prior[pool]
                    labels = None if self.labels is None else self.labels[pool]
                    keep = top_k(scores, self.sample_ids[pool], size, labels)
                    out.append(StepPlan(step, epoch, mode, pool[keep], pool, scores, size))
                else:
                    out.append(StepPlan(step, epoch, mode, None, pool, None, size))
        return out

    def __iter__(self) -> Iterator:
        for p in self.plan(self.epoch):
            if p.mode == "online":
                yield ("online", p.step, p.pool.tolist(), p.k)
            else:
                yield p.rows.tolist()

    def __len__(self) -> int:
        return self.steps_per_epoch

    def record(self, epochs: int | None = None) -> pl.DataFrame:
        """What the sampler chose in the first ``epochs`` epochs (online steps excluded: the trainee records those).

        Uniform / ordered steps: one row per trained sample (score null). Prior steps: every
        candidate with its prior value and ``selected``.
        """
        frames = []
        for e in range(self.epochs if epochs is None else epochs):
            for p in self.plan(e):
                if p.mode == "online":
                    continue
                if p.mode == "prior":
                    ids, scores = p.pool, p.pool_scores
                    sel = np.isin(p.pool, p.rows)
                else:
                    ids, scores, sel = p.rows, np.full(len(p.rows), np.nan), np.ones(len(p.rows), bool)
                frames.append(_record(p.step, p.epoch, p.mode, self.sample_ids[ids], scores, sel))
        return _concat(frames)


def top_k(scores: np.ndarray, ids: np.ndarray, k: int, labels: np.ndarray | None = None) -> np.ndarray:
    """Positions of the ``k`` highest ``scores`` (ties: lower id first), sorted by rank.

    With ``labels`` [n], each label keeps its share of the n candidates: label l gets
    ``floor(k * n_l / n)`` places plus one for the largest remainders (ties: smaller label), filled by
    score within the label.
    """
    rank = np.lexsort((ids, -scores))
    if labels is None:
        return rank[:k]
    classes, counts = np.unique(labels, return_counts=True)
    share = k * counts / len(labels)
    quota = np.floor(share).astype(int)
    quota[np.lexsort((classes, -(share - quota)))[: k - quota.sum()]] += 1
    take = dict(zip(classes.tolist(), quota.tolist(), strict=True))
    keep = []
    for i in rank:
        if take[labels[i].item()] > 0:
            take[labels[i].item()] -= 1
            keep.append(i)
    return np.array(keep, dtype=np.int64)


def _record(step: int, epoch: int, mode: str, ids, scores, selected) -> pl.DataFrame:
    n = len(ids)
    return pl.DataFrame(
        {
            "step": np.full(n, step, dtype=np.int64),
            "epoch": np.full(n, epoch, dtype=np.int64),
            "mode": [mode] * n,
            "sample_id": np.asarray(ids, dtype=np.int64),
            "score": np.asarray(scores, dtype=np.float64),
            "selected": np.asarray(selected, dtype=bool),
        },
        schema=SELECTION_SCHEMA,
    ).with_columns(pl.col("score").fill_nan(None))


def _concat(frames: list[pl.DataFrame]) -> pl.DataFrame:
    return pl.concat(frames) if frames else pl.DataFrame(schema=SELECTION_SCHEMA)


class PlanDataset(Dataset):
    """A TableDataset that also answers an online pool request with ``select_k`` / ``step`` in the batch."""

    def __init__(self, ds: TableDataset) -> None:
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, item):
        if isinstance(item, tuple):
            _, step, rows, k = item
            batch = self.ds.batch(rows)
            batch["select_k"] = torch.tensor(k)
            batch["step"] = torch.tensor(step)
            return batch
        return self.ds[item]


class SelectionDataModule(TableDataModule):
    """TableDataModule whose training batches follow a plan (``plan=None``: ordinary uniform epochs).

    ``prior_column`` of the training table (the curated table's ``prior_value``) feeds the ordered /
    prior modes.
    """

    def __init__(
        self,
        train: TableLike,
        val: TableLike | None = None,
        test: TableLike | None = None,
        *,
        plan: SelectionPlan | None = None,
        epochs: int = 1,
        prior_column: str = "prior_value",
        **kwargs,
    ) -> None:
        super().__init__(train, val, test, **kwargs)
        table = self.tables["train"]
        prior = None
        if prior_column in table.column_names:
            prior = table.column(prior_column).to_numpy().astype(np.float64)
        labels = table.column("label").to_numpy() if "label" in table.column_names else None
        self.plan = plan
        self.train_sampler = PlanSampler(
            len(self.datasets["train"]),
            self.batch_size,
            plan,
            epochs,
            self.seed,
            prior=prior,
            sample_ids=self.sample_ids("train"),
            labels=labels,
        )

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            PlanDataset(self.datasets["train"]),
            sampler=self.train_sampler,
            batch_size=None,
            collate_fn=_identity,
            num_workers=self.num_workers,
        )


class OnlineSelector:
    """Scores a candidate pool by <P grad l_z, P grad l_val(theta_t)> and keeps the top k (ties: lower sample_id);
    with ``stratify`` each label keeps its share of the pool (:func:`top_k`). Losses are the task's
    ``per_sample_loss``; ``val`` is the validation batch dict (with ``sample_id``)."""

    def __init__(
        self,
        task: Task,
        model: nn.Module,
        val: Batch,
        projection: ProjectionConfig = ProjectionConfig(),
        layers: str | list[str] | None = None,
        val_every: int = 1,
        val_chunk: int | None = None,
        stratify: bool = False,
    ) -> None:
        self.task, self.model, self.val, self.val_every = task, model, val, val_every
        self.stratify = stratify
        self.val_chunk = val_chunk  # rows per forward/backward of the validation gradient (None: all at once)
        self.capture = GradientCapture(model, projection, layers)
        self._weights = [m.weight for m in self.capture.tracked.values()]
        self._v: dict[str, torch.Tensor] | None = None
        self._calls = 0
        self.rows: list[pl.DataFrame] = []

    def _grads(self, batch: Batch, scale: float) -> dict[str, torch.Tensor]:
        """Per-sample projected gradients of ``scale * l_z`` (never touches ``.grad``)."""
        n = len(self.task.sample_ids(batch))
        with self.capture.micro_batch(torch.arange(n), weight=scale):
            loss = self.task.per_sample_loss(self.model, batch).sum() * scale
            torch.autograd.grad(loss, self._weights)
        return self.capture.collect(step=-1).grads

    def validation_vector(self) -> dict[str, torch.Tensor]:
        """Projected gradient of the mean validation loss at the current parameters: layer -> [D]."""
        n = len(self.task.sample_ids(self.val))
        step = self.val_chunk or n
        out: dict[str, torch.Tensor] = {}
        for i in range(0, n, step):  # chunks bound the memory of [rows, S, vocab] logits for text
            g = self._grads(rows_of(self.val, slice(i, i + step)), 1.0 / n)
            for k, v in g.items():
                out[k] = v.sum(0) if k not in out else out[k] + v.sum(0)
        return out

    def scores(self, batch: Batch) -> torch.Tensor:
        """[B] float64 alignment of every sample of ``batch`` with the validation gradient."""
        if self._v is None or self._calls % self.val_every == 0:
            self._v = self.validation_vector()
        self._calls += 1
        g = self._grads(batch, 1.0)
        return sum(g[k].to(torch.float64) @ v.to(torch.float64) for k, v in self._v.items())

    def select(self, batch: Batch, step: int, epoch: int) -> Batch:
        """The k best of the pool in ``batch`` (a dict with ``select_k``); records the pool."""
        k = int(batch["select_k"])
        pool = {name: v for name, v in batch.items() if name not in ("select_k", "step")}
        with torch.enable_grad():
            s = self.scores(pool).cpu().numpy()
        ids = self.task.sample_ids(pool).cpu().numpy()
        labels = None
        if self.stratify:
            y = self.task.targets(pool)
            if y.dim() != 1:
                raise ValueError("stratified selection needs one class label per sample (not token targets)")
            labels = y.cpu().numpy()
        keep = top_k(s, ids, k, labels)
        sel = np.zeros(len(ids), dtype=bool)
        sel[keep] = True
        self.rows.append(_record(step, epoch, "online", ids, s, sel))
        return rows_of(pool, torch.as_tensor(keep))

    def record(self) -> pl.DataFrame:
        return _concat(self.rows)

    def remove(self) -> None:
        self.capture.remove()


def rows_of(batch: Batch, rows: slice | torch.Tensor) -> Batch:
    """The sub-batch of ``rows`` (every tensor of the batch dict is indexed along its first dimension)."""
    return {name: v[rows] for name, v in batch.items()}


class SelectingTrainee(Trainee):
    """Trainee that runs online selection on pool batches (those carrying ``select_k``)."""

    def __init__(
        self, model: nn.Module, cfg: TrainConfig, task: Task | None = None, selector: OnlineSelector | None = None
    ):
        super().__init__(model, cfg, task)
        self.selector = selector

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        if "select_k" in batch:
            if self.selector is None:
                raise ValueError("the plan has online selection steps but no OnlineSelector was given")
            batch = self.selector.select(batch, int(batch["step"]), self.current_epoch)
        return super().training_step(batch, batch_idx)


def selection_table(sampler: PlanSampler, selector: OnlineSelector | None = None, epochs: int | None = None):
    """The whole record of a run: sampler choices plus online selections, sorted by step then rank."""
    frames = [sampler.record(epochs)]
    if selector is not None:
        frames.append(selector.record())
    return _concat([f for f in frames if f.height]).sort("step", "selected", "score", descending=[False, True, True])


__all__ = [
    "OnlineSelector",
    "PlanDataset",
    "PlanSampler",
    "SelectingTrainee",
    "SelectionDataModule",
    "StepPlan",
    "rows_of",
    "selection_table",
    "top_k",
]
