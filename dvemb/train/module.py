"""The LightningModule: the task's per-sample loss reduced (mean / sum), SGD/AdamW with decay / no-decay
param groups, warmup + cosine schedule, global-norm clipping."""

from __future__ import annotations

import fnmatch
import itertools
import logging
import math

import lightning as L
import torch
from torch import nn

from dvemb.config import TrainConfig
from dvemb.task import Task

log = logging.getLogger(__name__)


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the base LR at ``step``: linear warmup, then constant or cosine to 0."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "cosine":
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return 1.0


def param_groups(model: nn.Module, cfg: TrainConfig, no_decay: list[str] = ()) -> list[dict]:
    """nanoGPT-style optimizer groups over ``model.named_parameters()`` (names without a prefix).

    Without no-decay patterns (``cfg.no_decay`` + the task's ``no_decay``): one group ``decay``. With
    them: ``[decay, no_decay]`` (group 0 decays with ``cfg.weight_decay``, group 1 has none), each in
    parameter order. A group's LR is ``cfg.lr * cfg.group_lr[name]`` (default multiplier 1). Each group
    holds ``(name, parameter)`` pairs, so the optimizer records ``param_names``.
    """
    patterns = [*cfg.no_decay, *no_decay]
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    skip = {n for n, _ in named if any(fnmatch.fnmatchcase(n, pat) for pat in patterns)}
    for pat in patterns:
        if not any(fnmatch.fnmatchcase(n, pat) for n, _ in named):
            log.warning("no_decay pattern %r matches no parameter", pat)
    groups = [("decay", [(n, p) for n, p in named if n not in skip], cfg.weight_decay)]
    if patterns:
        groups.append(("no_decay", [(n, p) for n, p in named if n in skip], 0.0))
    return [
        {"name": name, "params": params, "weight_decay": wd, "lr": cfg.lr * cfg.group_lr.get(name, 1.0)}
        for name, params, wd in groups
    ]


class Trainee(L.LightningModule):
    """Wraps ``model`` (kept as ``.model`` so the capture can find its layers) and its ``task``.

    task: gives the per-sample loss [B] of a batch; None = the base :class:`~dvemb.task.Task`
    (cross-entropy of ``model(batch["x"])`` against ``batch["y"]``).
    """

    def __init__(self, model: nn.Module, cfg: TrainConfig, task: Task | None = None):
        super().__init__()
        self.model, self.cfg = model, cfg
        self.task = task if task is not None else Task()
        self.clip_factor = 1.0  # of the last optimizer step: the update was lr * clip_factor * gradient

    def setup(self, stage: str) -> None:
        """Each rank gets its own parameters: tensors that reached a rank through a fork server's pipe live
        in shared memory, one storage for all CPU ranks, which would each apply their update to it."""
        with torch.no_grad():
            for t in itertools.chain(self.parameters(), self.buffers()):
                if t.is_shared():
                    t.data = t.data.clone()

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Clip the global gradient norm to ``cfg.grad_clip`` (as torch's clip_grad_norm_) and keep the factor.

        Runs after the callbacks' hook and after AMP unscaling. Clipping rescales the whole update, so
        for SGD it is exactly a step with LR ``lr * clip_factor``; GradientLogger records that.
        """
        if self.cfg.grad_clip is None:
            return
        norm = float(torch.nn.utils.clip_grad_norm_(self.parameters(), self.cfg.grad_clip))
        self.clip_factor = min(1.0, self.cfg.grad_clip / (norm + 1e-6)) if math.isfinite(norm) else 0.0

    def _loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        losses = self.task.per_sample_loss(self.model, batch)
        return losses.mean() if self.cfg.reduction == "mean" else losses.sum()

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.log("train_loss", loss.detach(), prog_bar=True, batch_size=len(self.task.sample_ids(batch)))
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        n = len(self.task.sample_ids(batch))
        self.log("val_loss", self._loss(batch), prog_bar=True, batch_size=n, sync_dist=self.trainer.world_size > 1)

    def configure_optimizers(self):
        c = self.cfg
        groups = param_groups(self.model, c, self.task.no_decay(self.model))
        if c.optimizer == "adamw":
            opt = torch.optim.AdamW(groups, lr=c.lr, weight_decay=c.weight_decay)
        else:
            opt = torch.optim.SGD(groups, lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay)
        total = int(self.trainer.estimated_stepping_batches)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total, c.warmup_steps, c.schedule))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
