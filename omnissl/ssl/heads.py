"""Prediction heads shared by objectives.

Legend: B batch, N tokens, K kept tokens, P prefix (CLS) tokens, D encoder width, E decoder width.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from omnissl.backbones.transformer import SinCosPositions, Transformer


class MAEDecoder(nn.Module):
    """MAE's lightweight decoder (He et al. 2022, sec. 3): Linear D->E, learned mask token N(0, 0.02) at
    removed positions, fixed 2-D sin-cos positions, a pre-LN transformer, Linear E->patch values.
    Defaults: `mae_vit_base_patch16_dec512d8b` (512 wide, 8 blocks, 16 heads)."""

    def __init__(self, *, in_dim: int, out_dim: int, dim: int = 512, depth: int = 8, heads: int = 16) -> None:
        super().__init__()
        self.embed = nn.Linear(in_dim, dim)
        self.mask_token = nn.Parameter(torch.randn(dim) * 0.02)
        self.positions = SinCosPositions(dim, two_d=True)
        self.trunk = Transformer(dim=dim, depth=depth, heads=heads, ffn_dim=4 * dim, pre_norm=True,
                                 dropout=0.0, attn_dropout=0.0, eps=1e-6)
        self.out = nn.Linear(dim, out_dim)

    def forward(self, encoded: Tensor, keep: Tensor, grid: tuple[int, int], num_prefix: int = 0,
                padding_mask: Tensor | None = None) -> Tensor:
        """encoded (B, P + K, D), keep (B, N) bool -> predictions (B, N, out_dim) for every position."""
        h = self.embed(encoded)
        prefix, visible = h[:, :num_prefix], h[:, num_prefix:]
        b, n = keep.shape
        full = self.mask_token.to(h.dtype).expand(b, n, -1).clone()
        full[keep] = visible.reshape(-1, h.shape[-1])
        full = self.positions(full, None, grid)
        x = torch.cat([prefix, full], dim=1)
        pad = None
        if padding_mask is not None:
            pad = torch.cat([padding_mask.new_zeros(b, num_prefix), padding_mask], dim=1)
        x, _, _ = self.trunk(x, pad)
        return self.out(x[:, num_prefix:])


class LabelEmbeddings(nn.Module):
    """One learned embedding per cluster of each label set (HuBERT's `label_embs_concat`, uniform init),
    behind a forward call so sharding wrappers (FSDP2) gather the weight before it is read.

    forward() -> one (K_s, dim) tensor per label set, in the order of `num_classes`.
    """

    def __init__(self, num_classes: list[int], dim: int) -> None:
        super().__init__()
        self.num_classes = list(num_classes)
        self.weight = nn.Parameter(torch.empty(sum(self.num_classes), dim).uniform_())

    def forward(self) -> tuple[torch.Tensor, ...]:
        return self.weight.split(self.num_classes)
