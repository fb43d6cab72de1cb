"""Span masking (omnissl.ssl.masking.span_mask) against a naive per-row reference of fairseq's
`compute_mask_indices` (static spans, overlap allowed, min_masks 2)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from omnissl.ssl.masking import span_mask


def naive_fairseq_mask(lengths: list[int], n: int, p: float, span: int, min_spans: int, rng) -> np.ndarray:
    """One row at a time, as fairseq data_utils.compute_mask_indices (mask_type static, no_overlap False,
    require_same_masks False)."""
    out = np.zeros((len(lengths), n), dtype=bool)
    for b, t in enumerate(lengths):
        num = max(min_spans, int(p * t / span + rng.random()))
        high = t - span if t - span > num else num + 1
        starts = rng.choice(high, num, replace=False)
        idx = np.unique((starts[:, None] + np.arange(span)[None]).ravel())
        out[b, idx[idx < t]] = True
    return out


def test_realized_fraction_matches_fairseq_statistics():
    # p = 0.65, span 10: fairseq masks ~1 - (1 - 0.065)^10 = 49 % of frames; edge effects at 500 frames
    # pull both implementations a little lower. Tolerance: |ours - naive| <= 0.01 and both in [0.47, 0.51].
    b, n = 256, 500
    g = torch.Generator().manual_seed(0)
    ours = span_mask((b, n), mask_prob=0.65, span=10, same_count=False, generator=g).float().mean().item()
    ref = naive_fairseq_mask([n] * b, n, 0.65, 10, 2, np.random.default_rng(0)).mean()
    assert 0.47 <= ours <= 0.51, ours
    assert 0.47 <= ref <= 0.51, ref
    assert abs(ours - ref) <= 0.01, (ours, ref)


def test_span_count_distribution_matches_fairseq():
    # the number of span starts per row is max(2, int(p*T/span + U)) in both: compare the masked-count means
    lengths = [37, 80, 155, 300]
    g = torch.Generator().manual_seed(1)
    pad = torch.arange(300)[None] >= torch.tensor(lengths)[:, None]
    ours = torch.stack([span_mask((4, 300), padding_mask=pad, same_count=False, generator=g).sum(1)
                        for _ in range(300)]).float().mean(0)
    rng = np.random.default_rng(1)
    ref = np.stack([naive_fairseq_mask(lengths, 300, 0.65, 10, 2, rng).sum(1) for _ in range(300)]).mean(0)
    assert np.allclose(ours.numpy(), ref, rtol=0.05), (ours, ref)


def test_padding_never_masked_and_equal_counts():
    lengths = torch.tensor([120, 64, 33, 90])
    n = 120
    pad = torch.arange(n)[None] >= lengths[:, None]
    for seed in range(20):
        m = span_mask((4, n), padding_mask=pad, generator=torch.Generator().manual_seed(seed))
        assert not (m & pad).any()
        counts = m.sum(1)
        assert (counts == counts[0]).all() and counts[0] >= 2


def test_min_spans_on_short_rows():
    # 12 frames: int(0.65 * 12 / 10 + U) <= 1 < min_spans, so 2 spans are drawn
    m = span_mask((64, 12), same_count=False, generator=torch.Generator().manual_seed(0))
    assert (m.sum(1) >= 10).all()  # two spans of 10 within 12 frames cover at least 10


def test_reproducible_for_a_seeded_generator():
    a = span_mask((8, 200), generator=torch.Generator().manual_seed(3))
    b = span_mask((8, 200), generator=torch.Generator().manual_seed(3))
    c = span_mask((8, 200), generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_rows_too_short_raise():
    pad = torch.arange(20)[None] >= torch.tensor([20, 2])[:, None]
    with pytest.raises(ValueError, match="rows \\[1\\]"):
        span_mask((2, 20), padding_mask=pad, generator=torch.Generator().manual_seed(0))
