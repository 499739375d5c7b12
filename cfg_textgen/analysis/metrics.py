"""Text metrics of a continuation: pure functions on sequences (defined in the package docstring)."""

from __future__ import annotations

import math
from typing import Sequence


# ---- text metrics (pure functions on sequences) -----------------------------------------------


def ngrams(seq: Sequence, n: int) -> list[tuple]:
    """The n-grams of `seq` in order (overlapping); empty when `seq` is shorter than n."""
    if n < 1:
        raise ValueError(f"`n` has to be an integer >= 1, but is {n!r}")
    return [tuple(seq[i:i + n]) for i in range(len(seq) - n + 1)]


def distinct_n(seq: Sequence, n: int = 2) -> float:
    """Distinct n-grams / all n-grams; NaN when there is no n-gram."""
    grams = ngrams(seq, n)
    return len(set(grams)) / len(grams) if grams else math.nan


def repeated_ngram_rate(seq: Sequence, n: int = 3) -> float:
    """Share of n-gram occurrences that repeat an n-gram seen earlier in `seq`; NaN without n-grams."""
    grams = ngrams(seq, n)
    return (len(grams) - len(set(grams))) / len(grams) if grams else math.nan


def edit_distance(a: Sequence, b: Sequence) -> int:
    """Levenshtein distance (insert, delete, substitute: cost 1 each) between two sequences."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))  # distances from a[:0] to every prefix of b
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


def normalized_edit_distance(a: Sequence, b: Sequence) -> float:
    """Levenshtein distance / the longer length, in [0, 1]; 0 for two empty sequences."""
    longest = max(len(a), len(b))
    return edit_distance(a, b) / longest if longest else 0.0


def entropy(logits):
    """Shannon entropy (nats) of softmax(logits) along the last axis; -inf entries count as p = 0."""
    from ..samplers import row_entropy

    return row_entropy(logits.float()).squeeze(-1)
