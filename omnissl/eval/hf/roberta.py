"""RoBERTa <-> our text Encoder (and the masked-LM head), both ways.

    HF class (export: encoder_to_hf_roberta)              ours (import: encoder_from_hf_roberta)
    ----------------------------------------------------  ------------------------------------------------
    RobertaModel (add_pooling_layer=False)                TokenEmbedding + LearnedPositions + post-LN trunk
    RobertaForMaskedLM (lm_head tied to the word          MaskedLMHead (ssl/heads.py)
    embeddings)

Folded parameters (outputs are identical, the split between two HF tensors is not kept):
`ours[i] = position_embeddings[i + pad + 1] + token_type_embeddings[0]`; export writes the token-type row and
positions 0..pad as zeros (RoBERTa never uses them for right-padded text). Inputs must be right-padded.

Not mapped (ValueError naming the option): positions other than a 1-D LearnedPositions, feature_norm,
projection, input dropout, a CLS token, pre-LN, activation dropout, layerdrop; HF decoders, cross-attention,
relative position embeddings, untied MLM decoders. Dropped on export, documented: our `mask_emb` (RoBERTa masks
with a <mask> token id); the pooler is not created.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from omnissl.backbones.encoder import Encoder
from omnissl.backbones.frontends import TokenEmbedding
from omnissl.backbones.transformer import LearnedPositions, Transformer
from omnissl.eval.hf.common import (Pairs, block_pairs, copy_weight, export_pairs, import_pairs, linear_pairs,
                                    norm_pairs, refuse, require, trunk_config)
from omnissl.ssl.heads import MaskedLMHead

if TYPE_CHECKING:  # transformers is a dev extra, imported only by callers that pass or ask for its models
    from transformers import RobertaForMaskedLM, RobertaModel


def _roberta_pairs(encoder: Encoder, model: RobertaModel) -> Pairs:
    """Everything but the positions (folded with the token type, handled per direction)."""
    emb = model.embeddings
    pairs = ([(encoder.frontend.embed.weight, emb.word_embeddings.weight)]
             + norm_pairs(encoder.trunk.norm, emb.LayerNorm))
    for block, layer in zip(encoder.trunk.blocks, model.encoder.layer, strict=True):
        a = layer.attention
        pairs += block_pairs(block, q=a.self.query, k=a.self.key, v=a.self.value, out=a.output.dense,
                             norm1=a.output.LayerNorm, fc1=layer.intermediate.dense, fc2=layer.output.dense,
                             norm2=layer.output.LayerNorm)
    return pairs


def _lm_head_pairs(head: MaskedLMHead, model: RobertaForMaskedLM) -> Pairs:
    lm = model.lm_head
    return linear_pairs(head.dense, lm.dense) + norm_pairs(head.norm, lm.layer_norm) + [(head.bias, lm.bias)]


@torch.no_grad()
def encoder_from_hf_roberta(model: RobertaModel | RobertaForMaskedLM) -> Encoder:
    """transformers.RobertaModel (or the `.roberta` of a RobertaForMaskedLM) -> our text Encoder
    (TokenEmbedding + LearnedPositions + post-LN trunk).

    HF embeds `word + token_type + position -> LayerNorm -> dropout`; we embed `word + position`, and the
    embedding LayerNorm is our post-LN trunk's input norm (`Transformer.norm`). RoBERTa numbers positions from
    `pad_token_id + 1`, so our table is `ours[i] = hf_pos[i + pad + 1] + token_type[0]`: token type 0 (the only
    one RoBERTa uses) is folded in and `max_len = max_position_embeddings - pad - 1` (512 for roberta-base).
    Inputs must be right-padded (HF numbers positions by counting non-pad tokens; we by index).
    """
    model = getattr(model, "roberta", model)
    cfg = model.config
    require(cfg, "is_decoder", cfg.is_decoder, False)
    require(cfg, "add_cross_attention", cfg.add_cross_attention, False)
    require(cfg, "position_embedding_type", getattr(cfg, "position_embedding_type", "absolute"), "absolute")
    require(cfg, "hidden_act", cfg.hidden_act, "gelu")  # ACT2FN["gelu"] is exact erf GELU, like F.gelu
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
    import_pairs(_roberta_pairs(encoder, model))
    copy_weight(encoder.positions.weight,
                emb.position_embeddings.weight[pad + 1 :] + emb.token_type_embeddings.weight[0])
    return encoder


@torch.no_grad()
def lm_head_from_hf_roberta(model: RobertaForMaskedLM) -> MaskedLMHead:
    """RobertaForMaskedLM.lm_head -> MaskedLMHead (its decoder must be tied to the word embeddings, which
    our head reads from the encoder)."""
    cfg, lm = model.config, model.lm_head
    if not torch.equal(lm.decoder.weight, model.roberta.embeddings.word_embeddings.weight):
        raise ValueError(f"RobertaConfig.tie_word_embeddings={cfg.tie_word_embeddings!r}: the lm_head decoder "
                         "differs from the word embeddings; our MaskedLMHead is tied to them")
    if lm.decoder.bias is not None and not torch.equal(lm.decoder.bias, lm.bias):
        raise ValueError("lm_head.decoder.bias differs from lm_head.bias; our MaskedLMHead has one bias")
    head = MaskedLMHead(dim=cfg.hidden_size, vocab_size=cfg.vocab_size, eps=lm.layer_norm.eps)
    import_pairs(_lm_head_pairs(head, model))
    return head


@torch.no_grad()
def encoder_to_hf_roberta(encoder: Encoder, *, lm_head: MaskedLMHead | None = None
                          ) -> RobertaModel | RobertaForMaskedLM:
    """Our text Encoder -> transformers.RobertaModel (no pooler), or RobertaForMaskedLM with `lm_head`.

    Positions: `hf_pos[pad + 1 + i] = ours[i]`, rows 0..pad and the token-type table are zeros; the model
    must be fed right-padded ids (as ours numbers positions by index, RoBERTa by counting non-pad tokens).
    """
    import transformers

    target = "RobertaForMaskedLM" if lm_head is not None else "RobertaModel"
    f = encoder.frontend
    if not isinstance(f, TokenEmbedding):
        raise refuse("frontend", type(f).__name__, target, "needs token ids (TokenEmbedding)")
    pos = encoder.positions
    if not isinstance(pos, LearnedPositions) or pos.grid is not None:
        raise refuse("positions", type(pos).__name__, target, "RoBERTa has a 1-D learned position table")
    for option, value, ok in (("feature_norm", True, isinstance(encoder.feature_norm, nn.Identity)),
                              ("project", True, isinstance(encoder.proj, nn.Identity)),
                              ("cls_token", True, encoder.cls_token is None),
                              ("dropout_input", encoder.dropout_input.p, encoder.dropout_input.p == 0)):
        if not ok:
            raise refuse(option, value, target, "RoBERTa's embeddings are word + position -> LayerNorm")
    t = trunk_config(encoder, target, training_options=False)
    if t["pre_norm"]:
        raise refuse("trunk pre_norm", True, target, "RoBERTa is post-LN")
    pad = f.pad_id
    cfg = transformers.RobertaConfig(
        vocab_size=f.embed.num_embeddings, hidden_size=t["dim"], num_hidden_layers=t["depth"],
        num_attention_heads=t["heads"], intermediate_size=t["ffn_dim"], hidden_act="gelu",
        hidden_dropout_prob=t["dropout"], attention_probs_dropout_prob=t["attn_dropout"],
        max_position_embeddings=pos.max_len + pad + 1, type_vocab_size=1, layer_norm_eps=t["eps"],
        pad_token_id=pad,
    )
    if lm_head is None:
        model = transformers.RobertaModel(cfg, add_pooling_layer=False)
        base = model
    else:
        if lm_head.norm.eps != t["eps"]:
            raise refuse("lm_head eps", lm_head.norm.eps, target, f"HF uses layer_norm_eps ({t['eps']})")
        model = transformers.RobertaForMaskedLM(cfg)
        base = model.roberta
        export_pairs(_lm_head_pairs(lm_head, model))
    export_pairs(_roberta_pairs(encoder, base))
    emb = base.embeddings
    # NOTE(ref): RoBERTa adds token_type_embeddings[0] and numbers positions from pad + 1; we have neither, so
    # the token-type row and positions 0..pad are written as zeros (same outputs for right-padded ids).
    emb.position_embeddings.weight.zero_()
    copy_weight(emb.position_embeddings.weight[pad + 1 :], pos.weight)
    emb.token_type_embeddings.weight.zero_()
    if lm_head is not None:
        model.tie_weights()
        if not torch.equal(model.lm_head.decoder.weight, emb.word_embeddings.weight):
            raise RuntimeError("RobertaForMaskedLM did not tie its decoder to the word embeddings")
    return model.eval()
