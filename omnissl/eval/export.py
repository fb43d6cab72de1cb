"""Weight conversion between Hugging Face `transformers` models and our `Encoder`.

Import (HF -> ours), by copying weights into an encoder built from our own classes:

    encoder_from_hf_roberta(model)    transformers.RobertaModel          -> text Encoder (post-LN)
    encoder_from_hf_wav2vec2(model)   transformers.Wav2Vec2Model / HubertModel -> audio Encoder

The imported encoder reproduces the HF model's `hidden_states` at every layer (tests/eval/
test_hf_faithfulness.py) for right-padded batches. It is returned in fp32 and in train mode like any fresh
module; call `.eval()` for inference. A config option our encoder cannot represent raises ValueError naming it.
Heads that are not part of the encoder (RoBERTa's pooler, wav2vec 2.0's quantizer) are not imported.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from omnissl.backbones.encoder import Encoder
from omnissl.backbones.frontends import ConvFeatureExtractor, TokenEmbedding
from omnissl.backbones.transformer import Attention, ConvPositions, LearnedPositions, Transformer

if TYPE_CHECKING:  # transformers is a dev extra, imported only by callers that pass its models
    from transformers import HubertModel, RobertaModel, Wav2Vec2Model


def _require(config, option: str, value, expected) -> None:
    if value != expected:
        raise ValueError(
            f"{type(config).__name__}.{option}={value!r} is not supported by our Encoder (needs {expected!r})"
        )


def _copy(dst: Tensor, src: Tensor) -> None:
    if dst.shape != src.shape:
        raise ValueError(f"shape mismatch copying weights: {tuple(src.shape)} into {tuple(dst.shape)}")
    dst.copy_(src)


def _copy_linear(dst: nn.Linear, src: nn.Linear) -> None:
    _copy(dst.weight, src.weight)
    _copy(dst.bias, src.bias)


def _copy_norm(dst: nn.LayerNorm | nn.GroupNorm, src: nn.LayerNorm | nn.GroupNorm) -> None:
    """Affine parameters and eps of a LayerNorm / GroupNorm."""
    _copy(dst.weight, src.weight)
    _copy(dst.bias, src.bias)
    dst.eps = src.eps


def _fuse_qkv(dst: Attention, q: nn.Linear, k: nn.Linear, v: nn.Linear) -> None:
    """Our fused projection is [q; k; v] along the output axis (see Attention.forward's rearrange)."""
    _copy(dst.qkv.weight, torch.cat([q.weight, k.weight, v.weight], dim=0))
    _copy(dst.qkv.bias, torch.cat([q.bias, k.bias, v.bias], dim=0))


# ---------------------------------------------------------------------------------------------------------
# RoBERTa


@torch.no_grad()
def encoder_from_hf_roberta(model: RobertaModel) -> Encoder:
    """transformers.RobertaModel -> our text Encoder (TokenEmbedding + LearnedPositions + post-LN trunk).

    HF embeds `word + token_type + position -> LayerNorm -> dropout`; we embed `word + position`, and the
    embedding LayerNorm is our post-LN trunk's input norm (`Transformer.norm`). RoBERTa numbers positions from
    `pad_token_id + 1`, so our table is `ours[i] = hf_pos[i + pad + 1] + token_type[0]`: token type 0 (the only
    one RoBERTa uses) is folded in and `max_len = max_position_embeddings - pad - 1` (512 for roberta-base).
    Inputs must be right-padded (HF numbers positions by counting non-pad tokens; we by index).
    """
    cfg = model.config
    _require(cfg, "is_decoder", cfg.is_decoder, False)
    _require(cfg, "add_cross_attention", cfg.add_cross_attention, False)
    _require(cfg, "position_embedding_type", getattr(cfg, "position_embedding_type", "absolute"), "absolute")
    _require(cfg, "hidden_act", cfg.hidden_act, "gelu")  # ACT2FN["gelu"] is exact erf GELU, like F.gelu
    if cfg.pad_token_id is None:
        raise ValueError("RobertaConfig.pad_token_id=None is not supported: RoBERTa positions start after it")
    pad, dim = cfg.pad_token_id, cfg.hidden_size

    trunk = Transformer(
        dim=dim, depth=cfg.num_hidden_layers, heads=cfg.num_attention_heads, ffn_dim=cfg.intermediate_size,
        pre_norm=False, dropout=cfg.hidden_dropout_prob, attn_dropout=cfg.attention_probs_dropout_prob,
        act_dropout=0.0, eps=cfg.layer_norm_eps,
    )
    encoder = Encoder(
        TokenEmbedding(vocab_size=cfg.vocab_size, dim=dim, pad_id=pad), trunk,
        positions=LearnedPositions(dim, max_len=cfg.max_position_embeddings - pad - 1),
        feature_norm=False, project=False,
    )

    emb = model.embeddings
    _copy(encoder.frontend.embed.weight, emb.word_embeddings.weight)
    _copy(encoder.positions.weight, emb.position_embeddings.weight[pad + 1 :] + emb.token_type_embeddings.weight[0])
    _copy_norm(trunk.norm, emb.LayerNorm)
    for block, layer in zip(trunk.blocks, model.encoder.layer, strict=True):
        attn = layer.attention
        _fuse_qkv(block.attn, attn.self.query, attn.self.key, attn.self.value)
        _copy_linear(block.attn.out, attn.output.dense)
        _copy_norm(block.norm1, attn.output.LayerNorm)
        _copy_linear(block.fc1, layer.intermediate.dense)
        _copy_linear(block.fc2, layer.output.dense)
        _copy_norm(block.norm2, layer.output.LayerNorm)
    return encoder


# ---------------------------------------------------------------------------------------------------------
# wav2vec 2.0 / HuBERT


@torch.no_grad()
def encoder_from_hf_wav2vec2(model: Wav2Vec2Model | HubertModel) -> Encoder:
    """transformers.Wav2Vec2Model (or HubertModel, same layout) -> our audio Encoder.

    feature_extractor -> ConvFeatureExtractor (feat_extract_norm "group"/"layer", conv_bias),
    feature_projection.layer_norm / .projection -> Encoder.feature_norm / Encoder.proj,
    masked_spec_embed -> Encoder.mask_emb, encoder.pos_conv_embed -> ConvPositions (weight-normed grouped conv),
    encoder.layer_norm -> Transformer.norm (input norm when post-LN, final norm when do_stable_layer_norm).

    With padded batches our extractor's GroupNorm uses valid frames only (see the NOTE(ref) in frontends.py):
    the imported encoder equals HF on each utterance alone, not HF on the padded batch.
    """
    cfg = model.config
    if cfg.feat_extract_norm not in ("group", "layer"):
        raise ValueError(f"{type(cfg).__name__}.feat_extract_norm={cfg.feat_extract_norm!r} is not supported "
                         "by our Encoder (needs 'group' or 'layer')")
    _require(cfg, "feat_extract_activation", cfg.feat_extract_activation, "gelu")
    _require(cfg, "hidden_act", cfg.hidden_act, "gelu")
    _require(cfg, "add_adapter", getattr(cfg, "add_adapter", False), False)
    _require(cfg, "adapter_attn_dim", getattr(cfg, "adapter_attn_dim", None), None)
    _require(cfg, "conv_pos_batch_norm", getattr(cfg, "conv_pos_batch_norm", False), False)
    dim = cfg.hidden_size
    has_feature_norm = getattr(cfg, "feat_proj_layer_norm", True)  # HuBERT may drop it; wav2vec 2.0 always has it

    frontend = ConvFeatureExtractor(
        layers=tuple(zip(cfg.conv_dim, cfg.conv_kernel, cfg.conv_stride)), mode=cfg.feat_extract_norm,
        bias=cfg.conv_bias,
    )
    trunk = Transformer(
        dim=dim, depth=cfg.num_hidden_layers, heads=cfg.num_attention_heads, ffn_dim=cfg.intermediate_size,
        pre_norm=cfg.do_stable_layer_norm, dropout=cfg.hidden_dropout, attn_dropout=cfg.attention_dropout,
        act_dropout=cfg.activation_dropout, layerdrop=cfg.layerdrop, eps=cfg.layer_norm_eps,
    )
    positions = ConvPositions(dim, kernel=cfg.num_conv_pos_embeddings, groups=cfg.num_conv_pos_embedding_groups)
    encoder = Encoder(frontend, trunk, positions=positions, feature_norm=has_feature_norm, project=True,
                      dropout_input=cfg.feat_proj_dropout)

    for conv, norm, hf in zip(frontend.convs, frontend.norms, model.feature_extractor.conv_layers, strict=True):
        _copy(conv.weight, hf.conv.weight)
        if cfg.conv_bias:
            _copy(conv.bias, hf.conv.bias)
        if not isinstance(norm, nn.Identity):
            _copy_norm(norm, hf.layer_norm)
    proj = model.feature_projection
    if has_feature_norm:
        _copy_norm(encoder.feature_norm, proj.layer_norm)
    _copy_linear(encoder.proj, proj.projection)
    if getattr(model, "masked_spec_embed", None) is not None:  # only built when mask_time/feature_prob > 0
        _copy(encoder.mask_emb, model.masked_spec_embed)

    src = model.encoder.pos_conv_embed.conv
    if hasattr(src, "parametrizations"):  # torch parametrizations (HF 5.x): original0 = g, original1 = v
        g, v = src.parametrizations.weight.original0, src.parametrizations.weight.original1
    else:  # legacy nn.utils.weight_norm
        g, v = src.weight_g, src.weight_v
    dst = positions.conv.parametrizations.weight
    _copy(dst.original0, g)
    _copy(dst.original1, v)
    _copy(positions.conv.bias, src.bias)

    _copy_norm(trunk.norm, model.encoder.layer_norm)
    for block, layer in zip(trunk.blocks, model.encoder.layers, strict=True):
        attn = layer.attention
        _fuse_qkv(block.attn, attn.q_proj, attn.k_proj, attn.v_proj)
        _copy_linear(block.attn.out, attn.out_proj)
        _copy_norm(block.norm1, layer.layer_norm)
        _copy_linear(block.fc1, layer.feed_forward.intermediate_dense)
        _copy_linear(block.fc2, layer.feed_forward.output_dense)
        _copy_norm(block.norm2, layer.final_layer_norm)
    return encoder


encoder_from_hf_hubert = encoder_from_hf_wav2vec2
