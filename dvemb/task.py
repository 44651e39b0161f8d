"""The task: everything dvemb needs to know about a user's training, behind one object.

A task builds the model, gives the **unreduced per-sample loss** of a batch (any reduction over
tokens inside a sample), the batch's sample ids and the data. Every stage (train, score, exact
replay, ground truth, retrain, online selection, curvature) reaches the model and the loss only
through it, so a team points dvemb at its own training by writing one class::

    # mytask.py — run with `task: "mytask:DigitsCNN"` in the config
    from dvemb.task import ClassificationTask

    class DigitsCNN(ClassificationTask):
        def build_model(self, info):
            return nn.Sequential(nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 8, 3), nn.ReLU(),
                                 nn.Flatten(), nn.Linear(8 * 36, info.n_classes))

Batches are dicts of tensors with an int64 ``sample_id`` [B] (the data module builds them from the
run's tables: features ``x`` [B, d] + ``y`` [B]; token blocks ``x``/``y`` [B, S]; variable-length token
lists ``x``/``y`` [B, S] padded, with ``mask`` [B, S], 1 = a real target).

Built-in tasks: ``mlp`` (features -> classes), ``gpt`` (the small GPT on token blocks). A user task is
named by import path ``"package.module:Name"`` (resolved from the working directory / PYTHONPATH);
``task_options`` in the config are passed to its constructor.
"""

from __future__ import annotations

import importlib
import inspect
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch
from torch import nn
from torch.nn import functional as F

from dvemb.errors import DvembError

Batch = dict[str, torch.Tensor]


class TaskError(DvembError):
    """A task cannot be imported or breaks the task contract; the message names the task and method."""


@dataclass(frozen=True)
class DataInfo:
    """What the model must fit, read off the run's training table (recorded in run.json as model_shape).

    kind: "features" | "text"; d_in: feature width (0 for text); n_out: classes (features) or vocabulary
    size (text); block_size: longest input sequence (text), else None.
    """

    kind: str
    d_in: int
    n_out: int
    block_size: int | None = None

    @property
    def n_classes(self) -> int:
        return self.n_out

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "d_in": self.d_in, "n_out": self.n_out, "block_size": self.block_size}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DataInfo:
        kind = d.get("kind") or ("text" if not d.get("d_in") else "features")
        return cls(kind, int(d["d_in"]), int(d["n_out"]), d.get("block_size"))


