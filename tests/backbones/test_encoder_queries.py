"""`Encoder.encode(queries=)` after a CLS token: queries index the tokens after the prefix, and the rows and the
padding mask it returns are those of the full encoder output at the queried tokens (index query + 1)."""

from __future__ import annotations

import torch

from omnissl.backbones.encoder import Encoder
from omnissl.backbones.frontends import TokenEmbedding
from omnissl.backbones.transformer import LearnedPositions, Transformer
from omnissl.ops import take_rows


def test_queried_rows_and_padding_mask_after_a_cls_token():
    torch.manual_seed(0)
    enc = Encoder(TokenEmbedding(vocab_size=50, dim=32, pad_id=1),
                  Transformer(dim=32, depth=2, heads=4, ffn_dim=64, dropout=0.0, attn_dropout=0.0),
                  positions=LearnedPositions(32, max_len=64), feature_norm=False, project=False, cls_token=True).eval()
    lengths = torch.tensor([9, 4, 6])
    ids = torch.randint(3, 50, (3, 9))
    ids[torch.arange(9)[None] >= lengths[:, None]] = 1
    queries = torch.tensor([[0, 8, 3], [0, 3, 4], [5, 6, 2]])  # valid and padding tokens, any order
    full = enc.encode(enc.embed(ids, lengths))
    got = enc.encode(enc.embed(ids, lengths), queries=queries)
    want_pad = take_rows(full.padding_mask[..., None], queries + 1)[..., 0]
    assert torch.equal(got.padding_mask, want_pad)
    assert torch.equal(want_pad, queries >= lengths[:, None])  # the queried tokens' own padding flags
    valid = ~want_pad
    torch.testing.assert_close(got.last[valid], take_rows(full.last, queries + 1)[valid], rtol=1e-5, atol=1e-5)
