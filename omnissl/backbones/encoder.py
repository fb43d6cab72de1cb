"""`Encoder`: a frontend, feature norm and projection, positions and the shared trunk, behind the Backbone
protocol (see protocol.py).

Legend: B batch, N tokens, K kept tokens, C frontend width, D trunk width, L layers.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from omnissl.backbones.config import recorded
from omnissl.backbones.protocol import BackboneOutput, Tokens
from omnissl.backbones.transformer import Transformer
from omnissl.ops import Dropout, padding_mask_from_lengths, segment_runs, take_rows


class GradMultiply(torch.autograd.Function):
    """Identity forward, gradient scaled by `scale` backward (wav2vec 2.0's `feature_grad_mult`)."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: float) -> Tensor:  # type: ignore[override]
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return grad * ctx.scale, None


@recorded
class Encoder(nn.Module):
    """frontend -> [LayerNorm] -> [Linear C->D] -> dropout ... mask / positions / keep ... -> trunk.

    feature_norm / project: wav2vec 2.0's `layer_norm` + `post_extract_proj` (the projection is added
    automatically when the frontend width differs from the trunk's); feature_norm_eps: that LayerNorm's eps
    (HF wav2vec 2.0 / HuBERT use the trunk's `layer_norm_eps`). positions: ConvPositions,
    LearnedPositions, SinCosPositions or None. cls_token: prepend a learned CLS token (ViT, MAE) that is
    never masked or dropped and sits at index 0 of every output.
    """

    def __init__(
        self,
        frontend: nn.Module,
        trunk: Transformer,
        *,
        positions: nn.Module | None = None,
        feature_norm: bool = True,
        feature_norm_eps: float = 1e-5,
        project: bool | None = None,
        dropout_input: float = 0.0,
        cls_token: bool = False,
    ) -> None:
        super().__init__()
        self.frontend, self.trunk, self.positions = frontend, trunk, positions
        c, d = frontend.out_dim, trunk.dim
        self.feature_norm = nn.LayerNorm(c, eps=feature_norm_eps) if feature_norm else nn.Identity()
        project = (c != d) if project is None else project
        if not project and c != d:
            raise ValueError(f"frontend width {c} != trunk width {d}: a projection is required")
        self.proj = nn.Linear(c, d) if project else nn.Identity()
        self.dropout_input = Dropout(dropout_input)
        self.mask_emb = nn.Parameter(torch.empty(d).uniform_())  # fairseq/HF: uniform init
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d)) if cls_token else None
        self.dim, self.num_layers = d, trunk.depth
        self.samples_per_token = frontend.samples_per_token

    @property
    def num_prefix(self) -> int:
        return 0 if self.cls_token is None else 1

    def embed(self, x: Tensor, lengths: Tensor | None = None, *, grad_scale: float = 1.0) -> Tokens:
        """Raw input -> Tokens. grad_scale multiplies the gradient reaching the frontend; 0.0 runs the frontend
        under no_grad (fairseq `feature_grad_mult: 0.0`), so its weights get no gradient at all (None, not
        zeros: AdamW would still move zero-gradient weights by weight decay and momentum)."""
        if lengths is not None and lengths.shape != (x.shape[0],):
            raise ValueError(f"lengths must have shape ({x.shape[0]},), got {tuple(lengths.shape)}")
        with torch.set_grad_enabled(torch.is_grad_enabled() and grad_scale != 0.0):
            feats, valid, grid = self.frontend(x, lengths)
        if grad_scale != 1.0 and torch.is_grad_enabled():
            feats = GradMultiply.apply(feats, grad_scale)
        normed = self.feature_norm(feats)
        h = self.dropout_input(self.proj(normed))
        return Tokens(h, padding_mask_from_lengths(valid, h.shape[1]), normed, grid, feats)

    def _check(self, name: str, m: Tensor | None, shape: tuple[int, int]) -> None:
        if m is not None and (m.shape != shape or m.dtype != torch.bool):
            raise ValueError(f"{name} must be a bool tensor of shape {shape}, got {tuple(m.shape)} {m.dtype}")

    def encode(
        self,
        tokens: Tokens,
        mask: Tensor | None = None,
        keep: Tensor | None = None,
        return_layers: bool | str = False,
        queries: Tensor | None = None,
        segments: Tensor | None = None,
    ) -> BackboneOutput:
        """mask (B, N) bool: positions replaced by the learned mask embedding before positions are added.
        keep (B, N) bool with the same count K per row: only kept tokens (in order) enter the trunk, after
        positions were added for the full sequence (relative positions see dropped tokens as zeros).
        queries (B, Q) int64 token positions (0..N-1, not with keep): only their outputs are wanted; the
        trunk's last block computes just those rows (`Transformer` queries) and `last` / `padding_mask` are
        (B, Q, D) / (B, Q), e.g. MLM's selected tokens.
        segments (B, N) int64: packed rows, several documents per row, each a contiguous run of one id
        (`Batch.segments`): positions restart at every document and a token attends only within its own
        (`Transformer` segments), so each document gets the outputs it would get alone. Needs absolute
        positions (learned or sin-cos; a convolution would mix documents), no CLS token and no keep."""
        x, pad = tokens.x, tokens.padding_mask
        b, n, _ = x.shape
        self._check("mask", mask, (b, n))
        self._check("keep", keep, (b, n))
        if queries is not None and keep is not None:
            raise ValueError("queries index the full token sequence: not with keep")
        pos_ids = None
        if segments is not None:
            if segments.shape != (b, n) or segments.dtype != torch.int64:
                raise ValueError(f"segments must be (B, N) = {(b, n)} int64, got {tuple(segments.shape)} "
                                 f"{segments.dtype}")
            if keep is not None or self.cls_token is not None or getattr(self.positions, "relative", False) \
                    or getattr(self.positions, "grid", None) is not None:
                raise ValueError("packed rows (segments) need absolute 1-D positions (LearnedPositions, "
                                 "SinCosPositions), no CLS token and no keep; this encoder has "
                                 f"{type(self.positions).__name__}, cls_token={self.cls_token is not None}, "
                                 f"keep={keep is not None}")
            segments, pos_ids = segment_runs(segments, pad)
        if mask is not None:
            x = torch.where(mask[..., None], self.mask_emb.to(x.dtype), x)
        if keep is not None and getattr(self.positions, "relative", False):
            x = x.masked_fill(~keep[..., None], 0.0)
        if self.positions is not None:
            x = (self.positions(x, pad, tokens.grid) if pos_ids is None
                 else self.positions(x, pad, tokens.grid, ids=pos_ids))
        if keep is not None:
            counts = keep.sum(1)
            if bool((counts != counts[0]).any()):
                raise ValueError(f"keep must keep the same number of tokens in every row, got {counts.tolist()}")
            idx = keep.nonzero()[:, 1].view(b, -1)  # (B, K), in sequence order
            x = take_rows(x, idx)
            pad = None if pad is None else torch.gather(pad, 1, idx)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(b, -1, -1).to(x.dtype), x], dim=1)
            if pad is not None:
                pad = torch.cat([pad.new_zeros(b, 1), pad], dim=1)
        if queries is not None:
            rows = queries + self.num_prefix  # the trunk's rows (after any CLS)
            last, _, _ = self.trunk(x, pad, queries=rows, segments=segments)
            return BackboneOutput(last, None, None if pad is None else pad.gather(1, rows), None)
        last, layers, ffn = self.trunk(x, pad, return_layers, segments=segments)
        return BackboneOutput(last, layers, pad, ffn)

    def forward(self, x: Tensor, lengths: Tensor | None = None) -> BackboneOutput:
        """Plain inference: embed and encode everything, all layers returned."""
        return self.encode(self.embed(x, lengths), return_layers=True)
