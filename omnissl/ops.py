"""Padding-aware tensor operations shared by every layer above (backbones, parts, objectives, evaluation).

Conventions: a padding mask is (B, N) bool, True at padding (None when nothing is padded); `valid` is its
complement. Statistics over padded sequences are computed in fp32 over valid positions only.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor


def padding_mask_from_lengths(lengths: Tensor | None, n: int) -> Tensor | None:
    """(B,) valid lengths -> (B, N) bool True at padding, or None when nothing is padded."""
    if lengths is None or bool((lengths >= n).all()):
        return None
    return torch.arange(n, device=lengths.device)[None] >= lengths[:, None]


def take_rows(x: Tensor, idx: Tensor) -> Tensor:
    """x (B, N, D), idx (B, Q) int64 -> the rows of x at idx, (B, Q, D) (one gather)."""
    return torch.gather(x, 1, idx[..., None].expand(-1, -1, x.shape[-1]))


def segment_runs(segments: Tensor, padding_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Packed rows: segments (B, N) int ids, one contiguous run per segment (a document packed into the row)
    -> (runs (B, N) int64: 0, 1, ... per run, -1 at padding; positions (B, N) int64: the index of each token
    inside its run, restarting at 0 where a run begins). Two runs with the same id are two segments."""
    b, n = segments.shape
    change = F.pad(segments[:, 1:] != segments[:, :-1], (1, 0), value=True)  # (B, N) True where a run begins
    runs = change.long().cumsum(1) - 1
    idx = torch.arange(n, device=segments.device).expand(b, n)
    positions = idx - torch.cummax(torch.where(change, idx, 0), dim=1).values
    if padding_mask is not None:
        runs = runs.masked_fill(padding_mask, -1)
    return runs, positions


def mean_pool(x: Tensor, padding_mask: Tensor | None, prefix: int = 0) -> Tensor:
    """(B, N, D) tokens -> (B, D) mean over valid tokens; the first `prefix` tokens (CLS) are left out.
    padding_mask (B, N) bool, True at padding, or None. Computed in fp32."""
    x = x[:, prefix:].float()
    if padding_mask is None:
        return x.mean(1)
    valid = (~padding_mask[:, prefix:]).float()[..., None]  # (B, N - prefix, 1)
    return (x * valid).sum(1) / valid.sum(1).clamp(min=1.0)


def masked_instance_norm(x: Tensor, valid: Tensor | None, eps: float = 1e-5) -> Tensor:
    """x (B, N, D) fp32 normalized over N per (B, D), over valid positions only (valid (B, N) bool)."""
    if valid is None:
        return rearrange(F.instance_norm(rearrange(x, "b n d -> b d n"), eps=eps), "b d n -> b n d")
    w = valid[..., None].to(x.dtype)
    count = w.sum(1, keepdim=True).clamp(min=1.0)
    mean = (x * w).sum(1, keepdim=True) / count
    var = ((x - mean).pow(2) * w).sum(1, keepdim=True) / count  # biased, as F.instance_norm
    return (x - mean) / (var + eps).sqrt() * w


def first_nonfinite(named: Iterable[tuple[str, Tensor]]) -> str | None:
    """The name of the first tensor of `named` holding a NaN or an infinity, as 'name (k of n values)', or
    None when all are finite. One device synchronization for the common all-finite case."""
    named = [(name, t.to_local() if hasattr(t, "to_local") else t) for name, t in named]  # FSDP2: own shard
    named = [(name, t.detach()) for name, t in named if t.is_floating_point() and t.numel()]
    if not named or bool(torch.stack([torch.isfinite(t).all() for _, t in named]).all()):
        return None
    for name, t in named:
        bad = int((~torch.isfinite(t)).sum())
        if bad:
            return f"{name} ({bad} of {t.numel()} values)"
    return None
