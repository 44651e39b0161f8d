"""Lightning DataModule over dvemb tables with a deterministic, recorded batch order.

Batches are dicts:
    * features: ``{"sample_id": LongTensor[B], "x": FloatTensor[B, d], "y": LongTensor[B]}``
    * text: ``{"sample_id": LongTensor[B], "x": LongTensor[B, S], "y": LongTensor[B, S]}``
      (``x = tokens[:, :-1]``, ``y = tokens[:, 1:]``)
    * variable-length text: as text, right-padded to the batch's longest row (S = its length - 1),
      plus ``"mask": BoolTensor[B, S]`` (True = a real target); padding has ``x`` = 0 and ``y`` = -100

The training order of epoch ``e`` depends only on ``(seed, e)`` and is available in advance
(``PlannedBatchSampler.plan`` / ``TableDataModule.planned_order``), so training can record it.
With ``world_size`` W > 1 (DDP) the plan holds the *global* batches (``batch_size`` x W rows) and rank
``r`` trains on the r-th slice of each (``PlannedBatchSampler.local``); Lightning's DistributedSampler
must stay off (``use_distributed_sampler=False``), since it would deal and reshuffle the batches.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import lightning as L
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from dvemb.data.tables import (
    IGNORE_INDEX,
    is_ragged,
    table_features,
    table_ids,
    table_kind,
    table_labels,
    table_token_lists,
    table_tokens,
)

TableLike = pa.Table | str | os.PathLike[str]
_SUBSET_SALT = 0x5B5E7  # keeps the subset draw independent of the epoch shuffles


class PlannedBatchSampler(Sampler[list[int]]):
    """Yields lists of row indices; the order of epoch ``e`` is a pure function of ``(seed, e)``.

    Use it as a DataLoader ``sampler`` with ``batch_size=None`` (so Lightning calls its
    ``set_epoch`` before each epoch; Lightning does not call it on a ``batch_sampler``).
    ``len`` is the number of batches per epoch. :meth:`resume_at` makes the iteration of one epoch
    start at a later batch of its plan (a resumed run); ``len`` stays the full epoch.

    world_size W > 1 (DDP ranks): ``batch_size`` is per rank, the plan's batches are global (``batch_size * W``
    rows, the same as a one-process plan of that batch size) and rank ``rank`` iterates the ``rank``-th of
    W near-equal slices of each (``np.array_split``: a short last batch gives the first ranks one row more).
    A last batch with fewer rows than ranks is dropped (every rank needs a sample).
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = False,
        world_size: int = 1,
        rank: int = 0,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.shuffle, self.drop_last = shuffle, drop_last
        self.world_size, self.rank = world_size, rank
        self.epoch = 0
        self.start: tuple[int, int] | None = None  # (epoch, batch): where a resumed run continues

    def resume_at(self, epoch: int, batch: int) -> None:
        """Iterating ``epoch`` skips its first ``batch`` batches (done before the run was interrupted);
        every other epoch is iterated whole. The plans themselves are unchanged."""
        if not 0 <= batch < len(self):
            raise ValueError(f"resume batch {batch} is outside epoch {epoch}'s {len(self)} batches")
        self.start = (epoch, batch)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose plan ``__iter__`` yields."""
        self.epoch = epoch

    @property
    def global_batch_size(self) -> int:
        """Rows of a full batch of the plan: ``batch_size`` x ``world_size``."""
        return self.batch_size * self.world_size

    def plan(self, epoch: int) -> list[np.ndarray]:
        """Row indices (int64) of each (global) batch of ``epoch``, in order."""
        order = np.random.default_rng([self.seed, epoch]).permutation(self.n) if self.shuffle else np.arange(self.n)
        g = self.global_batch_size
        return [order[i * g : (i + 1) * g].astype(np.int64) for i in range(len(self))]

    def local(self, batch: np.ndarray) -> np.ndarray:
        """This rank's slice of a global batch of the plan (the whole batch for one process)."""
        return batch if self.world_size == 1 else np.array_split(batch, self.world_size)[self.rank]

    def __iter__(self) -> Iterator[list[int]]:
        skip = self.start[1] if self.start is not None and self.start[0] == self.epoch else 0
        for batch in self.plan(self.epoch)[skip:]:
            yield self.local(batch).tolist()

    def __len__(self) -> int:
        full, rest = divmod(self.n, self.global_batch_size)
        return full + int(not self.drop_last and rest >= self.world_size)


