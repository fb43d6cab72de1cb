"""Weight conversion between Hugging Face `transformers` models and our `Encoder`, both ways, one module per
family; this package's own functions dispatch on the encoder's frontend or the HF class.

    family               module    HF class                     ours
    -------------------  --------  ---------------------------  ----------------------------------------------
    wav2vec 2.0, HuBERT  wav2vec2  Wav2Vec2Model, HubertModel   ConvFeatureExtractor + ConvPositions
      + heads                      Wav2Vec2ForPreTraining       GumbelQuantizer, project_q, final_proj
    RoBERTa              roberta   RobertaModel                 TokenEmbedding + LearnedPositions
      + heads                      RobertaForMaskedLM           MaskedLMHead
    ViT, ViT-MAE         vit       ViTModel, ViTMAEModel        ImagePatches + absolute positions + CLS

Each family pairs every one of our tensors with the HF tensor it equals (its `_*_pairs`), and import and export
copy along the same pairs in opposite directions (common.py); only folded parameters (see each family) are
handled per direction.

Not mapped on any family, so a model using them raises ValueError naming the option (no silently different
model): LogMelPatches (spectrogram patches); activation dropout or layerdrop outside wav2vec 2.0 / HuBERT; trunk
LayerNorms with different eps; HF configs with non-GELU activations, adapters, relative attention, decoders, a
qkv without bias. The other limits are in each family's docstring.

Models are returned in eval mode, fp32, built offline from configs; nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from torch import nn

from omnissl.backbones.encoder import Encoder
from omnissl.backbones.frontends import ConvFeatureExtractor, ImagePatches, TokenEmbedding
from omnissl.eval.hf.roberta import encoder_from_hf_roberta, encoder_to_hf_roberta
from omnissl.eval.hf.vit import encoder_from_hf_vit, encoder_to_hf_vit
from omnissl.eval.hf.wav2vec2 import encoder_from_hf_wav2vec2, encoder_to_hf_wav2vec2
from omnissl.ssl.heads import MaskedLMHead

if TYPE_CHECKING:  # transformers is a dev extra, imported only by callers that pass or ask for its models
    from transformers import PreTrainedModel

__all__ = ["encoder_to_hf", "hf_model_to_encoder", "encoder_from_hf"]


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
          class_path: omnissl.eval.hf.encoder_from_hf
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
