"""The explicit CPU attention (training with attention dropout) also serves padded batches: with a key-padding
mask it must equal torch's SDPA (same dropout draws for the same seed), values and gradients, and a row with
no key to attend to must stay finite."""

from __future__ import annotations

import torch

from omnissl.backbones.transformer import Attention


def test_explicit_cpu_dropout_attention_with_a_padding_mask_equals_sdpa():
    torch.manual_seed(0)
    attn = Attention(64, 4, dropout=0.25).train()
    x = torch.randn(3, 16, 64, requires_grad=True)
    mask = (torch.arange(16)[None] < torch.tensor([16, 9, 12])[:, None])[:, None, None, :]
    outs, grads = [], []
    for explicit in (True, False):
        attn.explicit_cpu_dropout = explicit
        torch.manual_seed(5)
        y = attn(x, mask)
        (gx,) = torch.autograd.grad(y.pow(2).sum(), x)
        outs.append(y.detach())
        grads.append(gx)
    assert (outs[0] - outs[1]).abs().max() <= 1e-6
    assert (grads[0] - grads[1]).abs().max() <= 1e-5 * grads[1].abs().max()
    attn.explicit_cpu_dropout = True
    torch.manual_seed(5)
    unmasked = attn(x, None).detach()
    assert (unmasked[1] - outs[1][1]).abs().max() > 1e-2  # the mask is applied: without it row 1 differs
    empty = torch.zeros_like(mask)
    empty[0] = True  # rows 1 and 2 attend to no key at all
    assert bool(torch.isfinite(attn(x, empty)).all())
