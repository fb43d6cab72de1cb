"""Downstream metrics: edit distance, character and word error rates (corpus level), accuracy.

CER and WER follow the usual ASR convention (SUPERB ASR, sclite): the total number of substitutions,
deletions and insertions over all utterances, divided by the total number of reference units. A rate can
exceed 1 when the hypotheses insert a lot.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor


def edit_distance(ref: Sequence, hyp: Sequence) -> int:
    """Levenshtein distance between two sequences (unit cost for substitution, deletion, insertion).

    One row of the dynamic-programming table at a time: O(len(ref) * len(hyp)) time, O(len(hyp)) memory.
    """
    prev = list(range(len(hyp) + 1))  # distance of ref[:0] to hyp[:j]
    for i, r in enumerate(ref, start=1):
        cur = [i] + [0] * len(hyp)
        for j, h in enumerate(hyp, start=1):
            cur[j] = min(prev[j] + 1,             # delete r
                         cur[j - 1] + 1,          # insert h
                         prev[j - 1] + (r != h))  # substitute (or match)
        prev = cur
    return prev[-1]


def _check_pairs(refs: Sequence, hyps: Sequence) -> None:
    if len(refs) != len(hyps):
        raise ValueError(f"{len(refs)} references but {len(hyps)} hypotheses")
    if not refs:
        raise ValueError("no utterances to score")


def error_rate(refs: Sequence[Sequence], hyps: Sequence[Sequence]) -> float:
    """Corpus-level error rate: sum of edit distances / total reference length."""
    _check_pairs(refs, hyps)
    total = sum(len(r) for r in refs)
    if total == 0:
        raise ValueError("the references are all empty: the error rate is undefined")
    return sum(edit_distance(r, h) for r, h in zip(refs, hyps)) / total


def cer(refs: Sequence[str], hyps: Sequence[str]) -> float:
    """Character error rate over strings; spaces count as characters (as in SUPERB's PR/ASR scoring of
    letter sequences)."""
    return error_rate(list(refs), list(hyps))


def wer(refs: Sequence[str], hyps: Sequence[str]) -> float:
    """Word error rate over whitespace-separated words."""
    return error_rate([r.split() for r in refs], [h.split() for h in hyps])


def accuracy(logits: Tensor, labels: Tensor) -> float:
    """Top-1 accuracy of (U, K) logits against (U,) class indices."""
    if logits.shape[0] != labels.shape[0]:
        raise ValueError(f"{logits.shape[0]} predictions but {labels.shape[0]} labels")
    if labels.numel() == 0:
        raise ValueError("no items to score")
    return float((logits.argmax(-1) == labels).float().mean())

