"""Build a model by name from the run config and the data's shape."""

from __future__ import annotations

from torch import nn

from dvemb.config import ModelConfig
from dvemb.models.gpt import GPT, GPTConfig
from dvemb.models.mlp import MLP, MLPConfig


def build_model(cfg: ModelConfig, d_in: int, n_out: int, block_size: int | None = None) -> nn.Module:
    """MLP: d_in features -> n_out classes. GPT: vocabulary n_out, context block_size."""
    if cfg.kind == "mlp":
        return MLP(MLPConfig(d_in=d_in, hidden=tuple(cfg.hidden), n_classes=n_out, activation=cfg.activation))
    if cfg.kind == "gpt":
        if block_size is None:
            raise ValueError("model.kind 'gpt' needs text data (a block size)")
        return GPT(
            GPTConfig(
                vocab_size=n_out, block_size=block_size, n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd
            )
        )
    raise ValueError(f"model.kind {cfg.kind!r}: choose 'mlp' or 'gpt'")