class Task:
    """Base class of every task. Override :meth:`build_model`; the rest has working defaults.

    Required: ``build_model``; ``per_sample_loss`` unless ``logits`` + ``targets`` describe a
    cross-entropy task (the default loss is the token-mean cross-entropy of ``logits`` against
    ``targets``, padding masked out).
    """

    name: str = "task"

    def __init__(self, cfg: Any = None, **options: Any) -> None:
        """cfg: the run's RunConfig (built-in tasks read their section of it); options: ``task_options``."""
        self.cfg, self.options = cfg, options

    # --- data --------------------------------------------------------------------------
    def tables(self, cfg: Any) -> dict[str, pa.Table] | None:
        """train / val [/ test] tables with an int64 ``sample_id``; None = from ``cfg.data`` (built-in sources)."""
        return None

    def n_classes(self, info: DataInfo) -> int:
        """Output size; the default is what the data needs (classes from the config, or vocabulary)."""
        return info.n_out

    # --- model and loss ----------------------------------------------------------------
    def build_model(self, info: DataInfo) -> nn.Module:
        raise TaskError(f"task {self.name!r}: build_model(info) is not implemented")

    def init_seed(self) -> int:
        """Seed set before ``build_model`` (the config's ``model.seed``; 0 without a config)."""
        return int(self.cfg.model.seed) if self.cfg is not None else 0

    def logits(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """Model outputs [B, C] or [B, S, C] (default: ``model(batch["x"])``)."""
        return model(batch["x"])

    def targets(self, batch: Batch) -> torch.Tensor:
        """Labels [B] or [B, S] (default ``batch["y"]``)."""
        return batch["y"]

    def mask(self, batch: Batch) -> torch.Tensor | None:
        """[B, S] 1 where a target counts (variable-length sequences); None = all count."""
        return batch.get("mask")

    def per_sample_loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """Unreduced loss of every sample: [B]. Default: cross-entropy, token mean over the mask."""
        return masked_cross_entropy(self.logits(model, batch), self.targets(batch), self.mask(batch))

    def per_sample_accuracy(self, model: nn.Module, batch: Batch) -> torch.Tensor | None:
        """Fraction of targets predicted by the argmax of the logits, per sample [B] (token mean over the
        mask); None for a task whose loss is not a cross-entropy of its logits (see :func:`has_logits`)."""
        if not has_logits(self):
            return None
        hit = (self.logits(model, batch).argmax(-1) == self.targets(batch)).to(torch.float64)
        if hit.dim() == 1:
            return hit
        mask = self.mask(batch)
        if mask is None:
            return hit.reshape(len(hit), -1).mean(1)
        m = mask.to(hit.dtype)
        return (hit * m).sum(1) / m.sum(1).clamp_min(1.0)

    def require_logits(self, what: str) -> None:
        """Raise TaskError naming ``what`` when the task's loss is not a cross-entropy of its logits."""
        if not has_logits(self):
            raise TaskError(
                f"task {self.name!r}: {what} needs logits(model, batch) — the task overrides per_sample_loss "
                "but not logits, so the loss is not known to be the cross-entropy of the logits"
            )

    def sample_ids(self, batch: Batch) -> torch.Tensor:
        """[B] int64 ids of the batch's samples (default ``batch["sample_id"]``)."""
        if "sample_id" not in batch:
            raise TaskError(f"task {self.name!r}: the batch has no 'sample_id' (keys: {sorted(batch)})")
        return batch["sample_id"]

    # --- optimizer -----------------------------------------------------------------------
    def no_decay(self, model: nn.Module) -> list[str]:
        """Names or glob patterns of parameters trained without weight decay (nanoGPT: biases, norms),
        added to the config's ``train.no_decay``. Default: none."""
        return []


def has_logits(task: Task) -> bool:
    """Whether the task's loss is the cross-entropy of ``logits`` against ``targets``: the default
    ``per_sample_loss``, or one overridden together with ``logits``."""
    cls = type(task)
    return cls.per_sample_loss is Task.per_sample_loss or cls.logits is not Task.logits


def check_batch(task: Task, model: nn.Module, batch: Batch) -> torch.Tensor:
    """Dry pre-flight of a task on one batch, forward only: ids present, integer, unique; the per-sample
    loss [B] and finite. Returns the losses [B]; raises TaskError naming the task, method or column."""
    ids = task.sample_ids(batch)
    if not isinstance(ids, torch.Tensor) or ids.dim() != 1 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise TaskError(f"task {task.name!r}: sample_ids(batch) must be an integer tensor [B], got {_describe(ids)}")
    uniq, counts = torch.unique(ids, return_counts=True)
    if (counts > 1).any():
        dup = uniq[counts > 1]
        raise TaskError(
            f"task {task.name!r}: sample_ids(batch) are not unique within the batch: sample_id {int(dup[0])} "
            f"occurs {int(counts[counts > 1][0])} times ({len(dup)} duplicated id(s))"
        )
    try:
        with torch.no_grad():
            loss = task.per_sample_loss(model, batch)
    except TaskError:
        raise
    except Exception as e:  # noqa: BLE001 - user code: name the method that failed
        raise TaskError(f"task {task.name!r}: per_sample_loss(model, batch) failed ({type(e).__name__}: {e})") from e
    if not isinstance(loss, torch.Tensor) or tuple(loss.shape) != (len(ids),):
        raise TaskError(
            f"task {task.name!r}: per_sample_loss(model, batch) must return the unreduced loss of every sample, "
            f"shape [{len(ids)}]; got {_describe(loss)} (do not reduce over the batch)"
        )
    bad = ~torch.isfinite(loss)
    if bad.any():
        first = int(ids[bad.nonzero()[0, 0]])
        raise TaskError(
            f"task {task.name!r}: per_sample_loss(model, batch) is not finite (NaN/Inf) for {int(bad.sum())} "
            f"sample(s), first sample_id {first}"
        )
    return loss


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {list(value.shape)}"
    return f"a {type(value).__name__}"


class ClassificationTask(Task):
    """Features ``x`` [B, d] -> logits [B, C], cross-entropy against ``y`` [B]. Override ``build_model``."""


class LanguageModelTask(Task):
    """Tokens ``x`` [B, S] -> logits [B, S, V], token-mean cross-entropy against ``y`` [B, S] (``mask``
    for padded variable-length rows). Override ``build_model``."""


def masked_cross_entropy(logits: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """logits [B, C] or [B, S, C], targets [B] or [B, S] (mask [B, S]) -> [B] losses (token mean)."""
    if logits.dim() == 2:
        return F.cross_entropy(logits, y, reduction="none")
    b, s, c = logits.shape
    tok = F.cross_entropy(logits.reshape(b * s, c), y.reshape(b * s).clamp_min(0), reduction="none").view(b, s)
    if mask is None:
        return tok.mean(dim=1)
    m = mask.to(tok.dtype)
    return (tok * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)


# --- resolution --------------------------------------------------------------------------
BUILTIN: dict[str, Callable[[], type[Task]]] = {}


def register(name: str):
    """Class decorator: make ``name`` a built-in task."""

    def wrap(cls: type[Task]) -> type[Task]:
        BUILTIN[name] = lambda: cls
        cls.name = name
        return cls

    return wrap


def resolve_task_class(spec: str) -> type[Task]:
    """A built-in name or ``"package.module:Name"`` -> the task class (TaskError naming what failed)."""
    import dvemb.tasks  # noqa: F401  (registers the built-ins)

    if spec in BUILTIN:
        return BUILTIN[spec]()
    if ":" not in spec:
        raise TaskError(
            f"task {spec!r}: not a built-in ({', '.join(sorted(BUILTIN))}) and not an import path 'package.module:Name'"
        )
    module_name, _, attr = spec.partition(":")
    cwd = str(Path.cwd())
    if cwd not in sys.path:  # "resolved from the working directory / PYTHONPATH"
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # noqa: BLE001 - any import failure of user code is reported the same way
        raise TaskError(f"task {spec!r}: module {module_name!r} does not import ({type(e).__name__}: {e})") from None
    cls = getattr(module, attr, None)
    if cls is None:
        raise TaskError(f"task {spec!r}: module {module_name!r} has no attribute {attr!r}")
    if not (inspect.isclass(cls) and issubclass(cls, Task)):
        raise TaskError(f"task {spec!r}: {attr!r} is not a subclass of dvemb.task.Task")
    if cls.build_model is Task.build_model:
        raise TaskError(f"task {spec!r}: {attr} does not implement the required method build_model(info)")
    return cls


def load_task(cfg: Any) -> Task:
    """The task of a RunConfig (``cfg.task`` + ``cfg.task_options``), constructed."""
    spec = cfg.task
    cls = resolve_task_class(spec)
    try:
        task = cls(cfg, **(cfg.task_options or {}))
    except TypeError as e:
        raise TaskError(f"task {spec!r}: constructor rejects task_options {cfg.task_options!r} ({e})") from None
    if cls.name == "task":
        task.name = spec
    return task
