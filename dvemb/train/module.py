"""The LightningModule: per-sample cross-entropy, SGD/AdamW, warmup + cosine schedule."""

from __future__ import annotations

import logging
import math

import lightning as L
import torch
from torch import nn

from dvemb.config import TrainConfig
from dvemb.models.loss import per_sample_cross_entropy

log = logging.getLogger(__name__)


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the base LR at ``step``: linear warmup, then constant or cosine to 0."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "cosine":
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return 1.0


class Trainee(L.LightningModule):
    """Wraps ``model`` (kept as ``.model`` so the capture can find its layers)."""

    def __init__(self, model: nn.Module, cfg: TrainConfig):
        super().__init__()
        self.model, self.cfg = model, cfg
        self.clip_factor = 1.0  # of the last optimizer step: the update was lr * clip_factor * gradient

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
        losses = per_sample_cross_entropy(self.model(batch["x"]), batch["y"])
        return losses.mean() if self.cfg.reduction == "mean" else losses.sum()

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.log("train_loss", loss.detach(), prog_bar=True, batch_size=len(batch["sample_id"]))
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.log("val_loss", self._loss(batch), prog_bar=True, batch_size=len(batch["sample_id"]))

    def configure_optimizers(self):
        c = self.cfg
        if c.optimizer == "adamw":
            log.warning("AdamW: data value embeddings treat the run as SGD with the recorded LR (the paper's proxy)")
            opt = torch.optim.AdamW(self.parameters(), lr=c.lr, weight_decay=c.weight_decay)
        else:
            if c.momentum:
                log.warning("SGD momentum %.2f: embeddings assume plain SGD (momentum is ignored)", c.momentum)
            opt = torch.optim.SGD(self.parameters(), lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay)
        total = int(self.trainer.estimated_stepping_batches)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total, c.warmup_steps, c.schedule))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
