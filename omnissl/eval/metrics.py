"""Downstream metrics: edit distance, character and word error rates (corpus level), accuracy.

CER and WER follow the usual ASR convention (SUPERB ASR, sclite): the total number of substitutions,
deletions and insertions over all utterances, divided by the total number of reference units. A rate can
exceed 1 when the hypotheses insert a lot. The rates are jiwer's, the distances rapidfuzz's Levenshtein (the
C++ library under jiwer, about 5000x faster than a Python table on 150-character strings); this module fixes
the units (every character counts, spaces included and nothing stripped; words are whitespace-separated, as
`str.split`) and adds the input checks (pairs, nothing to score, all references empty: an error, not a 0).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import jiwer
from rapidfuzz.distance import Levenshtein
from torch import Tensor

CHARS = jiwer.ReduceToListOfListOfChars()  # jiwer's default CER transform also strips: ours keeps every character
WORDS = jiwer.Compose([jiwer.RemoveWhiteSpace(replace_by_space=True), jiwer.RemoveMultipleSpaces(), jiwer.Strip(),
                       jiwer.ReduceToListOfListOfWords()])  # = str.split()


def edit_distance(ref: Sequence[Hashable], hyp: Sequence[Hashable]) -> int:
    """Levenshtein distance between two sequences (unit cost for substitution, deletion, insertion): of
    strings, character by character; of other sequences (words, token ids), item by item."""
    return int(Levenshtein.distance(ref, hyp))


def check_pairs(refs: Sequence[str], hyps: Sequence[str], *, words: bool) -> None:
    """ValueError when references and hypotheses do not pair up, when there are none, or when every
    reference is empty (a rate over zero units is undefined)."""
    if len(refs) != len(hyps):
        raise ValueError(f"{len(refs)} references but {len(hyps)} hypotheses")
    if not refs:
        raise ValueError("no utterances to score")
    if not any((r.split() if words else r) for r in refs):
        raise ValueError("the references are all empty: the error rate is undefined")


def cer(refs: Sequence[str], hyps: Sequence[str]) -> float:
    """Character error rate over strings; spaces count as characters (as in SUPERB's PR/ASR scoring of
    letter sequences)."""
    check_pairs(refs, hyps, words=False)
    return float(jiwer.cer(list(refs), list(hyps), reference_transform=CHARS, hypothesis_transform=CHARS))


def wer(refs: Sequence[str], hyps: Sequence[str]) -> float:
    """Word error rate over whitespace-separated words."""
    check_pairs(refs, hyps, words=True)
    return float(jiwer.wer(list(refs), list(hyps), reference_transform=WORDS, hypothesis_transform=WORDS))


def accuracy(logits: Tensor, labels: Tensor) -> float:
    """Top-1 accuracy of (U, K) logits against (U,) class indices."""
    if logits.shape[0] != labels.shape[0]:
        raise ValueError(f"{logits.shape[0]} predictions but {labels.shape[0]} labels")
    if labels.numel() == 0:
        raise ValueError("no items to score")
    return float((logits.argmax(-1) == labels).float().mean())

