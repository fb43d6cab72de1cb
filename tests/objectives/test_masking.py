"""Span masking (omnissl.ssl.masking.span_mask) against a naive per-row reference of fairseq's
`compute_mask_indices` (static spans, overlap allowed, min_masks 2)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from omnissl.ssl.masking import check_span_args, span_mask


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
    # 13 frames, the fewest wav2vec 2.0's settings accept: int(0.65 * 13 / 10 + U) <= 1 < min_spans, so 2
    # spans are drawn, from starts in [0, 3)
    m = span_mask((64, 13), same_count=False, generator=torch.Generator().manual_seed(0))
    assert (m.sum(1) >= 10).all()  # two spans of 10 within 13 frames cover at least 10
    assert not m[:, -1].any()


@pytest.mark.parametrize("p,span,min_spans", [(0.65, 10, 2), (0.8, 10, 2), (0.65, 10, 1), (0.5, 3, 0)])
def test_no_row_is_ever_masked_whole(p, span, min_spans):
    """fairseq raises "the entire sequence is masked"; rows short enough for that (12 frames with span 10 and 2
    spans: one draw in three before the fix, which then capped every row of the batch at ~11 masked frames
    through same_count) are refused by name, and every row `check_span_args` accepts keeps a frame."""
    fewest = check_span_args(p, span, min_spans, min_frames=1)
    n = fewest + 40
    lengths = torch.arange(fewest, n + 1)
    pad = torch.arange(n)[None] >= lengths[:, None]
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        m = span_mask((len(lengths), n), padding_mask=pad, mask_prob=p, span=span, min_spans=min_spans,
                      same_count=False, generator=g)
        assert (m.sum(1) < lengths).all()
    short = torch.arange(n)[None] >= torch.tensor([n, fewest - 1])[:, None]
    with pytest.raises(ValueError, match=f"rows \\[1\\] have \\[{fewest - 1}\\] frames.*at least {fewest}"):
        span_mask((2, n), padding_mask=short, mask_prob=p, span=span, min_spans=min_spans, generator=g)


def test_objectives_need_the_frames_that_keep_a_row_unmasked():
    assert check_span_args(0.65, 10, 2) == 13  # wav2vec 2.0, data2vec audio: 12 frames could be masked whole
    assert check_span_args(0.8, 10, 2) == 13  # HuBERT
    assert check_span_args(0.65, 10, 2, min_frames=99) == 99


def test_reproducible_for_a_seeded_generator():
    a = span_mask((8, 200), generator=torch.Generator().manual_seed(3))
    b = span_mask((8, 200), generator=torch.Generator().manual_seed(3))
    c = span_mask((8, 200), generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_rows_too_short_raise():
    pad = torch.arange(20)[None] >= torch.tensor([20, 2])[:, None]
    with pytest.raises(ValueError, match="rows \\[1\\]"):
        span_mask((2, 20), padding_mask=pad, generator=torch.Generator().manual_seed(0))


def test_random_keep_masks_every_padded_row_at_its_own_rate():
    """MAE `random_masking` keeps int(T·(1 - r)) of each row's own T tokens. Before the fix every row kept
    int(T_min·(1 - r)), so the 64-token row of this batch lost 60 of 64 tokens (94 %) instead of 48 (75 %);
    now rows keep the same total by also keeping padding, which the encoder still treats as padding."""
    from omnissl.ssl.masking import random_keep

    lengths = torch.tensor([64, 32, 16, 61])
    n = 64
    pad = torch.arange(n)[None] >= lengths[:, None]
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        keep = random_keep((4, n), mask_ratio=0.75, padding_mask=pad, generator=g)
        kept_valid = (keep & ~pad).sum(1)
        assert kept_valid.tolist() == [16, 8, 4, 15]  # int(T / 4)
        assert (keep.sum(1) == 16).all()  # equal counts, the longest row's
        masked = ~keep & ~pad
        assert (masked.sum(1) == lengths - kept_valid).all()
    assert torch.equal(random_keep((3, n), generator=torch.Generator().manual_seed(1)).sum(1), torch.full((3,), 16))
    with pytest.raises(ValueError, match="keeps no token"):
        random_keep((4, n), mask_ratio=0.95, padding_mask=pad, generator=g)


def test_mae_runs_on_a_padded_spectrogram_batch_with_per_row_masks():
    from omnissl.backbones.builders import tiny
    from omnissl.batch import Batch
    from omnissl.ssl.mae import MAE

    torch.manual_seed(0)
    model = MAE(tiny("spectrogram"), modality="audio", mask_ratio=0.8, decoder_dim=32, decoder_depth=1,
                decoder_heads=4)
    x = torch.randn(2, 32000) * 0.1
    x[1, 12000:] = 0
    out = model.step(Batch({"audio": x}, {"audio": torch.tensor([32000, 12000])}, {}, torch.arange(2)))
    assert torch.isfinite(out.loss)
