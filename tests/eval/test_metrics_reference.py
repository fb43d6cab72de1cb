"""The library metrics (jiwer / rapidfuzz, omnissl/eval/metrics.py) against a plain dynamic-programming reference on
random strings, word lists and token ids."""

import random

import pytest

from omnissl.eval.metrics import cer, edit_distance, wer


def levenshtein(a, b) -> int:
    d = [[i + j if i * j == 0 else 0 for j in range(len(b) + 1)] for i in range(len(a) + 1)]
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            d[i][j] = min(d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + (a[i - 1] != b[j - 1]))
    return d[-1][-1]


def random_text(rng: random.Random) -> str:
    words = ["the", "cat", "sat", "on", "a", "mat", "ça", "日本", " "]
    return rng.choice(["", " ", "\t"]) + " ".join(rng.choice(words) for _ in range(rng.randint(0, 6)))


def test_equal_to_a_dynamic_programming_reference():
    rng = random.Random(0)
    refs = [random_text(rng) for _ in range(60)]  # some empty, some with leading/trailing/double spaces
    hyps = [random_text(rng) for _ in range(60)]
    for r, h in zip(refs, hyps):
        assert edit_distance(r, h) == levenshtein(r, h)
        assert edit_distance(r.split(), h.split()) == levenshtein(r.split(), h.split())
    ids = [[rng.randrange(5000) for _ in range(rng.randint(0, 12))] for _ in range(40)]
    for a, b in zip(ids, ids[1:]):
        assert edit_distance(a, b) == levenshtein(a, b)
    chars = sum(levenshtein(r, h) for r, h in zip(refs, hyps)) / sum(len(r) for r in refs)
    words = sum(levenshtein(r.split(), h.split()) for r, h in zip(refs, hyps)) / sum(len(r.split()) for r in refs)
    assert cer(refs, hyps) == pytest.approx(chars)
    assert wer(refs, hyps) == pytest.approx(words)
