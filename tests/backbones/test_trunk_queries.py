"""`Transformer(..., queries=)`: the last block computes only some rows (they still attend to every token), as
MAE's decoder uses for its removed patches and MLM for its selected tokens; in a padded batch the blocks before
the last then run unpadded. The queried rows at valid tokens must equal the full trunk's, and so must the
gradients (a queried padding row is junk either way and is left out)."""

from __future__ import annotations

import pytest
import torch

from omnissl.backbones.transformer import Transformer
from omnissl.ops import take_rows


def _trunk(pre_norm: bool, **kw) -> Transformer:
    torch.manual_seed(0)
    kw = {"dropout": 0.0, "attn_dropout": 0.0, **kw}
    return Transformer(dim=32, depth=3, heads=4, ffn_dim=64, pre_norm=pre_norm, **kw)


def _inputs():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 10, 32, generator=g)
    pad = torch.arange(10)[None] >= torch.tensor([10, 6, 10])[:, None]
    queries = torch.stack([torch.randperm(10, generator=g)[:4] for _ in range(3)])  # any positions, any order
    return x, pad, queries


@pytest.mark.parametrize("padded", [True, False], ids=["padded", "unpadded"])
@pytest.mark.parametrize("checkpointed", [False, True], ids=["plain", "checkpointed"])
@pytest.mark.parametrize("pre_norm", [False, True], ids=["post_ln", "pre_ln"])
def test_queried_rows_and_gradients_equal_the_full_trunks(pre_norm, checkpointed, padded):
    x, pad, queries = _inputs()
    if not padded:
        pad = torch.zeros_like(pad)
    valid = ~pad.gather(1, queries)
    assert 0 < int(valid.sum()) < valid.numel() if padded else bool(valid.all())  # padded: some rows are padding
    pad = pad if padded else None
    grads = []
    for q in (None, queries):
        trunk = _trunk(pre_norm, checkpoint_activations=checkpointed).train()
        xi = x.clone().requires_grad_(True)
        out = trunk(xi, pad, queries=q)[0]
        rows = take_rows(out, queries) if q is None else out
        assert rows.shape == (3, 4, 32)
        rows = rows[valid]
        (rows * torch.linspace(-1, 1, 32)).sum().backward()
        grads.append((rows.detach(), xi.grad, {n: p.grad for n, p in trunk.named_parameters()}))
    (full, gx_full, gp_full), (part, gx_part, gp_part) = grads
    torch.testing.assert_close(part, full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx_part, gx_full, rtol=1e-4, atol=1e-6)
    for name, g in gp_full.items():
        torch.testing.assert_close(gp_part[name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_a_dropped_last_block_still_returns_the_queried_rows():
    x, pad, queries = _inputs()
    trunk = _trunk(True, layerdrop=0.5).train()
    for update in range(50):  # find an update whose draw skips the last block
        trunk.set_num_updates(update)
        if bool(trunk.dropped_layers()[-1]):
            break
    else:
        pytest.fail("no update of 50 dropped the last block")
    valid = ~pad.gather(1, queries)
    with torch.no_grad():
        torch.testing.assert_close(trunk(x, pad, queries=queries)[0][valid],
                                   take_rows(trunk(x, pad)[0], queries)[valid])


def test_queries_are_checked():
    x, pad, queries = _inputs()
    trunk = _trunk(True)
    with pytest.raises(ValueError, match="cannot return every layer"):
        trunk(x, pad, return_layers=True, queries=queries)
    with pytest.raises(ValueError, match="int64 positions"):
        trunk(x, pad, queries=queries[0])
