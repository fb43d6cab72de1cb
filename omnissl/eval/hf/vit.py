"""ViT and ViT-MAE <-> our image Encoder, both ways.

    HF class (export: encoder_to_hf_vit)     ours (import: encoder_from_hf_vit)
    ---------------------------------------  -----------------------------------------------------------
    ViTModel (add_pooling_layer=False)       ImagePatches + absolute positions + CLS + pre-LN trunk
    ViTMAEModel (mask_ratio=0)               as ViT; positions fixed (requires_grad False)

Folded parameters (outputs are identical, the split between two HF tensors is not kept):
  * HF adds `position_embeddings[0]` to the CLS token; ours has no CLS position, so import folds it into
    `cls_token` and export writes a zero row. (For ViTMAE that row is zero already: lossless.)
  * Absolute image positions become HF's fixed-size table: export evaluates our positions (sin-cos, 1-D or
    2-D, or learned) on the grid of `image_size`; import recognises a table that is exactly our 2-D sin-cos
    (either half order: `SinCosPositions(cols_first=...)`), else keeps it as `LearnedPositions(grid=...)`
    (frozen when HF froze it, as ViTMAE does).

Not mapped (ValueError naming the option): relative positions (ConvPositions), feature_norm, projection, input
dropout, no CLS token, post-LN, activation dropout, layerdrop; input dropout on ViTMAE (its embeddings have
none); a qkv without bias. Dropped on export, documented: our `mask_emb` (ViTModel's mask token exists only
with use_mask_token); the pooler is not created.

ViTMAEModel masks randomly inside forward (`random_masking`, transformers#20328): even with the exported
`mask_ratio=0` the token order is shuffled unless you pass `noise` in increasing order, e.g.
`noise=torch.arange(num_patches).expand(batch, -1)`, which keeps the identity order.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from omnissl.backbones.encoder import Encoder
from omnissl.backbones.frontends import ImagePatches
from omnissl.backbones.transformer import LearnedPositions, SinCosPositions, Transformer
from omnissl.eval.hf.common import (Pairs, absolute_table, block_pairs, copy_weight, export_pairs, import_pairs,
                                    linear_pairs, norm_pairs, refuse, require, trunk_config)

if TYPE_CHECKING:  # transformers is a dev extra, imported only by callers that pass or ask for its models
    from transformers import ViTMAEModel, ViTModel


def _vit_pairs(encoder: Encoder, model: ViTModel | ViTMAEModel) -> Pairs:
    """Everything but CLS and positions (folded, handled per direction)."""
    if not hasattr(model, "layers"):
        import transformers

        raise ValueError(f"{type(model).__name__} of transformers {transformers.__version__} has the older "
                         "encoder.layer layout; omnissl converts the ViT layout of transformers 5.x "
                         "(layers.N.attention.q_proj)")
    proj = model.embeddings.patch_embeddings.projection
    pairs = linear_pairs(encoder.frontend.proj, proj) + norm_pairs(encoder.trunk.norm, model.layernorm)
    for block, layer in zip(encoder.trunk.blocks, model.layers, strict=True):
        a = layer.attention
        pairs += block_pairs(block, q=a.q_proj, k=a.k_proj, v=a.v_proj, out=a.o_proj,
                             norm1=layer.layernorm_before, fc1=layer.mlp.fc1, fc2=layer.mlp.fc2,
                             norm2=layer.layernorm_after)
    return pairs


def _image_size(value: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    size = (value, value) if isinstance(value, int) else tuple(value)
    if len(size) != 2 or not all(isinstance(s, int) and s > 0 for s in size):
        raise ValueError(f"image_size must be a positive int or (height, width), got {value!r}")
    return size


@torch.no_grad()
def encoder_from_hf_vit(model: ViTModel | ViTMAEModel) -> Encoder:
    """transformers.ViTModel or ViTMAEModel -> our image Encoder (ImagePatches + positions + CLS, pre-LN).

    HF's position table (CLS row + one per patch of the config's image_size) becomes SinCosPositions when it
    is exactly our 2-D sin-cos (rows-first, or MAE's cols-first layout), else LearnedPositions(grid=...) for
    that grid, frozen when HF froze it (ViTMAE); the CLS row is folded into our cls_token. The pooler of a
    ViTModel is not imported.
    """
    cfg = model.config
    require(cfg, "hidden_act", cfg.hidden_act, "gelu")
    require(cfg, "qkv_bias", cfg.qkv_bias, True)
    height, width = _image_size(cfg.image_size)
    p = cfg.patch_size
    if height % p or width % p:
        raise ValueError(f"{type(cfg).__name__}.image_size={cfg.image_size!r} is not divisible by patch_size {p}")
    grid, dim = (height // p, width // p), cfg.hidden_size
    n = grid[0] * grid[1]
    table = model.embeddings.position_embeddings  # (1, 1 + N, D)

    positions: nn.Module | None = None
    for cols_first in (False, True):
        candidate = SinCosPositions(dim, two_d=True, cols_first=cols_first) if dim % 4 == 0 else None
        if candidate is not None and torch.equal(candidate(torch.zeros(1, n, dim), None, grid)[0], table[0, 1:]):
            positions = candidate
            break
    if positions is None:
        positions = LearnedPositions(dim, max_len=n, grid=grid, frozen=not table.requires_grad)
        copy_weight(positions.weight, table[0, 1:])

    dropout = cfg.hidden_dropout_prob
    trunk = Transformer(dim=dim, depth=cfg.num_hidden_layers, heads=cfg.num_attention_heads,
                        ffn_dim=cfg.intermediate_size, pre_norm=True, dropout=dropout,
                        attn_dropout=cfg.attention_probs_dropout_prob, eps=cfg.layer_norm_eps)
    encoder = Encoder(ImagePatches(dim=dim, patch=p, channels=cfg.num_channels), trunk, positions=positions,
                      feature_norm=False, project=False, cls_token=True)
    import_pairs(_vit_pairs(encoder, model))
    copy_weight(encoder.cls_token, model.embeddings.cls_token + table[:, :1])
    mask_token = getattr(model.embeddings, "mask_token", None)  # ViTModel(use_mask_token=True) only
    if mask_token is not None:
        copy_weight(encoder.mask_emb, mask_token.reshape(-1))
    return encoder


@torch.no_grad()
def encoder_to_hf_vit(encoder: Encoder, *, image_size: int | tuple[int, int], mae: bool = False
                      ) -> ViTModel | ViTMAEModel:
    """Our image Encoder -> transformers.ViTModel (add_pooling_layer=False), or ViTMAEModel with mae=True.

    image_size fixes HF's position table: our absolute positions evaluated on its patch grid; the CLS row is
    zero and HF's cls_token is ours. ViTMAEModel gets mask_ratio=0, but still shuffles tokens unless called
    with increasing `noise` (see the module docstring).
    """
    import transformers

    target = "ViTMAEModel" if mae else "ViTModel"
    f = encoder.frontend
    if not isinstance(f, ImagePatches):
        raise refuse("frontend", type(f).__name__, target, "needs image patches (ImagePatches)")
    if encoder.cls_token is None:
        raise refuse("cls_token", False, target, "ViT always prepends a CLS token")
    for option, value, ok in (("feature_norm", True, isinstance(encoder.feature_norm, nn.Identity)),
                              ("project", True, isinstance(encoder.proj, nn.Identity)),
                              ("dropout_input", encoder.dropout_input.p, encoder.dropout_input.p == 0)):
        if not ok:
            raise refuse(option, value, target, "ViT embeds patches -> + positions directly")
    t = trunk_config(encoder, target, training_options=False)
    if not t["pre_norm"]:
        raise refuse("trunk pre_norm", False, target, "ViT is pre-LN")
    if mae and t["dropout"]:
        raise refuse("trunk dropout", t["dropout"], target, "ViTMAE's embeddings have no dropout (ours drops the "
                     "trunk input)")
    height, width = _image_size(image_size)
    if height % f.patch or width % f.patch:
        raise ValueError(f"image_size {image_size!r} is not divisible by the patch size {f.patch}")
    grid = (height // f.patch, width // f.patch)
    table = absolute_table(encoder, target, grid[0] * grid[1], grid)

    kw = dict(hidden_size=t["dim"], num_hidden_layers=t["depth"], num_attention_heads=t["heads"],
              intermediate_size=t["ffn_dim"], hidden_act="gelu", hidden_dropout_prob=t["dropout"],
              attention_probs_dropout_prob=t["attn_dropout"], layer_norm_eps=t["eps"],
              image_size=height if height == width else [height, width], patch_size=f.patch,
              num_channels=f.proj.in_channels, qkv_bias=True)
    if mae:
        model = transformers.ViTMAEModel(transformers.ViTMAEConfig(mask_ratio=0.0, **kw))
    else:
        model = transformers.ViTModel(transformers.ViTConfig(**kw), add_pooling_layer=False)
    export_pairs(_vit_pairs(encoder, model))
    emb = model.embeddings
    # NOTE(ref): HF ViT adds position_embeddings[0] to the CLS token; ours has no CLS position, so that row
    # is zero and HF's cls_token is ours (import folds a non-zero row into our cls_token instead).
    copy_weight(emb.cls_token, encoder.cls_token)
    emb.position_embeddings.zero_()
    copy_weight(emb.position_embeddings[0, 1:], table)
    return model.eval()
