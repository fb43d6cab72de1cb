"""Padding-aware tensor operations shared by every layer above (backbones, parts, objectives, evaluation).

Conventions: a padding mask is (B, N) bool, True at padding (None when nothing is padded); `valid` is its
complement. Statistics over padded sequences are computed in fp32 over valid positions only.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn


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


# ---------------------------------------------------------------------------------------------------------
# Dropout. On the CPU torch has no fused dropout: `F.dropout` draws a float Bernoulli mask element by element
# (aten::bernoulli_, ~5 ns per value on the 2-core Xeon), divides it by 1 - p and multiplies (three passes),
# which made dropout the largest non-GEMM cost of a training step (bench/profile_step.py: 15 % of the trunk's
# bf16 step). CUDA's dropout is one fused kernel and is used there unchanged.

fast_cpu_dropout = True  # switch: False makes `dropout` exactly `F.dropout` on every device


class _CPUDropout(torch.autograd.Function):
    """x * m with m = keep / (1 - p), keep ~ Bernoulli(1 - p) from 16 random bits per value."""

    @staticmethod
    def forward(ctx, x: Tensor, p: float, threshold: int) -> Tensor:
        n = x.numel()
        # one 64-bit draw of torch's own generator (so torch.manual_seed and the per-step seeding of SSLModule
        # govern it) per 4 values: random_(-2**63, None) is the full 64-bit range, every 16-bit word uniform
        words = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device).random_(-(2**63), None)
        words = words.view(torch.int16)[:n].view(x.shape)
        m = words.float().lt_(threshold).mul_(1.0 / (1.0 - p))  # in place on the float copy: 3 cheap passes
        m = m if x.dtype == torch.float32 else m.to(x.dtype)  # (bf16: the same rounded 1/(1-p) as F.dropout)
        ctx.save_for_backward(m)
        return x * m

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        (m,) = ctx.saved_tensors
        return grad * m, None, None


def dropout(x: Tensor, p: float, training: bool = True) -> Tensor:
    """`F.dropout(x, p, training)`, ~3x faster forward + backward on the CPU (fp32 or bf16, bench/cpu_kernels.py).

    NOTE(ref): on the CPU the keep decision is 16 random bits below round((1 - p) * 65536), so the keep
    probability is (1 - p) to within 2^-17 (0.9 -> 0.899994); the draws differ from F.dropout's for the same
    seed (same distribution, independent values, the same 1/(1-p) scaling). CUDA, other devices, p outside
    (2^-17, 1 - 2^-17), non-float inputs, `torch.compile` (which fuses its own) and `fast_cpu_dropout = False`
    take `F.dropout`."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability must be in [0, 1], got {p}")
    if not training or p == 0.0:
        return x
    threshold = round((1.0 - p) * 65536) - 32768  # keep iff the signed 16-bit word < threshold
    if (not fast_cpu_dropout or x.device.type != "cpu" or not x.is_floating_point() or x.dtype == torch.float64
            or not -32768 < threshold < 32768 or torch.compiler.is_compiling()):
        return F.dropout(x, p, training=True)
    return _CPUDropout.apply(x, p, threshold)


class Dropout(nn.Dropout):
    """`nn.Dropout` through `dropout` (the fast CPU mask); the same `p`, state and repr."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x) if self.inplace else dropout(x, self.p, self.training)
