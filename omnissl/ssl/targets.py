"""Frame-level unit targets (HuBERT's k-means units): align a batch's units to the encoder frames.

Legend: B batch, N encoder frames, F unit frames.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from omnissl.batch import IGNORE_INDEX


def unit_lengths(units: Tensor) -> Tensor:
    """(B, F) units padded with IGNORE_INDEX -> (B,) number of labelled frames per row."""
    return (units != IGNORE_INDEX).sum(1)


def align_units(
    units: Tensor,
    frames: Tensor,
    num_frames: int,
    *,
    tolerance: int = 2,
    ids: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Align frame-level units to encoder frames (HuBERT, Hsu et al. 2021; fairseq `forward_targets`).

    units (B, F) int64 at the encoder frame rate, padded with IGNORE_INDEX; frames (B,) valid encoder frames
    per row; num_frames the padded encoder length N. Each row keeps min(frames, units) frames: frames past
    the last unit get IGNORE_INDEX (the caller treats them as padding, as fairseq trims them), units past
    the last frame are dropped. Rows whose counts differ by more than `tolerance` frames are an error
    naming the sample ids: the units were made for other audio or another frame rate.

    Returns (labels (B, N) int64 with IGNORE_INDEX where nothing is predicted, aligned lengths (B,)).
    """
    if units.dim() != 2:
        raise ValueError(f"units must be (B, F), got shape {tuple(units.shape)}")
    have = unit_lengths(units)
    diff = (have - frames).abs()
    bad = diff > tolerance
    if bool(bad.any()):
        rows = bad.nonzero().flatten()
        names = rows.tolist() if ids is None else ids[rows].tolist()
        raise ValueError(
            f"units and encoder frames disagree by more than {tolerance} frames for samples {names}: "
            f"{have[rows].tolist()} units vs {frames[rows].tolist()} frames; the unit file was made for other "
            "audio or another frame rate (units must be at the encoder's samples_per_token)"
        )
    keep = torch.minimum(have, frames)
    f = units.shape[1]
    labels = units[:, :num_frames] if f >= num_frames else F.pad(units, (0, num_frames - f), value=IGNORE_INDEX)
    pos = torch.arange(num_frames, device=units.device)[None]
    labels = labels.masked_fill(pos >= keep[:, None], IGNORE_INDEX)
    return labels, keep
