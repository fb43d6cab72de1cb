"""Parameter groups for weight decay, decided by parameter name before any sharding wraps the model, and
fairseq's loss normalization by the update's global count (summed losses, gradients scaled per update)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

# Substrings of parameter names that never get weight decay besides norms and biases: positions, the mask
# embedding, the CLS token, codebooks, logit scales.
# NOTE(ref): these exemptions are the convention of the ViT-family references (MAE's `add_weight_decay`, BEiT /
# data2vec vision's `no_weight_decay` for positions and CLS) and of fairseq's `composite` optimizer groups; fairseq's
# plain `adam` (wav2vec 2.0, HuBERT, data2vec v1, data2vec 2.0 audio) decays every parameter at 0.01. We keep one
# rule for every objective because decaying norms, biases, codebooks and label embeddings toward 0 has no use in
# any of them (the codebook and label embeddings are compared by cosine, norms are scales); its effect on the
# audio objectives has not been measured against decaying everything (see issue 16).
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


class _SumGradient(torch.autograd.Function):
    """Forward: `value`; backward: the incoming gradient goes to `loss_sum` unchanged."""

    @staticmethod
    def forward(ctx, loss_sum: Tensor, value: Tensor) -> Tensor:  # type: ignore[override]
        ctx.dtype = loss_sum.dtype
        return value.clone()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return grad.to(ctx.dtype), None


def sum_gradient(loss_sum: Tensor, count: Tensor) -> Tensor:
    """A scalar whose value is the mean `loss_sum / count` (what is logged) and whose gradient is that of
    `loss_sum` itself: the sum is backpropagated and the gradients are divided by the whole update's count
    afterwards (`update_grad_scale`), as fairseq's trainer does (`multiply_grads(1 / sample_size)`)."""
    return _SumGradient.apply(loss_sum, loss_sum.detach().float() / count.float().clamp(min=1))


def update_grad_scale(total_count: Tensor, accumulate: int, world_size: int) -> float:
    """The factor that turns accumulated gradients of summed losses into the gradient of the update's mean.

    Lightning divides each micro-batch's loss by `accumulate` and data-parallel strategies average gradients
    over `world_size` ranks, so the gradients hold sum_over(ranks, micro-batches) grad(loss_sum) /
    (accumulate * world_size); multiplying by accumulate * world_size / total_count (the positions summed
    over every rank and micro-batch of the update) leaves sum grad(loss_sum) / total_count: fairseq's
    normalization by the update's `sample_size`, however unevenly positions fall per micro-batch or rank.
    """
    return accumulate * world_size / max(float(total_count), 1.0)


def grad_norm(parameters: Iterable[Tensor]) -> Tensor:
    """L2 norm of all present gradients (for logging)."""
    norms = [p.grad.detach().float().norm() for p in parameters if p.grad is not None]
    return torch.stack(norms).norm() if norms else torch.tensor(0.0)