class TableDataset(Dataset):
    """In-memory tensors of one table; indexing with a list of rows returns a whole batch dict."""

    def __init__(self, table: pa.Table, dtype: torch.dtype = torch.float32) -> None:
        self.kind = table_kind(table)
        self.sample_id = torch.from_numpy(table_ids(table).copy())
        self.ragged = is_ragged(table)
        if self.ragged:
            values, offsets = table_token_lists(table)
            self.values, self.offsets = torch.from_numpy(values.astype(np.int64)), offsets
        elif self.kind == "text":
            self.tokens = torch.from_numpy(table_tokens(table).astype(np.int64))
        else:
            x = table_features(table)
            self.x = torch.from_numpy(x if x.flags.writeable else x.copy()).to(dtype)
            self.y = torch.from_numpy(table_labels(table).copy())

    def __len__(self) -> int:
        return len(self.sample_id)

    @property
    def block_size(self) -> int | None:
        """Longest input sequence (text: longest row - 1), None for features."""
        if self.kind != "text":
            return None
        return int(np.diff(self.offsets).max()) - 1 if self.ragged else int(self.tokens.shape[1]) - 1

    def _padded(self, rows: np.ndarray) -> dict[str, torch.Tensor]:
        starts, lengths = self.offsets[rows], np.diff(self.offsets)[rows]
        s = int(lengths.max()) - 1
        pos = np.arange(s + 1)
        real = pos[None, :] < lengths[:, None]  # [B, S + 1]
        tok = torch.zeros(len(rows), s + 1, dtype=torch.int64)
        tok[torch.from_numpy(real)] = self.values[torch.from_numpy((starts[:, None] + pos[None, :])[real])]
        mask = torch.from_numpy(real[:, 1:].copy())
        y = tok[:, 1:].masked_fill(~mask, IGNORE_INDEX)
        return {"x": tok[:, :-1], "y": y, "mask": mask}

    def batch(self, rows: Sequence[int] | np.ndarray) -> dict[str, torch.Tensor]:
        """The batch dict for table rows ``rows``."""
        idx = torch.as_tensor(np.asarray(rows, dtype=np.int64))
        if self.ragged:
            return {"sample_id": self.sample_id[idx], **self._padded(np.asarray(rows, dtype=np.int64))}
        if self.kind == "text":
            t = self.tokens[idx]
            return {"sample_id": self.sample_id[idx], "x": t[:, :-1], "y": t[:, 1:]}
        return {"sample_id": self.sample_id[idx], "x": self.x[idx], "y": self.y[idx]}

    def __getitem__(self, rows: int | Sequence[int] | np.ndarray) -> dict[str, torch.Tensor]:
        """A batch dict for a list of rows (what the DataLoader passes); one sample for an int."""
        if isinstance(rows, (int, np.integer)):
            return {k: v[0] for k, v in self.batch([int(rows)]).items()}
        return self.batch(rows)


