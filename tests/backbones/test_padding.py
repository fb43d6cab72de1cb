"""Padding never leaks: an item's outputs at its real positions are the same in a right-padded batch as alone.

Covers every `tiny` builder whose input has a length (audio waveforms, log-mel spectrogram patches of audio,
token ids); images have no padding. The padded region holds noise (audio) or random token ids given explicit
lengths, so any read past a length (conv statistics, attention, positions) shows up.
"""

from __future__ import annotations

import pytest
import torch

from omnissl.backbones.builders import tiny

ATOL = 1e-5
AUDIO_LENGTHS = [6000, 3700, 2000]  # samples at 16 kHz; the shortest is above one spectrogram patch (880)
TEXT_LENGTHS = [23, 11, 4]


def _batch(modality: str, explicit_lengths: bool):
    g = torch.Generator().manual_seed(0)
    if modality == "text":
        lengths = torch.tensor(TEXT_LENGTHS)
        x = torch.randint(2, 1024, (len(lengths), max(TEXT_LENGTHS)), generator=g)
        pad = torch.arange(x.shape[1])[None] >= lengths[:, None]
        # Implicit lengths come from the pad id (1); explicit ones must ignore whatever the padding holds.
        x[pad] = torch.randint(2, 1024, (int(pad.sum()),), generator=g) if explicit_lengths else 1
    else:
        lengths = torch.tensor(AUDIO_LENGTHS)
        x = torch.randn(len(lengths), max(AUDIO_LENGTHS), generator=g)
    return x, lengths if explicit_lengths or modality != "text" else None, lengths


@pytest.mark.parametrize("pre_norm", [False, True], ids=["post_ln", "pre_ln"])
@pytest.mark.parametrize(
    "modality, explicit_lengths",
    [("audio", True), ("spectrogram", True), ("text", False), ("text", True)],
)
def test_real_positions_equal_padded_and_alone(modality, explicit_lengths, pre_norm):
    torch.manual_seed(0)
    encoder = tiny(modality, pre_norm=pre_norm).eval()
    x, lengths, true_lengths = _batch(modality, explicit_lengths)
    with torch.no_grad():
        padded = encoder(x, lengths)
        assert padded.padding_mask is not None
        for b, t in enumerate(true_lengths.tolist()):
            alone = encoder(x[b : b + 1, :t])
            n = alone.last.shape[1]
            assert alone.padding_mask is None
            assert not padded.padding_mask[b, :n].any() and padded.padding_mask[b, n:].all()
            assert len(padded.layers) == len(alone.layers) == encoder.num_layers + 1
            for i, (p, a) in enumerate(zip(padded.layers, alone.layers)):
                diff = (p[b, :n] - a[0]).abs().max().item()
                assert diff <= ATOL, f"item {b} layer {i}: padded vs alone differ by {diff:.3g}"
            diff = (padded.last[b, :n] - alone.last[0]).abs().max().item()
            assert diff <= ATOL, f"item {b} last: padded vs alone differ by {diff:.3g}"
