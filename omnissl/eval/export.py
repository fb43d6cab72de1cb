"""A Lightning checkpoint -> an omnissl encoder package, or a Hugging Face directory (`omnissl export`,
omnissl/commands/export.py).

    omnissl export CHECKPOINT DIR [--hf] [--heads] [--image-size H [W]] [--overwrite]

reads a Lightning checkpoint of any objective through omnissl.checkpoints.read_checkpoint (weights only: a
checkpoint holding pickled objects other than tensors and plain data is refused), and writes a package
(omnissl.checkpoints.save_backbone's format), or with --hf a transformers directory (`from_pretrained(dir)`
offline; families and unmapped options in omnissl/eval/hf/). --heads adds the objective's other modules
(package: all of them, e.g. quantizer, decoder, teacher, lm_head; --hf: wav2vec 2.0's quantizer, project_q
and final_proj -> Wav2Vec2ForPreTraining, MaskedLM's lm_head -> RobertaForMaskedLM).

A text encoder's tokenizer travels with it: the checkpoint holds the text of its run's tokenizer file
(checkpoint["omnissl"]["tokenizer"]); a package gets it as tokenizer.json, a --hf export as tokenizer.json +
tokenizer_config.json with the special-token roles set (eval/hf/tokenizer.py), so that AutoTokenizer loads it.
A MaskedLM checkpoint exported with --hf --heads becomes a RobertaForMaskedLM. A CLAP checkpoint exports its
audio tower alone as any encoder; with --heads (package) both towers, projections and logit scale
(omnissl/eval/zeroshot.py `export_clap`: the audio tower's package with `text/` and `clap.json` inside).

An audio --hf export also writes preprocessor_config.json (Wav2Vec2FeatureExtractor, 16 kHz), so that
`AutoFeatureExtractor.from_pretrained(dir)` prepares raw audio as training did: do_normalize is the training data
module's `normalize` (checkpoint["datamodule_hyper_parameters"]; False when absent: raw-waveform base models train
without normalization), return_attention_mask follows HF's convention (True for the layer-norm extractor only:
zero padding changes a group-norm extractor's statistics, so base models are run unpadded, one utterance at a time).
NOTE(ref): our normalization is fairseq's `F.layer_norm(wav, wav.shape)` (eps 1e-5), HF's
zero_mean_unit_var_norm uses eps 1e-7: the same up to ~1e-5 relative for audio of ordinary loudness.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from omnissl.backbones.frontends import ConvFeatureExtractor
from omnissl.batch import SAMPLE_RATE
from omnissl.backbones.encoder import Encoder
from omnissl.checkpoints import TOKENIZER, Checkpoint, encoder_info, load_strict, read_checkpoint, write_package
from omnissl.eval.hf import encoder_to_hf
from omnissl.eval.hf.tokenizer import save_hf_tokenizer
from omnissl.eval.zeroshot import export_clap
from omnissl.progress import progress
from omnissl.ssl.heads import MaskedLMHead
from omnissl.ssl.quantizer import GumbelQuantizer

__all__ = ["export_checkpoint", "trained_with_normalized_audio", "feature_extractor", "masked_lm_head"]


def masked_lm_head(weights: dict[str, torch.Tensor], encoder: Encoder, source: str = "lm_head") -> MaskedLMHead:
    """A MaskedLM objective's `lm_head` rebuilt from its weights, for `encoder` (the head is tied to its token
    embedding; its LayerNorm eps is the trunk's, as MaskedLM builds it)."""
    if "bias" not in weights:
        raise ValueError(f"{source}: no masked-LM head weights (lm_head.bias missing)")
    head = MaskedLMHead(dim=encoder.dim, vocab_size=weights["bias"].shape[0], eps=encoder.trunk.norm.eps)
    load_strict(head, weights, source)
    return head


def _masked_lm_heads(ckpt: Checkpoint) -> dict[str, nn.Module]:
    if "lm_head" not in ckpt.heads:
        raise ValueError(f"--heads: the checkpoint has no lm_head weights (objective {ckpt.info.get('objective')})")
    return {"lm_head": masked_lm_head(ckpt.heads["lm_head"], ckpt.encoder, "checkpoint lm_head.*")}


def _wav2vec2_heads(ckpt: Checkpoint) -> tuple[dict[str, nn.Module], dict]:
    """Rebuild a Wav2Vec2 objective's quantizer / project_q / final_proj from their weights' shapes, and the
    HF config values from the objective's checkpoint metadata."""
    need = ("quantizer", "project_q", "final_proj")
    missing = [n for n in need if n not in ckpt.heads]
    if missing:
        raise ValueError(f"--heads: the checkpoint has no {missing} weights (objective {ckpt.info.get('objective')}); "
                         "only a wav2vec 2.0 objective's quantizer maps to a Hugging Face pretraining model")
    q_state = ckpt.heads["quantizer"]
    groups, entries, d = q_state["codebook"].shape
    quantizer = GumbelQuantizer(in_dim=q_state["weight_proj.weight"].shape[1], vq_dim=groups * d, groups=groups,
                                entries=entries)
    load_strict(quantizer, q_state, "checkpoint quantizer.*")
    linears = {}
    for name in ("project_q", "final_proj"):
        out_dim, in_dim = ckpt.heads[name]["weight"].shape
        linears[name] = nn.Linear(in_dim, out_dim)
        load_strict(linears[name], ckpt.heads[name], f"checkpoint {name}.*")
    meta = ckpt.info.get("metadata", {})
    if "gumbel_temperature" in meta:
        quantizer.temperature = float(meta["gumbel_temperature"])
    names = {"dropout_features": "feat_quantizer_dropout", "num_distractors": "num_negatives",
             "logit_temp": "contrastive_logits_temperature", "diversity_weight": "diversity_loss_weight",
             "gumbel_temperature": "omnissl_gumbel_temperature"}
    extra = {hf: meta[ours] for ours, hf in names.items() if ours in meta}
    return {"quantizer": quantizer, **linears}, extra


