"""Prediction heads shared by objectives.

Legend: B batch, N tokens, K kept tokens, P prefix (CLS) tokens, D encoder width, E decoder width.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from omnissl.backbones.transformer import SinCosPositions, Transformer


def regression_head(dim: int, layers: int) -> nn.Module:
    """data2vec's `final_proj`: Linear(D, D) (audio), or [Linear(D, 2D), GELU], then layers-2 x
    [Linear(2D, 2D), GELU], then Linear(2D, D) (text, head_layers 2); fairseq data2vec_text doubles the width
    once, in the first layer."""
    if layers < 1:
        raise ValueError(f"head_layers must be >= 1, got {layers}")
    mods: list[nn.Module] = []
    cur = dim
    for _ in range(layers - 1):
        mods += [nn.Linear(cur, 2 * dim), nn.GELU()]
        cur = 2 * dim
    mods.append(nn.Linear(cur, dim))
    return nn.Sequential(*mods) if len(mods) > 1 else mods[0]


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
                padding_mask: Tensor | None = None, queries: Tensor | None = None) -> Tensor:
        """encoded (B, P + K, D), keep (B, N) bool -> predictions (B, N, out_dim) for every position, or with
        queries (B, Q) int64 patch positions (0..N-1) only at those, (B, Q, out_dim): every block but the last
        still runs on all tokens (they are the last block's keys and values), the last block, the final
        LayerNorm and the output Linear only on the queried rows; the same values as the full output's rows.
        padding_mask (B, N) True at padding: padded positions are not attended to."""
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
        if queries is not None:
            x, _, _ = self.trunk(x, pad, queries=queries + num_prefix)
            return self.out(x)
        x, _, _ = self.trunk(x, pad)
        return self.out(x[:, num_prefix:])


class MaskedLMHead(nn.Module):
    """RoBERTa's masked-LM head (Liu et al. 2019; fairseq `RobertaLMHead`, HF `RobertaLMHead`):
    Linear D->D -> GELU -> LayerNorm -> logits against the token embedding matrix (tied: passed to forward,
    not owned, so the weight has one home in the encoder) plus a per-token bias.

    forward: x (..., D), embedding (V, D) -> logits (..., V). Defaults: fairseq's LayerNorm eps 1e-5
    (HF: the model's `layer_norm_eps`).
    """

    def __init__(self, *, dim: int, vocab_size: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.dense = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.bias = nn.Parameter(torch.zeros(vocab_size))

    def forward(self, x: Tensor, embedding: Tensor) -> Tensor:
        if embedding.shape != (self.bias.shape[0], x.shape[-1]):
            raise ValueError(f"tied embedding must be (vocab {self.bias.shape[0]}, width {x.shape[-1]}), got "
                             f"{tuple(embedding.shape)}")
        h = self.norm(torch.nn.functional.gelu(self.dense(x)))
        return torch.nn.functional.linear(h, embedding, self.bias)


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


class ConvDecoder1d(nn.Module):
    """data2vec 2.0's light convolutional decoder for sequences (Baevski et al. 2023, sec. 2; fairseq
    `Decoder1d`, modalities/modules.py): `layers` blocks of [grouped Conv1d(kernel, same padding) ->
    LayerNorm over channels without affine -> GELU], each added to its input when the widths agree
    (`decoder_residual`), then Linear(dim -> out_dim). Defaults: the audio base setting (4 layers, 384 wide,
    kernel 7, 16 groups; `examples/data2vec/config/v2/base_audio_only_task.yaml`, REFERENCE §B.5).

    forward: x (B, N, D) -> (B, N, out_dim). padding_mask (B, N) True at padding: padded positions are
    zeroed before every convolution so they never leak into valid neighbours. grid: unused (the decoders
    share one call, `decoder(x, padding_mask, grid)`).
    """

    conv = nn.Conv1d

    def __init__(self, *, in_dim: int, out_dim: int | None = None, dim: int = 384, layers: int = 4,
                 kernel: int = 7, groups: int = 16, residual: bool = True) -> None:
        super().__init__()
        if kernel % 2 == 0:
            raise ValueError(f"the decoder kernel must be odd to keep the length / grid, got {kernel}")
        for c in (in_dim, dim):
            if c % groups:
                raise ValueError(f"decoder groups {groups} must divide the widths {in_dim} and {dim}")
        self.residual = residual
        self.convs = nn.ModuleList(
            self.conv(in_dim if i == 0 else dim, dim, kernel, padding=kernel // 2, groups=groups)
            for i in range(layers)
        )
        self.norms = nn.ModuleList(nn.LayerNorm(dim, elementwise_affine=False) for _ in range(layers))
        self.proj = nn.Linear(dim, in_dim if out_dim is None else out_dim)

    def forward(self, x: Tensor, padding_mask: Tensor | None = None, grid: tuple[int, int] | None = None) -> Tensor:
        valid = None if padding_mask is None else (~padding_mask)[..., None].to(x.dtype)
        for conv, norm in zip(self.convs, self.norms):
            if valid is not None:
                x = x * valid
            h = conv(x.transpose(1, 2)).transpose(1, 2)  # (B, N, E)
            h = torch.nn.functional.gelu(norm(h))
            x = x + h if self.residual and h.shape[-1] == x.shape[-1] else h
        return self.proj(x)


class ConvDecoder2d(ConvDecoder1d):
    """data2vec 2.0's convolutional decoder for patch grids (fairseq `Decoder2d`): as `ConvDecoder1d` with
    grouped Conv2d(kernel x kernel) over the (rows, cols) grid. Defaults: image base (6 layers, 768 wide,
    kernel 3, 16 groups; `examples/data2vec/config/v2/base_images_only_task.yaml`, REFERENCE §B.5).

    forward: x (B, rows·cols, D) row-major, grid (rows, cols) -> (B, rows·cols, out_dim); no padding.
    """

    conv = nn.Conv2d

    def __init__(self, *, in_dim: int, out_dim: int | None = None, dim: int = 768, layers: int = 6,
                 kernel: int = 3, groups: int = 16, residual: bool = True) -> None:
        super().__init__(in_dim=in_dim, out_dim=out_dim, dim=dim, layers=layers, kernel=kernel, groups=groups,
                         residual=residual)

    def forward(self, x: Tensor, padding_mask: Tensor | None = None, grid: tuple[int, int] | None = None) -> Tensor:
        if grid is None or padding_mask is not None:
            raise ValueError("the 2-D decoder needs an unpadded patch grid (an image or spectrogram encoder)")
        rows, cols = grid
        b, n, _ = x.shape
        if rows * cols != n:
            raise ValueError(f"grid {grid} does not hold {n} tokens")
        for conv, norm in zip(self.convs, self.norms):
            h = conv(x.transpose(1, 2).reshape(b, -1, rows, cols)).flatten(2).transpose(1, 2)  # (B, N, E)
            h = torch.nn.functional.gelu(norm(h))
            x = x + h if self.residual and h.shape[-1] == x.shape[-1] else h
        return self.proj(x)
