"""The built-in tasks, written against the same interface as a user's: ``mlp`` and ``gpt``."""

from __future__ import annotations

from torch import nn

from dvemb.models.gpt import GPT, GPTConfig
from dvemb.models.mlp import MLP, MLPConfig
from dvemb.task import ClassificationTask, DataInfo, LanguageModelTask, TaskError, register


@register("mlp")
class MLPTask(ClassificationTask):
    """The MLP of ``cfg.model`` (hidden widths, activation) on feature tables."""

    def build_model(self, info: DataInfo) -> nn.Module:
        m = self.cfg.model
        if info.kind != "features":
            raise TaskError(f"task 'mlp' needs a feature table (x, label); the training table holds {info.kind}")
        return MLP(MLPConfig(d_in=info.d_in, hidden=tuple(m.hidden), n_classes=info.n_out, activation=m.activation))


@register("gpt")
class GPTTask(LanguageModelTask):
    """The small nanoGPT-style GPT of ``cfg.model`` (n_layer, n_head, n_embd) on token blocks."""

    def build_model(self, info: DataInfo) -> nn.Module:
        m = self.cfg.model
        if info.kind != "text" or info.block_size is None:
            raise TaskError(f"task 'gpt' needs a text table (tokens); the training table holds {info.kind}")
        return GPT(
            GPTConfig(
                vocab_size=info.n_out, block_size=info.block_size, n_layer=m.n_layer, n_head=m.n_head, n_embd=m.n_embd
            )
        )
