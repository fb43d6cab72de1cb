"""The conv extractor's im2col windows (frontends._Windows): its hand-written backward (one copy for the first
`stride` taps, strided adds for the rest, zero fill only where no window reaches) is the exact gradient, for
overlapping (kernel > stride), abutting (kernel == stride) and gapped (kernel < stride) windows."""

from __future__ import annotations

import pytest
import torch

from omnissl.backbones.frontends import _Windows


@pytest.mark.parametrize("kernel, stride", [(3, 2), (2, 2), (10, 5), (4, 2), (2, 3), (1, 1)])
@pytest.mark.parametrize("t", [23, 24])  # with and without a tail of frames that no window reaches
def test_windows_backward_is_the_exact_gradient(kernel, stride, t):
    h = torch.randn(2, t, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: _Windows.apply(v, kernel, stride), (h,))
    n = (t - kernel) // stride + 1
    g = torch.randn(2, n, kernel * 3, dtype=torch.float64)
    ref = h.unfold(1, kernel, stride).transpose(2, 3).reshape(2, n, kernel * 3)  # torch's own im2col
    (want,) = torch.autograd.grad(ref, h, g)
    (got,) = torch.autograd.grad(_Windows.apply(h, kernel, stride), h, g)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
