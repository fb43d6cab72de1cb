"""The trunk's attention paths agree: no mask (the fast path of an unpadded batch) vs an all-attend mask,
a padded batch still masks its padding, and the explicit CPU attention used in training with attention
dropout equals torch's SDPA (same dropout draws for the same seed, so with `ops.fast_cpu_dropout` off: the
fast CPU dropout draws other values, tests/backbones/test_dropout.py), values and gradients.
"""

from __future__ import annotations

import pytest
import torch

from omnissl import ops
from omnissl.backbones.transformer import Attention, Transformer


def _trunk(pre_norm: bool, **kw) -> Transformer:
    torch.manual_seed(0)
    return Transformer(dim=64, depth=3, heads=4, ffn_dim=128, pre_norm=pre_norm, **kw)


@pytest.mark.parametrize("pre_norm", [False, True], ids=["post_ln", "pre_ln"])
def test_unpadded_batch_without_mask_equals_all_attend_mask(pre_norm):
    trunk = _trunk(pre_norm).eval()
    x = torch.randn(3, 17, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        fast = trunk(x, None, return_layers=True)[1]
        masked = trunk(x, torch.zeros(3, 17, dtype=torch.bool), return_layers=True)[1]
    for i, (a, b) in enumerate(zip(fast, masked, strict=True)):
        assert (a - b).abs().max() <= 1e-6, f"layer {i}"


@pytest.mark.parametrize("pre_norm", [False, True], ids=["post_ln", "pre_ln"])
def test_padded_batch_still_masks(pre_norm):
    trunk = _trunk(pre_norm).eval()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 12, 64, generator=g)
    pad = torch.arange(12)[None] >= torch.tensor([12, 7])[:, None]
    noisy = x.clone()
    noisy[pad] = 100.0 * torch.randn(int(pad.sum()), 64, generator=g)  # whatever padding holds must not matter
    with torch.no_grad():
        out = trunk(noisy, pad)[0]
        alone = trunk(x[1:, :7], None)[0]
        unmasked = trunk(noisy, None)[0]
    assert (out[1, :7] - alone[0]).abs().max() <= 1e-5
    assert (unmasked[1, :7] - alone[0]).abs().max() > 1e-2  # the check can fail: without the mask it leaks


@pytest.fixture
def sdpa_draws(monkeypatch):
    """F.dropout's draws in the explicit path, the ones SDPA's math kernel makes for the same seed."""
    monkeypatch.setattr(ops, "fast_cpu_dropout", False)


def _explicit_and_sdpa(attn: Attention, x: torch.Tensor, mask: torch.Tensor | None):
    """(outputs, input gradients) of the explicit CPU path and of SDPA, each from dropout seed 5."""
    outs, grads = [], []
    for explicit in (True, False):
        attn.explicit_cpu = explicit
        torch.manual_seed(5)
        y = attn(x, mask)
        (gx,) = torch.autograd.grad(y.pow(2).sum(), x)
        outs.append(y.detach())
        grads.append(gx)
    attn.explicit_cpu = True
    return outs, grads


def test_explicit_cpu_attention_equals_sdpa(sdpa_draws):
    torch.manual_seed(0)
    attn = Attention(64, 4, dropout=0.25).train()
    x = torch.randn(3, 16, 64, requires_grad=True)
    outs, grads = _explicit_and_sdpa(attn, x, None)
    assert (outs[0] - outs[1]).abs().max() <= 1e-6
    assert (grads[0] - grads[1]).abs().max() <= 1e-5 * grads[1].abs().max()
    torch.manual_seed(6)
    assert (attn(x, None).detach() - outs[1]).abs().max() > 1e-3  # dropout is on: another seed differs


def test_explicit_cpu_attention_with_a_padding_mask_equals_sdpa(sdpa_draws):
    """It also serves padded batches: with a key-padding mask it equals SDPA, and a row with no key to attend
    to stays finite."""
    torch.manual_seed(0)
    attn = Attention(64, 4, dropout=0.25).train()
    x = torch.randn(3, 16, 64, requires_grad=True)
    mask = (torch.arange(16)[None] < torch.tensor([16, 9, 12])[:, None])[:, None, None, :]
    outs, grads = _explicit_and_sdpa(attn, x, mask)
    assert (outs[0] - outs[1]).abs().max() <= 1e-6
    assert (grads[0] - grads[1]).abs().max() <= 1e-5 * grads[1].abs().max()
    torch.manual_seed(5)
    unmasked = attn(x, None).detach()
    assert (unmasked[1] - outs[1][1]).abs().max() > 1e-2  # the mask is applied: without it row 1 differs
    empty = torch.zeros_like(mask)
    empty[0] = True  # rows 1 and 2 attend to no key at all
    assert bool(torch.isfinite(attn(x, empty)).all())


def test_training_trunk_drops_through_the_fast_cpu_dropout(monkeypatch):
    """Every dropout of a training trunk on the CPU (input, attention probabilities, the two residual
    branches of each block) takes ops.dropout's fast path; eval takes none."""
    calls = []
    apply = ops._CPUDropout.apply
    monkeypatch.setattr(ops._CPUDropout, "apply", lambda *a: calls.append(a[0].shape) or apply(*a))
    trunk = _trunk(False)
    trunk(torch.randn(2, 9, 64), None)
    assert len(calls) == 1 + 3 * 3 and calls.count((2, 4, 9, 9)) == 3  # attention: (B, H, N, N) per block
    calls.clear()
    trunk.eval()(torch.randn(2, 9, 64), None)
    assert calls == []


def test_bf16_training_takes_the_explicit_path_as_accurate_as_sdpa(monkeypatch):
    """Under bf16 autocast with gradients the CPU attention core is the explicit math (SDPA's CPU flash backward
    is the slow one there): its values and gradients are as close to the fp32 result as SDPA's bf16 ones; in
    fp32 without dropout, and without gradients, SDPA runs."""
    import torch.nn.functional as F

    calls = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or sdpa(*a, **k))
    torch.manual_seed(0)
    attn = Attention(64, 4, dropout=0.0).train()
    x = torch.randn(3, 40, 64, requires_grad=True)
    mask = (torch.arange(40)[None] < torch.tensor([40, 23, 31])[:, None])[:, None, None, :]
    ref = attn(x, mask)
    (g_ref,) = torch.autograd.grad(ref.pow(2).sum(), x)
    assert calls == [1]  # fp32, no dropout: SDPA
    out, grads = {}, {}
    for explicit in (True, False):
        attn.explicit_cpu = explicit
        calls.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = attn(x, mask)
        assert len(calls) == (0 if explicit else 1)
        (grads[explicit],) = torch.autograd.grad(y.float().pow(2).sum(), x)
        out[explicit] = y.float()
    attn.explicit_cpu = True
    valid = ~(torch.arange(40)[None] >= torch.tensor([40, 23, 31])[:, None])
    err = {e: float((out[e] - ref.detach()).abs()[valid].max()) for e in out}
    gerr = {e: float((grads[e] - g_ref).abs().max()) for e in grads}
    assert err[True] <= 2 * err[False] + 1e-3 and gerr[True] <= 2 * gerr[False] + 1e-3, (err, gerr)
    calls.clear()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        attn(x, mask)
    assert calls == [1]  # inference: SDPA's forward
