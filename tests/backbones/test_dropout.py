"""ops.dropout: the fast CPU dropout is Bernoulli(1 - p) with F.dropout's scaling, gradient and seeding."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from omnissl import ops
from omnissl.ops import Dropout, dropout


def binomial_ok(count: int, n: int, q: float, sigmas: float = 5.0) -> bool:
    return abs(count - n * q) <= sigmas * math.sqrt(n * q * (1 - q))


@pytest.mark.parametrize("p", [0.1, 0.3, 0.5, 0.9])
def test_keep_rate_is_one_minus_p_and_kept_values_are_scaled(p):
    torch.manual_seed(0)
    x = torch.rand(1_000_003) + 1.0  # no zeros of its own; an odd length (not a multiple of 4 words)
    y = dropout(x, p)
    kept = y != 0
    assert binomial_ok(int(kept.sum()), x.numel(), 1 - p)
    scale = torch.tensor(1 / (1 - p), dtype=torch.float32)
    torch.testing.assert_close(y[kept], x[kept] * scale, rtol=0, atol=0)  # F.dropout's x * float32(1/(1-p))


def test_draws_are_independent_between_neighbours_and_calls():
    """Four values share one 64-bit draw: pairs of neighbours inside it and across draws must be kept with
    probability (1-p)^2, and two calls must not repeat each other."""
    torch.manual_seed(1)
    p, n = 0.5, 1_000_000
    kept = dropout(torch.ones(n), p) != 0
    for lag in (1, 2, 3, 4, 5):
        both = int((kept[:-lag] & kept[lag:]).sum())
        assert binomial_ok(both, n - lag, (1 - p) ** 2), lag
    again = dropout(torch.ones(n), p) != 0
    assert binomial_ok(int((kept & again).sum()), n, (1 - p) ** 2)


def test_seeded_like_torch_and_gradient_through_kept_values_only():
    x = torch.randn(4, 33, 16, requires_grad=True)
    torch.manual_seed(7)
    y = dropout(x, 0.2)
    torch.manual_seed(7)
    assert torch.equal(dropout(x, 0.2), y)  # torch's generator drives it: seeds reproduce a run
    g = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, g)
    torch.testing.assert_close(gx, g * (y != 0) / 0.8, rtol=1e-6, atol=0)


def test_bf16_keeps_its_dtype_and_rate():
    torch.manual_seed(2)
    x = torch.ones(200_000, dtype=torch.bfloat16, requires_grad=True)
    y = dropout(x, 0.1)
    assert y.dtype == torch.bfloat16
    assert binomial_ok(int((y != 0).sum()), x.numel(), 0.9)
    assert set(y.unique().tolist()) == {0.0, float(torch.tensor(1 / 0.9).to(torch.bfloat16))}


def test_identity_in_eval_and_at_zero_the_fallbacks_and_bad_p():
    x = torch.randn(5, 7)
    assert dropout(x, 0.1, training=False) is x and dropout(x, 0.0) is x
    assert torch.equal(dropout(x, 1.0), torch.zeros_like(x))  # outside the 16-bit range: F.dropout
    with pytest.raises(ValueError, match="1.5"):
        dropout(x, 1.5)
    old = ops.fast_cpu_dropout
    try:
        ops.fast_cpu_dropout = False  # the switch: exactly F.dropout, draw for draw
        torch.manual_seed(3)
        a = dropout(x, 0.3)
        torch.manual_seed(3)
        assert torch.equal(a, F.dropout(x, 0.3, training=True))
    finally:
        ops.fast_cpu_dropout = old


def test_module_is_a_drop_in_nn_dropout():
    m = Dropout(0.25)
    assert isinstance(m, nn.Dropout) and m.p == 0.25 and repr(m) == repr(nn.Dropout(0.25))
    assert m.state_dict() == {}
    x = torch.randn(3, 4)
    assert m.eval()(x) is x
    assert binomial_ok(int((m.train()(torch.ones(100_000)) != 0).sum()), 100_000, 0.75)
