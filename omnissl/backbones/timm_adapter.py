"""`TimmViT`: a timm VisionTransformer behind the Backbone protocol (embed / encode with mask= and keep=).

Built with `pretrained=False`; pass `checkpoint_path` to load local weights (nothing is downloaded).
"""

from __future__ import annotations

import timm
import torch
from torch import Tensor, nn

from omnissl.backbones.protocol import BackboneOutput, Tokens


class TimmViT(nn.Module):
    samples_per_token = None

    def __init__(self, name: str = "vit_base_patch16_224", *, checkpoint_path: str = "", img_size: int = 224,
                 **kwargs) -> None:
        super().__init__()
        self.vit = timm.create_model(name, pretrained=False, num_classes=0, img_size=img_size,
                                     checkpoint_path=checkpoint_path, **kwargs)
        if getattr(self.vit, "pos_embed", None) is None or not getattr(self.vit, "no_embed_class", False) is False:
            raise ValueError(f"timm model {name!r} must be a ViT with class-token positions in pos_embed")
        self.dim = self.vit.embed_dim
        self.num_layers = len(self.vit.blocks)
        self.num_prefix = self.vit.num_prefix_tokens
        self.mask_emb = nn.Parameter(torch.zeros(self.dim).normal_(std=0.02))

    def embed(self, x: Tensor, lengths: Tensor | None = None) -> Tokens:
        h = self.vit.patch_embed(x)  # (B, N, D)
        grid = tuple(self.vit.patch_embed.dynamic_feat_size(x.shape[-2:])) if hasattr(
            self.vit.patch_embed, "dynamic_feat_size") else None
        return Tokens(h, None, h, grid)

    def encode(self, tokens: Tokens, mask: Tensor | None = None, keep: Tensor | None = None,
               return_layers: bool | str = False) -> BackboneOutput:
        if return_layers == "ffn":
            raise ValueError("TimmViT cannot return feed-forward outputs; use the omnissl Encoder")
        x = tokens.x
        b, n, d = x.shape
        for name, m in (("mask", mask), ("keep", keep)):
            if m is not None and (m.shape != (b, n) or m.dtype != torch.bool):
                raise ValueError(f"{name} must be a bool tensor of shape {(b, n)}, got {tuple(m.shape)}")
        if mask is not None:
            x = torch.where(mask[..., None], self.mask_emb.to(x.dtype), x)
        pos = self.vit.pos_embed
        if pos.shape[1] - self.num_prefix != n:
            raise ValueError(f"{n} patches but the timm model has {pos.shape[1] - self.num_prefix} positions")
        x = x + pos[:, self.num_prefix:]
        if keep is not None:
            idx = keep.nonzero()[:, 1].view(b, -1)
            x = torch.gather(x, 1, idx[..., None].expand(-1, -1, d))
        if self.num_prefix:
            x = torch.cat([(self.vit.cls_token + pos[:, :1]).expand(b, -1, -1), x], dim=1)
        x = self.vit.norm_pre(self.vit.pos_drop(x))
        layers = [x] if return_layers else None
        for block in self.vit.blocks:
            x = block(x)
            if layers is not None:
                layers.append(x)
        x = self.vit.norm(x)
        if layers is not None and return_layers != "blocks":
            layers[-1] = x
        return BackboneOutput(x, layers, None)

    def forward(self, x: Tensor, lengths: Tensor | None = None) -> BackboneOutput:
        return self.encode(self.embed(x), return_layers=True)
