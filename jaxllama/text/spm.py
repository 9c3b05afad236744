"""SentencePiece (`llama` vocabularies): spaces as U+2581, and merges as BPE ranks derived
from the token scores."""

from __future__ import annotations

SPM_SPACE = "\u2581"


def spm_merges(vocab: dict[str, int], scores: list[float]) -> list[tuple[str, str]]:
    """SentencePiece merges as BPE ranks: every split of a token into two tokens, ranked by
    the merged token's score (llama.cpp merges the highest-scoring pair first)."""
    ranked: list[tuple[float, int, int, str, str]] = []
    for text, tid in vocab.items():
        for k in range(1, len(text)):
            a, b = text[:k], text[k:]
            ia, ib = vocab.get(a), vocab.get(b)
            if ia is not None and ib is not None:
                ranked.append((-scores[tid], ia, ib, a, b))
    ranked.sort()
    return [(a, b) for _, _, _, a, b in ranked]
