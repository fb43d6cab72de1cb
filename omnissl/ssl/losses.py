"""Losses shared by objectives. Each returns a *sum* over predicted positions and the number of positions,
so SSLModule.normalize can divide by the global count (fairseq's convention).

Legend: B batch, N tokens, D width, M predicted positions.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def masked_mse(pred: Tensor, target: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Squared error averaged over the last dim, summed over positions where mask is True.

    pred, target (B, N, D); mask (B, N) bool -> (loss_sum, count). Computed in fp32.
    """
    if pred.shape != target.shape or mask.shape != pred.shape[:2]:
        raise ValueError(f"pred {tuple(pred.shape)}, target {tuple(target.shape)}, mask {tuple(mask.shape)} disagree")
    err = (pred.float() - target.float()).pow(2).mean(-1)
    return (err * mask).sum(), mask.sum()


def sample_distractors(
    batch: int,
    num_masked: int,
    num: int,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Indices of `num` distractors for each of `num_masked` predicted frames per row: (B, M, K) int64.

    Drawn uniformly with replacement from the *other* predicted frames of the same row (wav2vec 2.0,
    fairseq `sample_negatives`): draw j in [0, M - 1) and shift j >= i up by one, so frame i never draws
    itself and every other frame keeps probability 1 / (M - 1).
    """
    if num_masked < 2:
        raise ValueError(f"distractors need at least 2 predicted frames per row, got {num_masked}")
    j = torch.randint(0, num_masked - 1, (batch, num_masked, num), generator=generator, device=device)
    i = torch.arange(num_masked, device=j.device)[None, :, None]
    return j + (j >= i).long()


def contrastive_with_distractors(
    pred: Tensor,
    target: Tensor,
    *,
    num_distractors: int = 100,
    temperature: float = 0.1,
    generator: torch.Generator | None = None,
    distractors: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """wav2vec 2.0's contrastive loss (Baevski et al. 2020, eq. 3): for each predicted frame, InfoNCE of
    cos(pred_i, target_i) / κ against K distractor targets drawn from the other predicted frames of the same
    row (`sample_distractors`). Distractors equal to the true target get logit -inf (fairseq
    `compute_preds`). Cosines, logits and the cross-entropy (target index 0, reduction sum) run in fp32.

    pred, target (B, M, D); distractors (B, M, K) indices into M, drawn when None.
    Returns (loss_sum, count = B·M, correct = frames whose positive beats every distractor strictly).

    NOTE(ref): fairseq and HF gather a (K+1, B, M, D) tensor of negatives and take K+1 cosines per frame;
    we take all M x M cosines per row with one batched matmul and gather the K we need (same values and
    gradients, memory O(B·M·(M+K)) instead of O(B·M·K·D)).
    NOTE(ref): fairseq counts a frame correct when argmax is the positive and argmin is not (all-equal
    logits); "strictly above every distractor" is the same except for exact ties, which count as wrong here.
    """
    if pred.shape != target.shape or pred.dim() != 3:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} must both be (B, M, D)")
    b, m, d = pred.shape
    if distractors is None:
        distractors = sample_distractors(b, m, num_distractors, generator=generator, device=pred.device)
    with torch.autocast(device_type=pred.device.type, enabled=False):
        p = torch.nn.functional.normalize(pred.float(), dim=-1, eps=1e-8)
        t = torch.nn.functional.normalize(target.float(), dim=-1, eps=1e-8)
        sim = torch.bmm(p, t.transpose(1, 2))  # (B, M, M): sim[b, i, j] = cos(pred_i, target_j)
        pos = sim.diagonal(dim1=1, dim2=2)  # (B, M)
        neg = sim.gather(2, distractors)  # (B, M, K)
        with torch.no_grad():
            # exact equality of target vectors, via ids of the unique rows
            _, ids = torch.unique(target.detach().reshape(b * m, d), dim=0, return_inverse=True)
            ids = ids.view(b, m)
            same = torch.gather(ids, 1, distractors.flatten(1)).view_as(distractors) == ids[..., None]
        neg = neg.masked_fill(same, float("-inf"))
        logits = torch.cat([pos[..., None], neg], dim=-1) / temperature  # (B, M, 1 + K)
        zeros = torch.zeros(b * m, dtype=torch.long, device=pred.device)
        loss_sum = torch.nn.functional.cross_entropy(logits.flatten(0, 1), zeros, reduction="sum")
        with torch.no_grad():
            correct = (pos[..., None] > neg).all(-1).sum()
    return loss_sum, torch.tensor(b * m, device=pred.device), correct


def cosine_cross_entropy(
    pred: Tensor,
    classes: Tensor,
    labels: Tensor,
    *,
    temperature: float = 0.1,
) -> tuple[Tensor, Tensor, Tensor]:
    """HuBERT's prediction loss (Hsu et al. 2021, eq. 1; fairseq `compute_nce`): logits cos(pred, e_c) / τ
    against every class embedding e_c, cross-entropy with the true class, reduction sum, in fp32.

    pred (P, D) projected frames, classes (K, D) class embeddings, labels (P,) int64 in [0, K).
    Returns (loss_sum, count P, correct = argmax hits).
    """
    if pred.dim() != 2 or classes.dim() != 2 or pred.shape[1] != classes.shape[1] or labels.shape != pred.shape[:1]:
        raise ValueError(
            f"pred {tuple(pred.shape)} must be (P, D), classes {tuple(classes.shape)} (K, D), labels "
            f"{tuple(labels.shape)} (P,)"
        )
    with torch.autocast(device_type=pred.device.type, enabled=False):
        p = torch.nn.functional.normalize(pred.float(), dim=-1, eps=1e-8)
        c = torch.nn.functional.normalize(classes.float(), dim=-1, eps=1e-8)
        logits = p @ c.t() / temperature  # (P, K)
        loss_sum = torch.nn.functional.cross_entropy(logits, labels, reduction="sum")
        with torch.no_grad():
            correct = (logits.argmax(-1) == labels).sum()
    return loss_sum, torch.tensor(labels.numel(), device=pred.device), correct


def regression_loss(pred: Tensor, target: Tensor, *, beta: float, scale: float) -> Tensor:
    """data2vec's regression loss, summed over positions and channels, in fp32: L2 (beta 0) or
    Smooth-L1(beta), times `scale`."""
    p, t = pred.float(), target.float()
    if beta == 0:
        err = F.mse_loss(p, t, reduction="none")
    else:
        err = F.smooth_l1_loss(p, t, reduction="none", beta=beta)
    return err.sum() * scale


@torch.no_grad()
def loss_vs_zero(loss_sum: Tensor, target: Tensor, *, beta: float, scale: float) -> Tensor:
    """The regression loss relative to predicting zeros, the per-sample mean of normalized targets (< 1: the
    student predicts more than the trivial answer; a shrinking-prediction phase alone cannot bring it below 1)."""
    zero = regression_loss(torch.zeros_like(target), target, beta=beta, scale=scale)
    return loss_sum.detach().float() / zero.clamp(min=1e-12)


def feature_penalty(raw: Tensor, padding_mask: Tensor | None) -> Tensor:
    """wav2vec 2.0 / HuBERT's feature penalty: mean(z²) over valid frames of the frontend output before its
    LayerNorm, in fp32. raw (B, N, C), padding_mask (B, N) True at padding or None -> scalar.

    NOTE(ref): fairseq averages over padded frames too; we average over valid frames only, so the
    penalty of an utterance does not depend on what it was batched with.
    """
    sq = raw.float().pow(2).mean(-1)  # (B, N)
    if padding_mask is None:
        return sq.mean()
    valid = (~padding_mask).float()
    return (sq * valid).sum() / valid.sum().clamp(min=1.0)


# ------------------------------------------------------------------------------------------------------------
# Contrastive language-audio (CLAP) / CLIP: the one gather across ranks (DESIGN "Rules that keep it correct")


def gather_with_grad(x: Tensor) -> tuple[Tensor, int]:
    """Every rank's rows of `x` (B_r, ...) concatenated in rank order -> (all rows (ΣB_r, ...), this rank's
    offset). Autograd-aware (torch.distributed.nn.functional.all_gather): the gradient reaching each rank's
    slice is the sum over all ranks of the gradients of their losses with respect to it, so summing the local
    losses over ranks is differentiating the loss of the global batch (open_clip `gather_with_grad`, and its
    `local_loss` labels). Ranks may hold different row counts (padded for the collective, then stripped).
    Without an initialized process group (one process), `x` itself and offset 0."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x, 0
    from torch.distributed.nn.functional import all_gather

    world, rank = dist.get_world_size(), dist.get_rank()
    size = torch.tensor([x.shape[0]], device=x.device, dtype=torch.long)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    counts = [int(s) for s in sizes]
    most = max(counts)
    padded = x if x.shape[0] == most else torch.cat([x, x.new_zeros(most - x.shape[0], *x.shape[1:])])
    parts = all_gather(padded.contiguous())
    return torch.cat([p[:n] for p, n in zip(parts, counts)]), sum(counts[:rank])


