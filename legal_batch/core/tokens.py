"""Exact OpenAI token counts offline.

`tiktoken.get_encoding()` downloads its vocabulary on first use. The `bpe-openai` wheel ships the
same vocabularies in tiktoken's own format (`data/<name>.tiktoken.gz`), so we build the
`tiktoken.Encoding` from those ranks: same token ids, no network.
"""

from __future__ import annotations

import base64
import gzip
from functools import lru_cache
from importlib import resources
from typing import Literal

import tiktoken

EncodingName = Literal["cl100k_base", "o200k_base"]

_PATTERNS: dict[str, str] = {
    "cl100k_base": r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s""",
    "o200k_base": "|".join(
        [
            r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
            r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
            r"""\p{N}{1,3}""",
            r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
            r"""\s*[\r\n]+""",
            r"""\s+(?!\S)""",
            r"""\s+""",
        ]
    ),
}
_SPECIAL: dict[str, dict[str, int]] = {
    "cl100k_base": {
        "<|endoftext|>": 100257,
        "<|fim_prefix|>": 100258,
        "<|fim_middle|>": 100259,
        "<|fim_suffix|>": 100260,
        "<|endofprompt|>": 100276,
    },
    "o200k_base": {"<|endoftext|>": 199999, "<|endofprompt|>": 200018},
}


@lru_cache(maxsize=4)
def encoding(name: EncodingName = "cl100k_base") -> tiktoken.Encoding:
    """The named tiktoken encoding, built from the vocabulary shipped in `bpe-openai`."""
    data = resources.files("bpe_openai") / "data" / f"{name}.tiktoken.gz"
    ranks: dict[bytes, int] = {}
    with gzip.open(data.open("rb"), "rt", encoding="ascii") as lines:
        for line in lines:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return tiktoken.Encoding(
        name=name, pat_str=_PATTERNS[name], mergeable_ranks=ranks, special_tokens=_SPECIAL[name]
    )


def count_tokens(text: str, name: EncodingName = "cl100k_base") -> int:
    """Exact token count of `text` (special-token strings are counted as ordinary text)."""
    return len(encoding(name).encode_ordinary(text))


def encoding_for_model(model: str) -> EncodingName:
    """o200k for the gpt-4o / o-series families, cl100k otherwise (embeddings, gpt-4, estimates)."""
    return "o200k_base" if model.startswith(("gpt-4o", "gpt-4.1", "gpt-5", "o1", "o3", "o4")) else "cl100k_base"
