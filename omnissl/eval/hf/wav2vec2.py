"""wav2vec 2.0 and HuBERT <-> our audio Encoder (and wav2vec 2.0's pretraining heads), both ways.

    HF class (export: encoder_to_hf_wav2vec2)            ours (import: encoder_from_hf_wav2vec2)
    ---------------------------------------------------  -----------------------------------------------------
    Wav2Vec2Model; feat_extract_norm "group" + post-LN,  ConvFeatureExtractor("group") + post-LN trunk (base) /
    or "layer" + do_stable_layer_norm (pre-LN)           ("layer", bias) + pre-LN (large); ConvPositions,
                                                         feature_norm, proj, mask_emb
    HubertModel (feat_proj_layer_norm may be False)      as wav2vec 2.0 (feature_norm=False allowed); HuBERT's
                                                         final_proj / label embeddings have no HF class and
                                                         are not exported
    Wav2Vec2ForPreTraining: quantizer (codevectors,      GumbelQuantizer (codebook, weight_proj), project_q,
    weight_proj), project_q, project_hid                 final_proj (the objective's names)

Not mapped (ValueError naming the option): positions other than ConvPositions, a CLS token, wav2vec 2.0 without
feature_norm (only HuBERT has `feat_proj_layer_norm`), a feature_norm eps other than the trunk's, conv norms with
eps other than 1e-5. An encoder without a projection (conv width == trunk width) exports an identity projection
(exact); importing that back gives an encoder with the projection.

Semantics worth knowing:
  * Gumbel temperature: HF's quantizer starts at 2 (hard-coded, not in its config) and uses
    `gumbel_softmax(logits, tau)` in training, argmax in eval, as ours does. Export writes our current τ as
    `config.omnissl_gumbel_temperature`; call `model.set_gumbel_temperature(...)` with it (and anneal) to
    continue training in HF. Import sets the quantizer's τ from it when present.
  * Export keeps HF's `mask_time_prob` default (0.05, so `masked_spec_embed` exists and carries our mask
    embedding): HF applies SpecAugment with it when fine-tuning in train mode.
  * Padding: with the group-norm extractor our padded batches take GroupNorm statistics over valid frames only
    (frontends.py), so they equal HF on each utterance alone.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from omnissl.backbones.encoder import Encoder
from omnissl.backbones.frontends import ConvFeatureExtractor
from omnissl.backbones.transformer import ConvPositions, Transformer
from omnissl.eval.hf.common import (Pairs, block_pairs, export_pairs, import_pairs, linear_pairs, norm_pairs,
                                    refuse, require, trunk_config)
from omnissl.ssl.quantizer import GumbelQuantizer

if TYPE_CHECKING:  # transformers is a dev extra, imported only by callers that pass or ask for its models
    from transformers import HubertModel, Wav2Vec2ForPreTraining, Wav2Vec2Model


def _wav2vec2_pairs(encoder: Encoder, model: Wav2Vec2Model | HubertModel) -> Pairs:
    pairs: Pairs = []
    for conv, norm, layer in zip(encoder.frontend.convs, encoder.frontend.norms,
                                 model.feature_extractor.conv_layers, strict=True):
        pairs.append((conv.weight, layer.conv.weight))
        if conv.bias is not None:
            pairs.append((conv.bias, layer.conv.bias))
        if not isinstance(norm, nn.Identity):
            pairs += norm_pairs(norm, layer.layer_norm)
    proj = model.feature_projection
    if not isinstance(encoder.feature_norm, nn.Identity):
        pairs += norm_pairs(encoder.feature_norm, proj.layer_norm)
    if not isinstance(encoder.proj, nn.Identity):  # else exported as an identity projection (_wav2vec2_export)
        pairs += linear_pairs(encoder.proj, proj.projection)
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

    pairs += norm_pairs(encoder.trunk.norm, model.encoder.layer_norm)
    for block, layer in zip(encoder.trunk.blocks, model.encoder.layers, strict=True):
        a, ff = layer.attention, layer.feed_forward
        pairs += block_pairs(block, q=a.q_proj, k=a.k_proj, v=a.v_proj, out=a.out_proj, norm1=layer.layer_norm,
                             fc1=ff.intermediate_dense, fc2=ff.output_dense, norm2=layer.final_layer_norm)
    return pairs


def _wav2vec2_head_pairs(model: Wav2Vec2ForPreTraining, quantizer: GumbelQuantizer, project_q: nn.Linear,
                         final_proj: nn.Linear) -> Pairs:
    codebook = quantizer.codebook  # (G, V, d) <-> HF codevectors (1, G*V, d): index g*V + v
    return ([(codebook.view(1, -1, codebook.shape[-1]), model.quantizer.codevectors)]
            + linear_pairs(quantizer.weight_proj, model.quantizer.weight_proj)
            + linear_pairs(project_q, model.project_q) + linear_pairs(final_proj, model.project_hid))


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
    require(cfg, "feat_extract_activation", cfg.feat_extract_activation, "gelu")
    require(cfg, "hidden_act", cfg.hidden_act, "gelu")
    require(cfg, "add_adapter", getattr(cfg, "add_adapter", False), False)
    require(cfg, "adapter_attn_dim", getattr(cfg, "adapter_attn_dim", None), None)
    require(cfg, "conv_pos_batch_norm", getattr(cfg, "conv_pos_batch_norm", False), False)
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
    import_pairs(_wav2vec2_pairs(encoder, model))
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
    import_pairs(_wav2vec2_head_pairs(model, quantizer, project_q, final_proj))
    return {"quantizer": quantizer, "project_q": project_q, "final_proj": final_proj}


@torch.no_grad()
def _wav2vec2_export(encoder: Encoder, model: Wav2Vec2Model | HubertModel) -> None:
    export_pairs(_wav2vec2_pairs(encoder, model))
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
        raise refuse("frontend", type(f).__name__, target, "needs the conv feature extractor (ConvFeatureExtractor)")
    if encoder.cls_token is not None:
        raise refuse("cls_token", True, target, "no CLS token on audio")
    if not isinstance(encoder.positions, ConvPositions):
        raise refuse("positions", type(encoder.positions).__name__, target,
                     "needs the convolutional relative positions (ConvPositions)")
    has_norm = not isinstance(encoder.feature_norm, nn.Identity)
    if not has_norm and not hubert:
        raise refuse("feature_norm", False, target,
                     "Wav2Vec2Model always has feature_projection.layer_norm (only HubertConfig has "
                     "feat_proj_layer_norm=False)")
    for i, norm in enumerate(f.norms):
        if not isinstance(norm, nn.Identity) and norm.eps != 1e-5:
            raise refuse(f"frontend.norms[{i}].eps", norm.eps, target, "HF builds the conv norms with eps 1e-5")
    t = trunk_config(encoder, target, training_options=True)
    if has_norm and encoder.feature_norm.eps != t["eps"]:
        raise refuse("feature_norm_eps", encoder.feature_norm.eps, target,
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
    export_pairs(_wav2vec2_head_pairs(model, q, project_q, final_proj))
    return model.eval()
