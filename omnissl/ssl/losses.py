"""Losses shared by objectives. Each returns a *sum* over predicted positions and the number of positions,
so SSLModule.normalize can divide by the global count (fairseq's convention).

Legend: B batch, N tokens, D width, M predicted positions.
"""

from __future__ import annotations

import torch
from torch import Tensor


def masked_mse(pred: Tensor, target: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Squared error averaged over the last dim, summed over positions where mask is True.

    pred, target (B, N, D); mask (B, N) bool -> (loss_sum, count). Computed in fp32.
    """
    if pred.shape != target.shape or mask.shape != pred.shape[:2]:
        raise ValueError(f"pred {tuple(pred.shape)}, target {tuple(target.shape)}, mask {tuple(mask.shape)} disagree")
    err = (pred.float() - target.float()).pow(2).mean(-1)
    return (err * mask).sum(), mask.sum()
