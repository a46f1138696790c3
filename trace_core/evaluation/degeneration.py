"""Degenerate output: repetition within a generation and diversity across generations.

A realigned model can satisfy a judge while repeating one sentence until the token limit; these
numbers show it next to TPA and utility. Words are whitespace-separated and lower-cased.
"""

from __future__ import annotations

from collections.abc import Sequence


def _ngrams(text: str, n: int) -> list[tuple[str, ...]]:
    words = text.lower().split()
    return [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]


def seq_rep_n(texts: Sequence[str], n: int = 4) -> float | None:
    """Mean over ``texts`` of ``1 - |unique n-grams| / |n-grams|`` (seq-rep-n, Welleck et al.,
    arXiv 1908.04319): 0 when no n-gram repeats within a text, towards 1 for a text that loops.
    Texts shorter than ``n`` words are left out; None when every text is. Raises ValueError for n < 1."""
    if n < 1:
        raise ValueError(f"seq_rep_n: n must be at least 1, got {n}")
    values = []
    for text in texts:
        grams = _ngrams(text, n)
        if grams:
            values.append(1.0 - len(set(grams)) / len(grams))
    return sum(values) / len(values) if values else None


def distinct_n(texts: Sequence[str], n: int = 2) -> float | None:
    """``|unique n-grams| / |n-grams|`` over all ``texts`` together (distinct-n, Li et al.,
    arXiv 1510.03055): low when generations say the same things. None when no text has n words.
    Raises ValueError for n < 1."""
    if n < 1:
        raise ValueError(f"distinct_n: n must be at least 1, got {n}")
    grams = [g for text in texts for g in _ngrams(text, n)]
    return len(set(grams)) / len(grams) if grams else None