def _identity(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return batch


def _read(table: TableLike) -> pa.Table:
    return table if isinstance(table, pa.Table) else pq.read_table(Path(table))


def _subset(table: pa.Table, n: int | None, seed: int) -> pa.Table:
    """First ``n`` rows of a seeded shuffle, kept in table order (``None`` or n >= N: all)."""
    if n is None or n >= table.num_rows:
        return table
    rows = np.sort(np.random.default_rng([seed, _SUBSET_SALT]).permutation(table.num_rows)[:n])
    return table.take(pa.array(rows))


def _as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {"float32": torch.float32, "float64": torch.float64}
    if dtype not in table:
        raise ValueError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
    return table[dtype]


class TableDataModule(L.LightningDataModule):
    """DataModule over train/val/test tables (``pa.Table`` or Parquet paths).

    Training batches follow ``PlannedBatchSampler(seed, shuffle, drop_last)``; val/test are
    in table order, never dropped. ``subset`` / ``eval_subset`` keep the first n rows of a
    seeded shuffle of train / of val and test. ``dtype`` applies to feature ``x``. ``world_size``: the DDP
    ranks the training batches are planned for (``batch_size`` per rank; see :class:`PlannedBatchSampler`).
    """

    def __init__(
        self,
        train: TableLike,
        val: TableLike | None = None,
        test: TableLike | None = None,
        *,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = False,
        subset: int | None = None,
        eval_subset: int | None = None,
        dtype: torch.dtype | str = torch.float32,
        num_workers: int = 0,
        world_size: int = 1,
    ) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.seed, self.shuffle, self.drop_last = seed, shuffle, drop_last
        self.dtype = _as_dtype(dtype)
        self.num_workers = num_workers
        self.tables: dict[str, pa.Table] = {"train": _subset(_read(train), subset, seed)}
        for name, t in (("val", val), ("test", test)):
            if t is not None:
                self.tables[name] = _subset(_read(t), eval_subset, seed)
        self.datasets = {k: TableDataset(t, self.dtype) for k, t in self.tables.items()}
        self.train_sampler = PlannedBatchSampler(
            len(self.datasets["train"]), batch_size, seed, shuffle, drop_last, world_size=world_size
        )

    @property
    def kind(self) -> str:
        """``"features"`` or ``"text"``."""
        return self.datasets["train"].kind

    @property
    def steps_per_epoch(self) -> int:
        """Number of training batches per epoch."""
        return len(self.train_sampler)

    def sample_ids(self, split: str = "train") -> np.ndarray:
        """``sample_id``s of a split, in table order (int64 [N])."""
        return self.datasets[split].sample_id.numpy()

    def epoch_order(self, epoch: int) -> list[np.ndarray]:
        """Per-step ``sample_id`` arrays (int64) of training epoch ``epoch``."""
        ids = self.sample_ids("train")
        return [ids[rows] for rows in self.train_sampler.plan(epoch)]

    def planned_order(self, epochs: int, start_epoch: int = 0) -> list[np.ndarray]:
        """Per-step ``sample_id`` arrays for epochs ``start_epoch .. start_epoch + epochs - 1``."""
        return [b for e in range(start_epoch, start_epoch + epochs) for b in self.epoch_order(e)]

    def get_batch(self, sample_ids: Sequence[int] | np.ndarray, split: str = "train") -> dict[str, torch.Tensor]:
        """The batch dict for explicit ``sample_id``s (e.g. to replay a recorded step)."""
        ids = self.sample_ids(split)
        order = np.argsort(ids)
        want = np.asarray(sample_ids, dtype=np.int64)
        pos = np.searchsorted(ids, want, sorter=order)
        pos = np.minimum(pos, len(ids) - 1)
        rows = order[pos]
        if not np.array_equal(ids[rows], want):
            missing = want[ids[rows] != want]
            raise KeyError(f"sample_id {int(missing[0])} is not in the {split} table")
        return self.datasets[split].batch(rows)

    def _loader(self, split: str, sampler: PlannedBatchSampler) -> DataLoader:
        # The planned sampler is passed as ``sampler`` (yielding row lists) with automatic
        # batching off, so Lightning's per-epoch ``dataloader.sampler.set_epoch`` reaches it.
        return DataLoader(
            self.datasets[split],
            sampler=sampler,
            batch_size=None,
            collate_fn=_identity,
            num_workers=self.num_workers,
        )

    def train_dataloader(self) -> DataLoader:
        """The planned batches; under DDP this rank's slice of each (the rank is the trainer's)."""
        trainer, sampler = self.trainer, self.train_sampler
        if trainer is not None:
            if trainer.world_size != sampler.world_size:
                raise ValueError(
                    f"the data were planned for {sampler.world_size} rank(s), the trainer has {trainer.world_size}"
                )
            sampler.rank = trainer.global_rank
        return self._loader("train", sampler)

    def _eval_loader(self, split: str) -> DataLoader | list:
        """In-order loader of ``split``; ``[]`` (Lightning skips it) when no table was given."""
        if split not in self.datasets:
            return []
        n = len(self.datasets[split])
        return self._loader(split, PlannedBatchSampler(n, self.eval_batch_size, self.seed, False, False))

    def val_dataloader(self) -> DataLoader | list:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader | list:
        return self._eval_loader("test")


__all__ = ["PlannedBatchSampler", "TableDataModule", "TableDataset"]
