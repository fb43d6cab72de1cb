"""`omnissl export`: a Lightning checkpoint -> an omnissl encoder package, or a Hugging Face directory.

    omnissl export CHECKPOINT DIR [--hf] [--heads] [--image-size H [W]] [--overwrite]

reads a Lightning checkpoint of any objective through omnissl.checkpoints.read_checkpoint (weights only: a
checkpoint holding pickled objects other than tensors and plain data is refused), and writes a package
(omnissl.checkpoints.save_backbone's format), or with --hf a transformers directory (`from_pretrained(dir)`
offline; families and unmapped options in hf.py). --heads adds the objective's other modules (package: all of
them, e.g. quantizer, decoder, teacher; --hf: wav2vec 2.0's quantizer, project_q and final_proj ->
Wav2Vec2ForPreTraining).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from torch import nn

from omnissl.checkpoints import Checkpoint, encoder_info, load_strict, read_checkpoint, write_package
from omnissl.eval.hf import (  # re-exported: recipes and users reach the conversions through this module
    encoder_from_hf,
    encoder_from_hf_hubert,
    encoder_from_hf_roberta,
    encoder_from_hf_vit,
    encoder_from_hf_wav2vec2,
    encoder_to_hf,
    encoder_to_hf_roberta,
    encoder_to_hf_vit,
    encoder_to_hf_wav2vec2,
    hf_model_to_encoder,
    lm_head_from_hf_roberta,
    wav2vec2_heads_from_hf,
)
from omnissl.ssl.quantizer import GumbelQuantizer

__all__ = [
    "export_checkpoint", "main", "encoder_from_hf", "encoder_from_hf_hubert", "encoder_from_hf_roberta",
    "encoder_from_hf_vit", "encoder_from_hf_wav2vec2", "encoder_to_hf", "encoder_to_hf_roberta", "encoder_to_hf_vit",
    "encoder_to_hf_wav2vec2", "hf_model_to_encoder", "lm_head_from_hf_roberta", "wav2vec2_heads_from_hf",
]


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
    ckpt = read_checkpoint(checkpoint)
    objective = str(ckpt.info.get("objective", ""))
    out = Path(out)
    if not hf:
        state = {f"encoder.{k}": v for k, v in ckpt.encoder.state_dict().items()}
        classes = {}
        if heads:
            head_classes = ckpt.info.get("heads", {})
            for name, weights in ckpt.heads.items():
                classes[name] = str(head_classes.get(name, "unknown"))
                state.update({f"heads.{name}.{k}": v for k, v in weights.items()})
        info = encoder_info(ckpt.encoder, objective=objective, checkpoint=str(checkpoint), global_step=ckpt.global_step)
        return write_package(out, ckpt.info["encoder"], state, classes, info, overwrite=overwrite)

    if not overwrite and out.is_dir() and any(out.iterdir()):
        raise ValueError(f"{out} is not empty; pass --overwrite to replace its files")
    short = objective.rsplit(".", 1)[-1]
    hf_heads, extra = None, None
    if heads:
        if short != "Wav2Vec2":
            raise ValueError(f"--heads with --hf: objective {objective or '<unknown>'} has no Hugging Face "
                             "pretraining class of ours (only wav2vec 2.0 -> Wav2Vec2ForPreTraining); drop --heads "
                             "or export a package")
        hf_heads, extra = _wav2vec2_heads(ckpt)
    model = encoder_to_hf(ckpt.encoder, hubert=short == "HuBERT", mae=short == "MAE", heads=hf_heads,
                          image_size=image_size, extra_config=extra)
    model.save_pretrained(str(out))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="omnissl export",
        description="Export the encoder of an omnissl Lightning checkpoint as an omnissl package "
                    "(config.json + model.safetensors, load_backbone) or a Hugging Face transformers directory.",
    )
    parser.add_argument("checkpoint", help="Lightning .ckpt written by `omnissl fit`")
    parser.add_argument("out", help="output directory")
    parser.add_argument("--hf", action="store_true", help="write a transformers directory (from_pretrained)")
    parser.add_argument("--heads", action="store_true",
                        help="include the objective's heads (package: all non-encoder modules; --hf: wav2vec 2.0 "
                             "quantizer -> Wav2Vec2ForPreTraining)")
    parser.add_argument("--image-size", type=int, nargs="+", metavar="N",
                        help="image encoders with --hf: H [W] of the fixed-size ViT position table")
    parser.add_argument("--overwrite", action="store_true", help="replace files in a non-empty output directory")
    args = parser.parse_args(argv)
    size = None
    if args.image_size is not None:
        if len(args.image_size) > 2:
            parser.error("--image-size takes H or H W")
        size = args.image_size[0] if len(args.image_size) == 1 else tuple(args.image_size)
    try:
        out = export_checkpoint(args.checkpoint, args.out, hf=args.hf, heads=args.heads, image_size=size,
                                overwrite=args.overwrite)
    except (ValueError, FileNotFoundError) as e:
        parser.exit(2, f"omnissl export: error: {e}\n")
    kind = "transformers directory" if args.hf else "omnissl package"
    print(f"wrote {kind} {out}")
    return 0
