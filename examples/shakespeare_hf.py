"""A user-side task: a HuggingFace ``transformers`` causal LM on Shakespeare's speeches, one per row.

The model is GPT-2 (``arch: gpt2``: ``Conv1D`` projections, token embedding tied to ``lm_head``) or
Llama (``arch: llama``: bias-free ``nn.Linear``, RMSNorm, tied embedding), built from a small config
with random weights (nothing is downloaded). The data are **variable-length** rows: the GPT-2 BPE
tokens of the works (``dvemb data fetch``) cut at blank lines, so one row is one speech or stage
direction, at most ``data.block_size + 1`` tokens long. dvemb pads each batch to its longest row and
masks the padding out of the loss (``batch["mask"]``); padding sits after the real tokens and
attention is causal, so it never reaches a real position either.

Run from the repository root::

    dvemb run configs/shakespeare_hf.yaml --engine local
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from dvemb.data.tables import shakespeare_tokens, split_indices, text_table
from dvemb.task import Batch, DataInfo, LanguageModelTask, TaskError

NEWLINE = 198  # GPT-2's "\n"; a blank line is two of them (the pre-tokenizer splits "\n\n" before a word)


def speeches(tokens: np.ndarray, min_tokens: int, max_tokens: int) -> tuple[list[np.ndarray], np.ndarray]:
    """Rows of the token stream cut after every blank line: (rows with >= min_tokens, truncated to
    max_tokens; their index among all pieces, the sample id)."""
    cut = np.flatnonzero((tokens[:-1] == NEWLINE) & (tokens[1:] == NEWLINE)) + 2
    starts, ends = np.r_[0, cut], np.r_[cut, len(tokens)]
    keep = np.flatnonzero(ends - starts >= min_tokens)
    return [tokens[starts[i] : min(ends[i], starts[i] + max_tokens)] for i in keep], keep


class ShakespeareHF(LanguageModelTask):
    """A HuggingFace causal LM on variable-length Shakespeare speeches.

    task_options: ``arch`` (gpt2 | llama), ``n_layer``, ``n_head``, ``n_embd``, ``min_tokens`` (shortest row kept).
    """

    def __init__(self, cfg=None, arch: str = "gpt2", n_layer: int = 2, n_head: int = 2, n_embd: int = 64,
                 min_tokens: int = 8):  # fmt: skip
        if arch not in ("gpt2", "llama"):
            raise TaskError(f"task_options.arch {arch!r}: choose gpt2 or llama")
        super().__init__(cfg, arch=arch, n_layer=n_layer, n_head=n_head, n_embd=n_embd, min_tokens=min_tokens)
        self.arch, self.n_layer, self.n_head, self.n_embd, self.min_tokens = arch, n_layer, n_head, n_embd, min_tokens

    def tables(self, cfg) -> dict[str, pa.Table]:
        rows, ids = speeches(shakespeare_tokens(), self.min_tokens, cfg.data.block_size + 1)
        split = split_indices(len(rows), cfg.data.val_fraction, 0.0, cfg.data.seed)
        return {k: text_table([rows[i] for i in split[k]], ids[split[k]]) for k in ("train", "val")}

    def build_model(self, info: DataInfo) -> nn.Module:
        if self.arch == "gpt2":
            cfg = GPT2Config(
                vocab_size=info.n_out, n_positions=info.block_size, n_embd=self.n_embd, n_layer=self.n_layer,
                n_head=self.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
            )  # fmt: skip
            return GPT2LMHeadModel(cfg)
        cfg = LlamaConfig(
            vocab_size=info.n_out, hidden_size=self.n_embd, intermediate_size=4 * self.n_embd,
            num_hidden_layers=self.n_layer, num_attention_heads=self.n_head, num_key_value_heads=self.n_head,
            max_position_embeddings=info.block_size, tie_word_embeddings=True,
        )  # fmt: skip
        return LlamaForCausalLM(cfg)

    def logits(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """[B, S, vocab]; right padding needs no attention mask under causal attention."""
        return model(input_ids=batch["x"], use_cache=False).logits

    def no_decay(self, model: nn.Module) -> list[str]:
        return ["*.bias", "*ln_*"] if self.arch == "gpt2" else ["*norm*"]  # nanoGPT: not on biases and norms
