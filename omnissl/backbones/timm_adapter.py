"""`TimmViT`: a timm VisionTransformer behind the Backbone protocol (embed / encode with mask= and keep=).

Weights: `weights=FILE` loads a local timm weights file (.safetensors / .pth / .bin, e.g. saved from
`timm.create_model(name, pretrained=True).state_dict()`) through timm's own pretrained loader, which drops
the classifier and resamples the position embeddings to `img_size`; `pretrained=True` alone takes timm's
hub weights (from the local Hugging Face cache when offline); `checkpoint_path` is timm's strict loader of a
whole model checkpoint. Every other timm option (drop_path_rate, pretrained_cfg_overlay, ...) passes through.
"""

from __future__ import annotations

from pathlib import Path

import timm
import torch
from huggingface_hub.errors import LocalEntryNotFoundError
from torch import Tensor, nn

from omnissl.backbones.protocol import BackboneOutput, Tokens


class TimmViT(nn.Module):
    samples_per_token = None

    def __init__(self, name: str = "vit_base_patch16_224", *, pretrained: bool = False, weights: str = "",
                 checkpoint_path: str = "", img_size: int = 224, **kwargs) -> None:
        super().__init__()
        if weights:
            if not Path(weights).is_file():
                raise FileNotFoundError(f"TimmViT weights: {weights} is not a file")
            overlay = dict(kwargs.pop("pretrained_cfg_overlay", None) or {})
            kwargs["pretrained_cfg_overlay"] = {**overlay, "file": str(weights)}
            pretrained = True
        kwargs.setdefault("num_classes", 0)  # features only: the probe / objective brings its own head
        try:
            self.vit = timm.create_model(name, pretrained=pretrained, img_size=img_size,
                                         checkpoint_path=checkpoint_path, **kwargs)
        except LocalEntryNotFoundError as e:
            raise RuntimeError(f"timm {name!r}: pretrained weights are not in the local Hugging Face cache and the "
                               "hub cannot be reached; pass weights=<local weights file>") from e
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