def export_checkpoint(checkpoint: str | Path, out: str | Path, *, hf: bool = False, heads: bool = False,
                      image_size: int | tuple[int, int] | None = None, overwrite: bool = True) -> Path:
    """`omnissl export`: a Lightning checkpoint -> an encoder package, or a transformers directory (hf)."""
    with progress(total=2, desc=f"export {Path(checkpoint).name}", unit="step") as bar:
        bar.set_postfix_str("reading the checkpoint")
        ckpt = read_checkpoint(checkpoint)
        bar.update()
        bar.set_postfix_str("converting and writing")
        out = _export(ckpt, checkpoint, out, hf=hf, heads=heads, image_size=image_size, overwrite=overwrite)
        bar.update()
    return out


def _export(ckpt: Checkpoint, checkpoint: str | Path, out: str | Path, *, hf: bool, heads: bool,
            image_size: int | tuple[int, int] | None, overwrite: bool) -> Path:
    objective = str(ckpt.info.get("objective", ""))
    out = Path(out)
    if heads and not hf and objective.rsplit(".", 1)[-1] == "CLAP":  # both towers, projections, logit scale
        return export_clap(checkpoint, out, overwrite=overwrite)
    if not hf:
        state = {f"encoder.{k}": v for k, v in ckpt.encoder.state_dict().items()}
        classes = {}
        if heads:
            head_classes = ckpt.info.get("heads", {})
            for name, weights in ckpt.heads.items():
                classes[name] = str(head_classes.get(name, "unknown"))
                state.update({f"heads.{name}.{k}": v for k, v in weights.items()})
        info = encoder_info(ckpt.encoder, objective=objective, checkpoint=str(checkpoint), global_step=ckpt.global_step)
        write_package(out, ckpt.info["encoder"], state, classes, info, overwrite=overwrite)
        if isinstance(ckpt.info.get("tokenizer"), str):  # a text encoder: its tokenizer travels with it
            (out / TOKENIZER).write_text(ckpt.info["tokenizer"], encoding="utf-8")
        return out

    if not overwrite and out.is_dir() and any(out.iterdir()):
        raise ValueError(f"{out} is not empty; pass --overwrite to replace its files")
    short = objective.rsplit(".", 1)[-1]
    hf_heads, extra = None, None
    if heads:
        if short == "Wav2Vec2":
            hf_heads, extra = _wav2vec2_heads(ckpt)
        elif short == "MaskedLM":
            hf_heads = _masked_lm_heads(ckpt)
        else:
            raise ValueError(f"--heads with --hf: objective {objective or '<unknown>'} has no Hugging Face "
                             "pretraining class of ours (wav2vec 2.0 -> Wav2Vec2ForPreTraining, MaskedLM -> "
                             "RobertaForMaskedLM); drop --heads or export a package")
    model = encoder_to_hf(ckpt.encoder, hubert=short == "HuBERT", mae=short == "MAE", heads=hf_heads,
                          image_size=image_size, extra_config=extra)
    model.save_pretrained(str(out))
    if isinstance(ckpt.encoder.frontend, ConvFeatureExtractor):
        feature_extractor(normalize=trained_with_normalized_audio(checkpoint),
                          attention_mask=model.config.feat_extract_norm == "layer").save_pretrained(str(out))
    if isinstance(ckpt.info.get("tokenizer"), str):
        positions = getattr(ckpt.encoder.positions, "max_len", None)
        save_hf_tokenizer(ckpt.info["tokenizer"], out, model_max_length=positions)
    return out


def trained_with_normalized_audio(checkpoint: str | Path) -> bool:
    """Whether the run that wrote `checkpoint` fed its encoder per-utterance normalized waveforms: the data
    module's `normalize` hyperparameter (AudioDataModule saves it); False when the checkpoint records none.
    Read weights-only (mmap: the weights are not read again)."""
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
    data = ckpt.get("datamodule_hyper_parameters") or {}
    return bool(data.get("normalize", False)) if isinstance(data, dict) else False


def feature_extractor(*, normalize: bool, attention_mask: bool):
    """transformers' Wav2Vec2FeatureExtractor for our audio encoders (raw 16 kHz mono waveforms); its
    save_pretrained writes preprocessor_config.json."""
    from transformers import Wav2Vec2FeatureExtractor

    return Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=SAMPLE_RATE, padding_value=0.0,
                                    do_normalize=normalize, return_attention_mask=attention_mask)
