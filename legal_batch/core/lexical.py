"""A deterministic lexical embedding model: the `local` provider's stand-in for a neural model.

Signed feature hashing with sublinear term frequency, L2-normalised, so texts sharing vocabulary
score higher (cosine) than unrelated texts, in any script. Text is NFKC-normalised and case-folded
(full-width digits and letters become ASCII), then:

- words of alphabetic scripts (Latin, Greek, Cyrillic, ...), stop words left out: each word, each
  pair of neighbouring words, and the character 3-grams of the word with its boundaries (`<po`,
  `pos`, ..., `on>`), together weighted like the word itself, so an inflected or shortened form
  (`possessed`, `possession`) still shares features with the word;
- runs of CJK characters (Chinese, Japanese kana, Korean Hangul): each pair of neighbouring
  characters, and each character (common function characters such as 的 left out) at a lower weight,
  so `司法覆核` matches text about 司法覆核 without a word segmenter.

A text with none of these features (empty, punctuation, only stop words such as "the of and") has
no vector: `embed` raises `NoFeatures` rather than returning a constant vector that would match
every other featureless text at cosine 1. Same text, same vector, on every machine and process
(crc32, not Python's salted `hash`).
"""

from __future__ import annotations

import math
import re
import unicodedata
import zlib
from collections import Counter
from functools import lru_cache

import numpy as np

_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af"
_TOKEN = re.compile(f"([{_CJK}]+)|((?:(?![{_CJK}])[^\\W_])+)")
_STOP = frozenset([
    "a", "about", "above", "after", "again", "against", "all", "also", "am", "an", "and", "any", "are", "as", "at",
    "be", "because", "been", "before", "being", "below", "between", "both", "but", "by", "can", "could", "did",
    "do", "does", "doing", "down", "during", "each", "few", "for", "from", "further", "had", "has", "have",
    "having", "he", "her", "here", "hers", "herself", "him", "himself", "his", "how", "i", "if", "in", "into", "is",
    "it", "its", "itself", "just", "may", "me", "more", "most", "must", "my", "myself", "no", "nor", "not", "now",
    "of", "off", "on", "once", "only", "or", "other", "our", "ours", "ourselves", "out", "over", "own", "same",
    "shall", "she", "should", "so", "some", "such", "than", "that", "the", "their", "theirs", "them", "themselves",
    "then", "there", "these", "they", "this", "those", "through", "to", "too", "under", "until", "up", "upon",
    "very", "was", "we", "were", "what", "when", "where", "whether", "which", "while", "who", "whom", "why", "will",
    "with", "within", "without", "would", "you", "your", "yours", "yourself", "yourselves",
])
_STOP_CJK = frozenset("的了是在和与與及或等其之为為对對于於以而被将將把由从從也都就并並但该該此这這那有个個所已")
_CJK_CHAR_WEIGHT = 0.3
_NGRAM = 3


class NoFeatures(ValueError):
    """The text has nothing the model can represent (no words but stop words, no CJK characters)."""


@lru_cache(maxsize=500_000)
def _slot(feature: str, dims: int) -> int:
    """Hashed feature → signed slot (+index or -index-1)."""
    h = zlib.crc32(feature.encode("utf-8"))
    index = h % dims
    return index if (h >> 31) & 1 == 0 else -index - 1


@lru_cache(maxsize=200_000)
def _subwords(word: str) -> tuple[tuple[str, ...], float]:
    """The character n-grams of `<word>` and the weight of each (together, the weight of the word)."""
    if len(word) <= _NGRAM or word.isdigit():
        return (), 0.0
    bounded = f"<{word}>"
    grams = tuple("#" + bounded[i:i + _NGRAM] for i in range(len(bounded) - _NGRAM + 1))
    return grams, 1.0 / math.sqrt(len(grams))


def features(text: str) -> dict[str, float]:
    """Feature → weight (summed over occurrences) of `text`, as described in the module docstring.

    Occurrences are counted first (`Counter`, in C) and each distinct word's n-grams added once with
    its count: the same weights as adding occurrence by occurrence, at a fraction of the cost."""
    words: list[str] = []
    pairs: list[str] = []
    chars: list[str] = []
    char_pairs: list[str] = []
    previous: str | None = None
    for run, word in _TOKEN.findall(unicodedata.normalize("NFKC", text).casefold()):
        if run:
            previous = None
            chars.extend(char for char in run if char not in _STOP_CJK)
            char_pairs.extend(run[i:i + 2] for i in range(len(run) - 1))
            continue
        if word in _STOP:
            previous = None
            continue
        words.append(word)
        if previous is not None:
            pairs.append(f"{previous}_{word}")
        previous = word
    weights: dict[str, float] = {char: count * _CJK_CHAR_WEIGHT for char, count in Counter(chars).items()}
    get = weights.get
    counted = Counter(words)
    for counts in (Counter(char_pairs), counted, Counter(pairs)):
        for feature, count in counts.items():
            weights[feature] = get(feature, 0.0) + count
    for word, count in counted.items():
        grams, share = _subwords(word)
        weight = share * count
        for gram in grams:
            weights[gram] = get(gram, 0.0) + weight
    return weights


def embed(text: str, *, dims: int = 1024) -> np.ndarray:
    """Unit-norm float32 vector of `dims` components; raises `NoFeatures` for a text without features."""
    weights = features(text)
    if not weights:
        raise NoFeatures("the text has no words or characters the model can use (empty, punctuation, or only "
                         "stop words such as 'the of and')")
    slots = np.fromiter((_slot(f, dims) for f in weights), dtype=np.int64, count=len(weights))
    values = np.log1p(np.fromiter(weights.values(), dtype=np.float64, count=len(weights)))
    positive = slots >= 0
    # float64 even when one side is empty (the bincount of nothing is an int array)
    vector = np.bincount(slots[positive], weights=values[positive], minlength=dims).astype(np.float64)
    vector -= np.bincount(-slots[~positive] - 1, weights=values[~positive], minlength=dims)
    norm = float(np.linalg.norm(vector))
    if norm == 0.0:  # every feature cancelled another out in the signed hash: astronomically unlikely
        raise NoFeatures("the text's features cancel out in the hashed vector")
    return (vector / norm).astype(np.float32)
