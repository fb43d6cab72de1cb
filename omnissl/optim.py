"""Parameter groups for weight decay, decided by parameter name before any sharding wraps the model, and
the global loss normalization of fairseq's convention."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

# Substrings of parameter names that never get weight decay besides norms and biases: positions, the mask
# embedding, the CLS token, codebooks, logit scales.
NO_DECAY_NAMES = ("positions", "pos_embed", "mask_emb", "cls_token", "codebook", "logit_scale", "label_embs")


def no_decay(name: str, param: Tensor) -> bool:
    """True for biases, norm weights and other 1-D parameters, and the named embeddings above."""
    return param.ndim <= 1 or name.endswith(".bias") or any(key in name for key in NO_DECAY_NAMES)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: decayed weights and the rest. Frozen parameters are left out."""
    decay, keep = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (keep if no_decay(name, p) else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": keep, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def global_normalize(loss_sum: Tensor, count: Tensor, gathered_counts: Tensor, world_size: int) -> Tensor:
    """Turn a per-rank *sum* over predicted positions into the gradient of the global mean.

    Data-parallel strategies average gradients over ranks, so each rank scales its sum by
    world_size / (positions summed over all ranks); the global gradient is then that of
    sum_over_ranks(loss_sum) / sum_over_ranks(count) exactly, however unevenly positions fall per rank.
    `gathered_counts` holds every rank's count (e.g. LightningModule.all_gather(count)).
    """
    total = gathered_counts.sum().clamp(min=1)
    return loss_sum * (world_size / total.to(loss_sum.dtype))


def grad_norm(parameters: Iterable[Tensor]) -> Tensor:
    """L2 norm of all present gradients (for logging)."""
    norms = [p.grad.detach().float().norm() for p in parameters if p.grad is not None]
    return torch.stack(norms).norm() if norms else torch.tensor(0.0)