def contrastive_pairs(
    a: Tensor,
    b: Tensor,
    log_scale: Tensor,
    *,
    max_scale: float = 100.0,
    gather: bool = True,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """CLIP / CLAP's symmetric InfoNCE (Radford et al. 2021; Wu et al. 2023, LAION-CLAP `ClipLoss`) over the
    pairs (a_i, b_i): logits s·â_i·b̂_jᵀ over every b_j of the global batch (negatives gathered from all ranks,
    `gather_with_grad`), cross-entropy with the partner, in both directions:

        loss_sum = ½ Σ_{i local} [CE(s·â_i B̂ᵀ, i + offset) + CE(s·b̂_i Âᵀ, i + offset)]

    a, b (B, D) this rank's pairs (L2-normalized here); log_scale: the learnable log of s, used clamped to
    [0, ln max_scale] (LAION clamps the parameter to the same range after each step). Features, logits and the
    cross-entropy are fp32. Returns (loss_sum, count B, correct a->b, correct b->a), the corrects counting
    local rows whose partner has the highest logit. Summed over ranks and divided by the global count this is
    the loss of the global batch, gradients included (SSLModule.normalize does exactly that).
    """
    if a.dim() != 2 or a.shape != b.shape:
        raise ValueError(f"a {tuple(a.shape)} and b {tuple(b.shape)} must both be (B, D)")
    with torch.autocast(device_type=a.device.type, enabled=False):
        a = F.normalize(a.float(), dim=-1, eps=1e-8)
        b = F.normalize(b.float(), dim=-1, eps=1e-8)
        scale = log_scale.float().clamp(0.0, math.log(max_scale)).exp()
        all_a, offset = gather_with_grad(a) if gather else (a, 0)
        all_b, _ = gather_with_grad(b) if gather else (b, 0)
        labels = torch.arange(a.shape[0], device=a.device) + offset
        logits_ab = scale * a @ all_b.t()  # (B, ΣB)
        logits_ba = scale * b @ all_a.t()
        loss_sum = 0.5 * (F.cross_entropy(logits_ab, labels, reduction="sum")
                          + F.cross_entropy(logits_ba, labels, reduction="sum"))
        with torch.no_grad():
            correct_ab = (logits_ab.argmax(-1) == labels).sum()
            correct_ba = (logits_ba.argmax(-1) == labels).sum()
    return loss_sum, torch.tensor(a.shape[0], device=a.device), correct_ab, correct_ba
