"""Models by name: an MLP and a small decoder-only GPT."""

from dvemb.models.gpt import GPT, GPTConfig
from dvemb.models.mlp import MLP, MLPConfig

__all__ = ["GPT", "GPTConfig", "MLP", "MLPConfig"]
