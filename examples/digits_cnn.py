"""A user-written task: a small CNN on sklearn digits (8x8 grey images, 10 classes).

Run from the repository root (the task is imported by path from the working directory)::

    dvemb run configs/digits_cnn.yaml --engine local

The data is the built-in ``digits`` source (features ``x`` [B, 64], pixels / 16; labels ``y`` [B]),
so the task only builds the model; the loss is the default per-sample cross-entropy of its logits.
``capture.layers: [conv2d, linear]`` in the config captures both convolutions and the classifier.
"""

from __future__ import annotations

from torch import nn

from dvemb.task import ClassificationTask, DataInfo


class DigitsCNN(ClassificationTask):
    """[B, 64] -> [B, 1, 8, 8] -> conv 3x3 pad 1 -> tanh -> conv 3x3 stride 2 -> tanh -> Linear -> [B, 10].

    task_options: ``channels`` (both convolutions, default 8).
    """

    def __init__(self, cfg=None, channels: int = 8):
        super().__init__(cfg, channels=channels)
        self.channels = channels

    def build_model(self, info: DataInfo) -> nn.Module:
        c = self.channels
        return nn.Sequential(
            nn.Unflatten(1, (1, 8, 8)),
            nn.Conv2d(1, c, 3, padding=1),  # [B, c, 8, 8]
            nn.Tanh(),
            nn.Conv2d(c, c, 3, stride=2),  # [B, c, 3, 3]
            nn.Tanh(),
            nn.Flatten(),
            nn.Linear(c * 3 * 3, info.n_classes),
        )
