"""A deterministic lexical embedding model: the `local` provider's stand-in for a neural model.

Signed feature hashing of word unigrams and bigrams with sublinear term frequency, L2-normalised,
so texts sharing vocabulary score higher (cosine) than unrelated texts. Same text, same vector, on
every machine and process (crc32, not Python's salted `hash`).
"""

from __future__ import annotations

import re
import zlib
from functools import lru_cache

import numpy as np

MODEL_NAME = "local-lexical-v1"
_WORD = re.compile(r"[a-z0-9]+")
_STOP = frozenset(
    ["a", "an", "and", "are", "as", "at", "be", "by", "for", "from", "has", "have", "in", "is", "it", "its", "of", "on", "or", "that", "the", "this", "to", "was", "were", "which", "with", "i", "my", "me", "we", "our", "he", "she", "they", "them", "their", "his", "her", "not", "no", "so", "if", "but", "than", "then", "there", "these", "those", "been"]
)


@lru_cache(maxsize=500_000)
def _slot(feature: str, dims: int) -> int:
    """Hashed feature → signed slot (+index or -index-1)."""
    h = zlib.crc32(feature.encode("utf-8"))
    index = h % dims
    return index if (h >> 31) & 1 == 0 else -index - 1


def embed(text: str, *, dims: int = 1024) -> np.ndarray:
    """Unit-norm float32 vector of `dims` components (all zeros but one for a text without words)."""
    words = [w for w in _WORD.findall(text.lower()) if w not in _STOP]
    features = words + [f"{a}_{b}" for a, b in zip(words, words[1:], strict=False)]
    vector = np.zeros(dims, dtype=np.float32)
    if not features:
        vector[0] = 1.0
        return vector
    slots = np.fromiter((_slot(f, dims) for f in features), dtype=np.int64, count=len(features))
    positive = slots >= 0
    counts = np.bincount(slots[positive], minlength=dims).astype(np.float32)
    counts -= np.bincount(-slots[~positive] - 1, minlength=dims).astype(np.float32)
    vector = np.sign(counts) * np.log1p(np.abs(counts))
    norm = float(np.linalg.norm(vector))
    if norm == 0.0:
        vector[0] = 1.0
        return vector.astype(np.float32)
    return (vector / norm).astype(np.float32)
