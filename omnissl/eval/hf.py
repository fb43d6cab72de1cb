"""Weight conversion between Hugging Face `transformers` models and our `Encoder`, both ways.

Each family pairs every one of our tensors with the HF tensor it equals (`_*_pairs`), and import and export
copy along the same pairs in opposite directions; only folded parameters (below) are handled per direction.

    family          HF class (export: encoder_to_hf_*)        ours (import: encoder_from_hf_*)
    --------------  ----------------------------------------  ----------------------------------------------
    wav2vec 2.0     Wav2Vec2Model; feat_extract_norm "group"  ConvFeatureExtractor("group") + post-LN trunk
                    + post-LN, or "layer" + do_stable_layer_  (base) / ("layer", bias) + pre-LN (large);
                    norm (pre-LN)                             ConvPositions, feature_norm, proj, mask_emb
      + heads       Wav2Vec2ForPreTraining: quantizer          GumbelQuantizer (codebook, weight_proj),
                    (codevectors, weight_proj), project_q,     project_q, final_proj (the objective's names)
                    project_hid
    HuBERT          HubertModel (feat_proj_layer_norm may     as wav2vec 2.0 (feature_norm=False allowed);
                    be False)                                 HuBERT's final_proj / label embeddings have no
                                                              HF class and are not exported
    RoBERTa         RobertaModel (add_pooling_layer=False)    TokenEmbedding + LearnedPositions + post-LN
      + heads       RobertaForMaskedLM (lm_head tied to the   MaskedLMHead (ssl/heads.py)
                    word embeddings)
    ViT             ViTModel (add_pooling_layer=False)        ImagePatches + absolute positions + CLS + pre-LN
    ViT-MAE         ViTMAEModel (mask_ratio=0)                as ViT; positions fixed (requires_grad False)

Folded parameters (outputs are identical, the split between two HF tensors is not kept):
  * RoBERTa: `ours[i] = position_embeddings[i + pad + 1] + token_type_embeddings[0]`; export writes the
    token-type row and positions 0..pad as zeros (RoBERTa never uses them for right-padded text).
  * ViT: HF adds `position_embeddings[0]` to the CLS token; ours has no CLS position, so import folds it into
    `cls_token` and export writes a zero row. (For ViTMAE that row is zero already: lossless.)
  * Absolute image positions become HF's fixed-size table: export evaluates our positions (sin-cos, 1-D or
    2-D, or learned) on the grid of `image_size`; import recognises a table that is exactly our 2-D sin-cos
    (either half order: `SinCosPositions(cols_first=...)`), else keeps it as `LearnedPositions(grid=...)`
    (frozen when HF froze it, as ViTMAE does).

Not mapped, so a model using them raises ValueError naming the option (no silently different model):
  LogMelPatches (spectrogram patches) on any family; a CLS token on audio; positions other than ConvPositions
  on audio, other than LearnedPositions on text, relative (ConvPositions) on images; wav2vec 2.0 without
  feature_norm (only HuBERT has `feat_proj_layer_norm`), a feature_norm eps
  other than the trunk's, conv norms with eps other than 1e-5; a text / image encoder with feature_norm,
  projection, input dropout or a CLS token mismatch (text: none; images: required); pre-LN text, post-LN
  images; activation dropout or layerdrop outside wav2vec 2.0 / HuBERT; trunk LayerNorms with different
  eps; input dropout on ViTMAE (its embeddings have none); HF configs with non-GELU activations, adapters,
  relative attention, decoders, a qkv without bias, untied MLM decoders.
  An audio encoder without a projection (conv width == trunk width) exports an identity projection (exact);
  importing that back gives an encoder with the projection.
  Dropped on export, documented: our `mask_emb` for text and images (RoBERTa masks with a <mask> token id,
  ViTModel's mask token exists only with use_mask_token); RoBERTa's and ViT's poolers are not created.

Semantics worth knowing:
  * Gumbel temperature: HF's quantizer starts at 2 (hard-coded, not in its config) and uses
    `gumbel_softmax(logits, tau)` in training, argmax in eval, as ours does. Export writes our current τ as
    `config.omnissl_gumbel_temperature`; call `model.set_gumbel_temperature(...)` with it (and anneal) to
    continue training in HF. Import sets the quantizer's τ from it when present.
  * ViTMAEModel masks randomly inside forward (`random_masking`, transformers#20328): even with the exported
    `mask_ratio=0` the token order is shuffled unless you pass `noise` in increasing order, e.g.
    `noise=torch.arange(num_patches).expand(batch, -1)`, which keeps the identity order.
  * wav2vec 2.0 export keeps HF's `mask_time_prob` default (0.05, so `masked_spec_embed` exists and carries
    our mask embedding): HF applies SpecAugment with it when fine-tuning in train mode.
  * Padding: RoBERTa must be right-padded; with the group-norm extractor our padded batches take GroupNorm
    statistics over valid frames only (frontends.py), so they equal HF on each utterance alone.

Models are returned in eval mode, fp32, built offline from configs; nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from omnissl.backbones.encoder import Encoder
from omnissl.backbones.frontends import ConvFeatureExtractor, ImagePatches, TokenEmbedding
from omnissl.backbones.transformer import ConvPositions, LearnedPositions, SinCosPositions, Transformer
from omnissl.ssl.heads import MaskedLMHead
from omnissl.ssl.quantizer import GumbelQuantizer

if TYPE_CHECKING:  # transformers is a dev extra, imported only by callers that pass or ask for its models
    from transformers import (HubertModel, PreTrainedModel, RobertaForMaskedLM, RobertaModel, ViTMAEModel,
                              ViTModel, Wav2Vec2ForPreTraining, Wav2Vec2Model)

Pairs = list[tuple[Tensor, Tensor]]  # (ours, theirs): equal tensors after conversion


def _require(config, option: str, value, expected) -> None:
    if value != expected:
        raise ValueError(
            f"{type(config).__name__}.{option}={value!r} is not supported by our Encoder (needs {expected!r})"
        )


def _refuse(option: str, value, target: str, why: str) -> ValueError:
    return ValueError(f"{option}={value!r} has no {target} equivalent: {why}")


def _copy(dst: Tensor, src: Tensor) -> None:
    if dst.shape != src.shape:
        raise ValueError(f"shape mismatch copying weights: {tuple(src.shape)} into {tuple(dst.shape)}")
    dst.copy_(src)


def _linear(ours: nn.Linear, theirs: nn.Linear) -> Pairs:
    return [(ours.weight, theirs.weight), (ours.bias, theirs.bias)]


def _norm(ours: nn.LayerNorm | nn.GroupNorm, theirs: nn.LayerNorm | nn.GroupNorm) -> Pairs:
    return [(ours.weight, theirs.weight), (ours.bias, theirs.bias)]


def _qkv(block, q: nn.Linear, k: nn.Linear, v: nn.Linear) -> Pairs:
    """Our fused projection is [q; k; v] along the output axis (Attention.forward's rearrange): pair each
    third (a view, so copying into it writes the fused weight) with HF's separate projection."""
    w, b, d = block.attn.qkv.weight, block.attn.qkv.bias, q.weight.shape[0]
    return [(w[i * d : (i + 1) * d], m.weight) for i, m in enumerate((q, k, v))] + [
        (b[i * d : (i + 1) * d], m.bias) for i, m in enumerate((q, k, v))
    ]


def _block(block, *, q, k, v, out, norm1, fc1, fc2, norm2) -> Pairs:
    return (_qkv(block, q, k, v) + _linear(block.attn.out, out) + _norm(block.norm1, norm1)
            + _linear(block.fc1, fc1) + _linear(block.fc2, fc2) + _norm(block.norm2, norm2))


@torch.no_grad()
def _import(pairs: Pairs) -> None:
    for ours, theirs in pairs:
        _copy(ours, theirs)


@torch.no_grad()
def _export(pairs: Pairs) -> None:
    for ours, theirs in pairs:
        _copy(theirs, ours)


def _trunk_config(encoder: Encoder, target: str, *, training_options: bool) -> dict:
    """Our trunk's hyper-parameters as read from the modules, checked against what `target` can express.
    training_options: the HF family has activation dropout and layerdrop (wav2vec 2.0 / HuBERT)."""
    trunk: Transformer = encoder.trunk
    block = trunk.blocks[0]
    eps = {m.eps for m in trunk.modules() if isinstance(m, nn.LayerNorm)}
    if len(eps) != 1:
        raise _refuse("trunk LayerNorm eps", sorted(eps), target, "HF has one layer_norm_eps for all of them")
    act_dropout, layerdrop = block.act_drop.p, trunk.layerdrop
    if not training_options:
        if act_dropout:
            raise _refuse("trunk act_dropout", act_dropout, target, "no dropout between the FFN layers")
        if layerdrop:
            raise _refuse("trunk layerdrop", layerdrop, target, "no layerdrop")
    if block.attn.qkv.bias is None:
        raise _refuse("attention bias", False, target, "HF projections have biases")
    return dict(dim=trunk.dim, depth=trunk.depth, heads=block.attn.heads, ffn_dim=block.fc1.out_features,
                dropout=trunk.drop.p, attn_dropout=block.attn.dropout, act_dropout=act_dropout,
                layerdrop=layerdrop, eps=eps.pop(), pre_norm=trunk.pre_norm)


def _absolute_table(encoder: Encoder, target: str, n: int, grid: tuple[int, int] | None) -> Tensor:
    """(N, D) values our absolute positions add for a fixed input size (zeros when there are none)."""
    pos = encoder.positions
    if pos is None:
        return torch.zeros(n, encoder.dim)
    if getattr(pos, "relative", False):
        raise _refuse("positions", type(pos).__name__, target, "HF uses an absolute position table here")
    with torch.no_grad():
        return pos(torch.zeros(1, n, encoder.dim, dtype=torch.float32), None, grid)[0].float()


# ---------------------------------------------------------------------------------------------------------
# wav2vec 2.0 / HuBERT


def _wav2vec2_pairs(encoder: Encoder, model: Wav2Vec2Model | HubertModel) -> Pairs:
    pairs: Pairs = []
    for conv, norm, layer in zip(encoder.frontend.convs, encoder.frontend.norms,
                                 model.feature_extractor.conv_layers, strict=True):
        pairs.append((conv.weight, layer.conv.weight))
        if conv.bias is not None:
            pairs.append((conv.bias, layer.conv.bias))
        if not isinstance(norm, nn.Identity):
            pairs += _norm(norm, layer.layer_norm)
    proj = model.feature_projection
    if not isinstance(encoder.feature_norm, nn.Identity):
        pairs += _norm(encoder.feature_norm, proj.layer_norm)
    if not isinstance(encoder.proj, nn.Identity):  # else exported as an identity projection (_wav2vec2_export)
        pairs += _linear(encoder.proj, proj.projection)
    if getattr(model, "masked_spec_embed", None) is not None:  # only built when mask_time/feature_prob > 0
        pairs.append((encoder.mask_emb, model.masked_spec_embed))

    src = model.encoder.pos_conv_embed.conv
    if hasattr(src, "parametrizations"):  # torch parametrizations (HF 5.x): original0 = g, original1 = v
        g, v = src.parametrizations.weight.original0, src.parametrizations.weight.original1
    else:  # legacy nn.utils.weight_norm
        g, v = src.weight_g, src.weight_v
    dst = encoder.positions.conv
    pairs += [(dst.parametrizations.weight.original0, g), (dst.parametrizations.weight.original1, v),
              (dst.bias, src.bias)]

    pairs += _norm(encoder.trunk.norm, model.encoder.layer_norm)
    for block, layer in zip(encoder.trunk.blocks, model.encoder.layers, strict=True):
        a, ff = layer.attention, layer.feed_forward
        pairs += _block(block, q=a.q_proj, k=a.k_proj, v=a.v_proj, out=a.out_proj, norm1=layer.layer_norm,
                        fc1=ff.intermediate_dense, fc2=ff.output_dense, norm2=layer.final_layer_norm)
    return pairs


def _wav2vec2_head_pairs(model: Wav2Vec2ForPreTraining, quantizer: GumbelQuantizer, project_q: nn.Linear,
                         final_proj: nn.Linear) -> Pairs:
    codebook = quantizer.codebook  # (G, V, d) <-> HF codevectors (1, G*V, d): index g*V + v
    return ([(codebook.view(1, -1, codebook.shape[-1]), model.quantizer.codevectors)]
            + _linear(quantizer.weight_proj, model.quantizer.weight_proj) + _linear(project_q, model.project_q)
            + _linear(final_proj, model.project_hid))


@torch.no_grad()
def encoder_from_hf_wav2vec2(model: Wav2Vec2Model | HubertModel | Wav2Vec2ForPreTraining) -> Encoder:
    """transformers.Wav2Vec2Model (or HubertModel, same layout, or the `.wav2vec2` of a
    Wav2Vec2ForPreTraining) -> our audio Encoder.

    feature_extractor -> ConvFeatureExtractor (feat_extract_norm "group"/"layer", conv_bias),
    feature_projection.layer_norm / .projection -> Encoder.feature_norm / Encoder.proj,
    masked_spec_embed -> Encoder.mask_emb, encoder.pos_conv_embed -> ConvPositions (weight-normed grouped conv),
    encoder.layer_norm -> Transformer.norm (input norm when post-LN, final norm when do_stable_layer_norm).

    With padded batches our extractor's GroupNorm uses valid frames only (see the NOTE(ref) in frontends.py):
    the imported encoder equals HF on each utterance alone, not HF on the padded batch.
    """
    model = getattr(model, "wav2vec2", model)
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
    encoder = Encoder(frontend, trunk, positions=positions, feature_norm=has_feature_norm,
                      feature_norm_eps=cfg.layer_norm_eps, project=True, dropout_input=cfg.feat_proj_dropout)
    _import(_wav2vec2_pairs(encoder, model))
    return encoder


encoder_from_hf_hubert = encoder_from_hf_wav2vec2


@torch.no_grad()
def wav2vec2_heads_from_hf(model: Wav2Vec2ForPreTraining) -> dict[str, nn.Module]:
    """The pretraining heads of a transformers.Wav2Vec2ForPreTraining, under our objective's attribute names:
    {"quantizer": GumbelQuantizer, "project_q": Linear, "final_proj": Linear} (HF project_hid). The
    quantizer's τ is set from `config.omnissl_gumbel_temperature` when an export of ours wrote it."""
    cfg = model.config
    groups, entries, vq_dim = cfg.num_codevector_groups, cfg.num_codevectors_per_group, cfg.codevector_dim
    quantizer = GumbelQuantizer(in_dim=cfg.conv_dim[-1], vq_dim=vq_dim, groups=groups, entries=entries)
    temperature = getattr(cfg, "omnissl_gumbel_temperature", None)
    if temperature is not None:
        quantizer.temperature = float(temperature)
    project_q = nn.Linear(vq_dim, cfg.proj_codevector_dim)
    final_proj = nn.Linear(cfg.hidden_size, cfg.proj_codevector_dim)
    _import(_wav2vec2_head_pairs(model, quantizer, project_q, final_proj))
    return {"quantizer": quantizer, "project_q": project_q, "final_proj": final_proj}


@torch.no_grad()
def _wav2vec2_export(encoder: Encoder, model: Wav2Vec2Model | HubertModel) -> None:
    _export(_wav2vec2_pairs(encoder, model))
    if isinstance(encoder.proj, nn.Identity):
        # NOTE(ref): HF always projects (feature_projection.projection); without a projection of ours we write
        # an identity matrix and zero bias, which give the same values exactly (x·1 + 0)
        projection = model.feature_projection.projection
        projection.weight.copy_(torch.eye(projection.out_features, projection.in_features))
        projection.bias.zero_()


# Keys of `extra_config` for Wav2Vec2ForPreTraining: HF training options our objective also has.
WAV2VEC2_PRETRAINING_OPTIONS = ("feat_quantizer_dropout", "num_negatives", "contrastive_logits_temperature",
                                "diversity_loss_weight", "omnissl_gumbel_temperature")


def _wav2vec2_config(encoder: Encoder, target: str, hubert: bool) -> dict:
    f = encoder.frontend
    if not isinstance(f, ConvFeatureExtractor):
        raise _refuse("frontend", type(f).__name__, target, "needs the conv feature extractor (ConvFeatureExtractor)")
    if encoder.cls_token is not None:
        raise _refuse("cls_token", True, target, "no CLS token on audio")
    if not isinstance(encoder.positions, ConvPositions):
        raise _refuse("positions", type(encoder.positions).__name__, target,
                      "needs the convolutional relative positions (ConvPositions)")
    has_norm = not isinstance(encoder.feature_norm, nn.Identity)
    if not has_norm and not hubert:
        raise _refuse("feature_norm", False, target,
                      "Wav2Vec2Model always has feature_projection.layer_norm (only HubertConfig has "
                      "feat_proj_layer_norm=False)")
    for i, norm in enumerate(f.norms):
        if not isinstance(norm, nn.Identity) and norm.eps != 1e-5:
            raise _refuse(f"frontend.norms[{i}].eps", norm.eps, target, "HF builds the conv norms with eps 1e-5")
    t = _trunk_config(encoder, target, training_options=True)
    if has_norm and encoder.feature_norm.eps != t["eps"]:
        raise _refuse("feature_norm_eps", encoder.feature_norm.eps, target,
                      f"HF uses the trunk's layer_norm_eps ({t['eps']}) for the feature LayerNorm")
    kw = dict(
        hidden_size=t["dim"], num_hidden_layers=t["depth"], num_attention_heads=t["heads"],
        intermediate_size=t["ffn_dim"], hidden_act="gelu", hidden_dropout=t["dropout"],
        attention_dropout=t["attn_dropout"], activation_dropout=t["act_dropout"], layerdrop=t["layerdrop"],
        layer_norm_eps=t["eps"], do_stable_layer_norm=t["pre_norm"], feat_extract_norm=f.mode,
        feat_extract_activation="gelu", conv_dim=[c for c, _, _ in f.layers], conv_kernel=[k for _, k, _ in f.layers],
        conv_stride=[s for _, _, s in f.layers], conv_bias=f.convs[0].bias is not None,
        num_conv_pos_embeddings=encoder.positions.conv.kernel_size[0],
        num_conv_pos_embedding_groups=encoder.positions.conv.groups,
        feat_proj_dropout=encoder.dropout_input.p,
        mask_time_prob=0.05,  # HF's default; > 0 so that masked_spec_embed exists and carries our mask_emb
    )
    if hubert:
        kw["feat_proj_layer_norm"] = has_norm
    return kw


@torch.no_grad()
def encoder_to_hf_wav2vec2(
    encoder: Encoder,
    *,
    hubert: bool = False,
    heads: dict[str, nn.Module] | None = None,
    extra_config: dict | None = None,
) -> Wav2Vec2Model | HubertModel | Wav2Vec2ForPreTraining:
    """Our audio Encoder -> transformers.Wav2Vec2Model (or HubertModel with hubert=True).

    heads: {"quantizer": GumbelQuantizer, "project_q": Linear, "final_proj": Linear} (a Wav2Vec2 objective's
    modules) -> Wav2Vec2ForPreTraining instead. extra_config: values of WAV2VEC2_PRETRAINING_OPTIONS to write
    into its config (our dropout_features, num_distractors, logit_temp, diversity_weight and τ).
    """
    import transformers

    target = "HubertModel" if hubert else ("Wav2Vec2ForPreTraining" if heads else "Wav2Vec2Model")
    kw = _wav2vec2_config(encoder, target, hubert)
    extra = dict(extra_config or {})
    unknown = sorted(set(extra) - set(WAV2VEC2_PRETRAINING_OPTIONS))
    if unknown:
        raise ValueError(f"extra_config keys {unknown} are not among {list(WAV2VEC2_PRETRAINING_OPTIONS)}")
    if hubert:
        if heads:
            raise ValueError(f"heads {sorted(heads)}: HubertModel has no pretraining heads to export them into")
        model = transformers.HubertModel(transformers.HubertConfig(**kw))
        _wav2vec2_export(encoder, model)
        return model.eval()
    if not heads:
        model = transformers.Wav2Vec2Model(transformers.Wav2Vec2Config(**kw))
        _wav2vec2_export(encoder, model)
        return model.eval()

    if set(heads) != {"quantizer", "project_q", "final_proj"}:
        raise ValueError(f"heads must be exactly quantizer, project_q and final_proj, got {sorted(heads)}")
    q, project_q, final_proj = heads["quantizer"], heads["project_q"], heads["final_proj"]
    if not isinstance(q, GumbelQuantizer):
        raise ValueError(f"heads['quantizer'] must be a GumbelQuantizer, got {type(q).__name__}")
    if q.weight_proj.in_features != encoder.frontend.out_dim:
        raise ValueError(f"quantizer input width {q.weight_proj.in_features} != conv width {encoder.frontend.out_dim}"
                         " (HF quantizes the normalized conv features)")
    if final_proj.in_features != encoder.dim or final_proj.out_features != project_q.out_features:
        raise ValueError("final_proj must map the trunk width to project_q's output width (HF project_hid)")
    kw.update(num_codevector_groups=q.groups, num_codevectors_per_group=q.entries, codevector_dim=q.vq_dim,
              proj_codevector_dim=final_proj.out_features, **extra)
    kw.setdefault("omnissl_gumbel_temperature", float(q.temperature))
    model = transformers.Wav2Vec2ForPreTraining(transformers.Wav2Vec2Config(**kw))
    _wav2vec2_export(encoder, model.wav2vec2)
    _export(_wav2vec2_head_pairs(model, q, project_q, final_proj))
    return model.eval()


# ---------------------------------------------------------------------------------------------------------
# RoBERTa


def _roberta_pairs(encoder: Encoder, model: RobertaModel) -> Pairs:
    """Everything but the positions (folded with the token type, handled per direction)."""
    emb = model.embeddings
    pairs = [(encoder.frontend.embed.weight, emb.word_embeddings.weight)] + _norm(encoder.trunk.norm, emb.LayerNorm)
    for block, layer in zip(encoder.trunk.blocks, model.encoder.layer, strict=True):
        a = layer.attention
        pairs += _block(block, q=a.self.query, k=a.self.key, v=a.self.value, out=a.output.dense,
                        norm1=a.output.LayerNorm, fc1=layer.intermediate.dense, fc2=layer.output.dense,
                        norm2=layer.output.LayerNorm)
    return pairs


def _lm_head_pairs(head: MaskedLMHead, model: RobertaForMaskedLM) -> Pairs:
    lm = model.lm_head
    return _linear(head.dense, lm.dense) + _norm(head.norm, lm.layer_norm) + [(head.bias, lm.bias)]


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
    _import(_roberta_pairs(encoder, model))
    _copy(encoder.positions.weight, emb.position_embeddings.weight[pad + 1 :] + emb.token_type_embeddings.weight[0])
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
    _import(_lm_head_pairs(head, model))
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
        raise _refuse("frontend", type(f).__name__, target, "needs token ids (TokenEmbedding)")
    pos = encoder.positions
    if not isinstance(pos, LearnedPositions) or pos.grid is not None:
        raise _refuse("positions", type(pos).__name__, target, "RoBERTa has a 1-D learned position table")
    for option, value, ok in (("feature_norm", True, isinstance(encoder.feature_norm, nn.Identity)),
                              ("project", True, isinstance(encoder.proj, nn.Identity)),
                              ("cls_token", True, encoder.cls_token is None),
                              ("dropout_input", encoder.dropout_input.p, encoder.dropout_input.p == 0)):
        if not ok:
            raise _refuse(option, value, target, "RoBERTa's embeddings are word + position -> LayerNorm")
    t = _trunk_config(encoder, target, training_options=False)
    if t["pre_norm"]:
        raise _refuse("trunk pre_norm", True, target, "RoBERTa is post-LN")
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
            raise _refuse("lm_head eps", lm_head.norm.eps, target, f"HF uses layer_norm_eps ({t['eps']})")
        model = transformers.RobertaForMaskedLM(cfg)
        base = model.roberta
        _export(_lm_head_pairs(lm_head, model))
    _export(_roberta_pairs(encoder, base))
    emb = base.embeddings
    # NOTE(ref): RoBERTa adds token_type_embeddings[0] and numbers positions from pad + 1; we have neither, so
    # the token-type row and positions 0..pad are written as zeros (same outputs for right-padded ids).
    emb.position_embeddings.weight.zero_()
    _copy(emb.position_embeddings.weight[pad + 1 :], pos.weight)
    emb.token_type_embeddings.weight.zero_()
    if lm_head is not None:
        model.tie_weights()
        if not torch.equal(model.lm_head.decoder.weight, emb.word_embeddings.weight):
            raise RuntimeError("RobertaForMaskedLM did not tie its decoder to the word embeddings")
    return model.eval()


# ---------------------------------------------------------------------------------------------------------
# ViT / ViT-MAE


def _vit_pairs(encoder: Encoder, model: ViTModel | ViTMAEModel) -> Pairs:
    """Everything but CLS and positions (folded, handled per direction)."""
    if not hasattr(model, "layers"):
        import transformers

        raise ValueError(f"{type(model).__name__} of transformers {transformers.__version__} has the older "
                         "encoder.layer layout; omnissl converts the ViT layout of transformers 5.x "
                         "(layers.N.attention.q_proj)")
    proj = model.embeddings.patch_embeddings.projection
    pairs = _linear(encoder.frontend.proj, proj) + _norm(encoder.trunk.norm, model.layernorm)
    for block, layer in zip(encoder.trunk.blocks, model.layers, strict=True):
        a = layer.attention
        pairs += _block(block, q=a.q_proj, k=a.k_proj, v=a.v_proj, out=a.o_proj, norm1=layer.layernorm_before,
                        fc1=layer.mlp.fc1, fc2=layer.mlp.fc2, norm2=layer.layernorm_after)
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
    _require(cfg, "hidden_act", cfg.hidden_act, "gelu")
    _require(cfg, "qkv_bias", cfg.qkv_bias, True)
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
        _copy(positions.weight, table[0, 1:])

    dropout = cfg.hidden_dropout_prob
    trunk = Transformer(dim=dim, depth=cfg.num_hidden_layers, heads=cfg.num_attention_heads,
                        ffn_dim=cfg.intermediate_size, pre_norm=True, dropout=dropout,
                        attn_dropout=cfg.attention_probs_dropout_prob, eps=cfg.layer_norm_eps)
    encoder = Encoder(ImagePatches(dim=dim, patch=p, channels=cfg.num_channels), trunk, positions=positions,
                      feature_norm=False, project=False, cls_token=True)
    _import(_vit_pairs(encoder, model))
    _copy(encoder.cls_token, model.embeddings.cls_token + table[:, :1])
    mask_token = getattr(model.embeddings, "mask_token", None)  # ViTModel(use_mask_token=True) only
    if mask_token is not None:
        _copy(encoder.mask_emb, mask_token.reshape(-1))
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
        raise _refuse("frontend", type(f).__name__, target, "needs image patches (ImagePatches)")
    if encoder.cls_token is None:
        raise _refuse("cls_token", False, target, "ViT always prepends a CLS token")
    for option, value, ok in (("feature_norm", True, isinstance(encoder.feature_norm, nn.Identity)),
                              ("project", True, isinstance(encoder.proj, nn.Identity)),
                              ("dropout_input", encoder.dropout_input.p, encoder.dropout_input.p == 0)):
        if not ok:
            raise _refuse(option, value, target, "ViT embeds patches -> + positions directly")
    t = _trunk_config(encoder, target, training_options=False)
    if not t["pre_norm"]:
        raise _refuse("trunk pre_norm", False, target, "ViT is pre-LN")
    if mae and t["dropout"]:
        raise _refuse("trunk dropout", t["dropout"], target, "ViTMAE's embeddings have no dropout (ours drops the "
                      "trunk input)")
    height, width = _image_size(image_size)
    if height % f.patch or width % f.patch:
        raise ValueError(f"image_size {image_size!r} is not divisible by the patch size {f.patch}")
    grid = (height // f.patch, width // f.patch)
    table = _absolute_table(encoder, target, grid[0] * grid[1], grid)

    kw = dict(hidden_size=t["dim"], num_hidden_layers=t["depth"], num_attention_heads=t["heads"],
              intermediate_size=t["ffn_dim"], hidden_act="gelu", hidden_dropout_prob=t["dropout"],
              attention_probs_dropout_prob=t["attn_dropout"], layer_norm_eps=t["eps"],
              image_size=height if height == width else [height, width], patch_size=f.patch,
              num_channels=f.proj.in_channels, qkv_bias=True)
    if mae:
        model = transformers.ViTMAEModel(transformers.ViTMAEConfig(mask_ratio=0.0, **kw))
    else:
        model = transformers.ViTModel(transformers.ViTConfig(**kw), add_pooling_layer=False)
    _export(_vit_pairs(encoder, model))
    emb = model.embeddings
    # NOTE(ref): HF ViT adds position_embeddings[0] to the CLS token; ours has no CLS position, so that row
    # is zero and HF's cls_token is ours (import folds a non-zero row into our cls_token instead).
    _copy(emb.cls_token, encoder.cls_token)
    emb.position_embeddings.zero_()
    _copy(emb.position_embeddings[0, 1:], table)
    return model.eval()


# ---------------------------------------------------------------------------------------------------------
# Any family


def encoder_to_hf(
    encoder: Encoder,
    *,
    hubert: bool = False,
    mae: bool = False,
    heads: dict[str, nn.Module] | None = None,
    image_size: int | tuple[int, int] | None = None,
    extra_config: dict | None = None,
) -> PreTrainedModel:
    """Our Encoder -> the transformers model of its family, chosen by the frontend: conv extractor ->
    Wav2Vec2Model / HubertModel (hubert) / Wav2Vec2ForPreTraining (heads), token embedding -> RobertaModel /
    RobertaForMaskedLM (heads={"lm_head": MaskedLMHead}), image patches -> ViTModel / ViTMAEModel (mae;
    needs image_size). Anything else raises ValueError naming the frontend."""
    f = encoder.frontend
    for option, value, applies in (("hubert", hubert, ConvFeatureExtractor), ("mae", mae, ImagePatches),
                                   ("image_size", image_size, ImagePatches)):
        if value not in (None, False) and not isinstance(f, applies):
            raise ValueError(f"{option}={value!r} only applies to {applies.__name__} encoders, this one has "
                             f"{type(f).__name__}")
    if isinstance(f, ConvFeatureExtractor):
        return encoder_to_hf_wav2vec2(encoder, hubert=hubert, heads=heads, extra_config=extra_config)
    if extra_config:
        raise ValueError(f"extra_config {sorted(extra_config)} only applies to wav2vec 2.0 pretraining heads")
    if isinstance(f, TokenEmbedding):
        heads = dict(heads or {})
        lm_head = heads.pop("lm_head", None)
        if heads or (lm_head is not None and not isinstance(lm_head, MaskedLMHead)):
            raise ValueError(f"text heads: only {{'lm_head': MaskedLMHead}} maps (RobertaForMaskedLM), got "
                             f"{sorted(heads) + ([] if lm_head is None else [type(lm_head).__name__])}")
        return encoder_to_hf_roberta(encoder, lm_head=lm_head)
    if isinstance(f, ImagePatches):
        if heads:
            raise ValueError(f"heads {sorted(heads)}: ViTModel / ViTMAEModel have no pretraining heads of ours "
                             "to export into (our MAE decoder is not mapped to ViTMAEForPreTraining)")
        if image_size is None:
            raise ValueError("image_size is required for image encoders: HF's ViT position table has a fixed size")
        return encoder_to_hf_vit(encoder, image_size=image_size, mae=mae)
    raise ValueError(f"frontend={type(f).__name__} has no Hugging Face equivalent (supported: ConvFeatureExtractor "
                     "-> wav2vec 2.0 / HuBERT, TokenEmbedding -> RoBERTa, ImagePatches -> ViT / ViT-MAE)")


# ---------------------------------------------------------------------------------------------------------
# Any local transformers directory


def hf_model_to_encoder(model: PreTrainedModel) -> Encoder:
    """Dispatch on the HF class: wav2vec 2.0 / HuBERT, RoBERTa, ViT / ViTMAE (base models or their
    pretraining wrappers) -> our Encoder."""
    import transformers as T

    if isinstance(model, (T.Wav2Vec2Model, T.HubertModel, T.Wav2Vec2ForPreTraining)):
        return encoder_from_hf_wav2vec2(model)
    if isinstance(model, (T.RobertaModel, T.RobertaForMaskedLM)):
        return encoder_from_hf_roberta(model)
    if isinstance(model, (T.ViTModel, T.ViTMAEModel)):
        return encoder_from_hf_vit(model)
    raise ValueError(f"{type(model).__name__} (model_type {model.config.model_type!r}) has no omnissl importer; "
                     "supported: wav2vec2, hubert, roberta, vit, vit_mae")


def encoder_from_hf(path: str) -> Encoder:
    """A local transformers model directory (config.json + model.safetensors) -> our Encoder, offline.

    Usable from a recipe to continue pretraining an HF model:

        encoder:
          class_path: omnissl.eval.export.encoder_from_hf
          init_args: {path: /models/wav2vec2-base}

    Loads with `AutoModel` (the base model of a pretraining checkpoint), `local_files_only` and safetensors
    only (no pickled weights, no remote code). Returned in train mode, fp32.
    """
    import transformers

    d = Path(path)
    if not (d / "config.json").is_file():
        raise FileNotFoundError(f"encoder_from_hf: {d} is not a local transformers model directory (no "
                                "config.json); nothing is downloaded")
    config = transformers.AutoConfig.from_pretrained(d, local_files_only=True, trust_remote_code=False)
    kwargs = {"add_pooling_layer": False} if config.model_type in ("roberta", "vit") else {}  # poolers not imported
    model = transformers.AutoModel.from_pretrained(d, config=config, local_files_only=True, use_safetensors=True,
                                                   trust_remote_code=False, **kwargs)
    return hf_model_to_encoder(model).train()
