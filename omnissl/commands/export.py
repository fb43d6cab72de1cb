"""`omnissl export`: a Lightning checkpoint -> an omnissl encoder package, or a Hugging Face directory
(omnissl/eval/export.py).

    omnissl export CHECKPOINT DIR [--hf] [--heads] [--image-size H [W]] [--overwrite]
"""

from __future__ import annotations

import argparse

from omnissl.commands import HelpFormatter


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="omnissl export", formatter_class=HelpFormatter,
        description="Export the encoder of an omnissl Lightning checkpoint as an omnissl package "
                    "(config.json + model.safetensors, load_backbone) or a Hugging Face transformers directory "
                    "(audio: with preprocessor_config.json for AutoFeatureExtractor; text: with the run's tokenizer, "
                    "tokenizer.json, and for AutoTokenizer tokenizer_config.json).",
    )  # fmt: skip
    p.add_argument("checkpoint", help="Lightning .ckpt written by `omnissl fit` (read weights-only)")
    p.add_argument("out", help="output directory")
    p.add_argument("--hf", action="store_true", help="write a transformers directory (from_pretrained)")
    p.add_argument("--heads", action="store_true",
                   help="include the objective's heads (package: all non-encoder modules; --hf: wav2vec 2.0 "
                        "quantizer -> Wav2Vec2ForPreTraining, MaskedLM lm_head -> RobertaForMaskedLM)")
    p.add_argument("--image-size", type=int, nargs="+", metavar="N",
                   help="image encoders with --hf: H [W] of the fixed-size ViT position table")
    p.add_argument("--overwrite", action="store_true", help="replace files in a non-empty output directory")
    p.add_argument("--quiet", action="store_true", help="no progress bars (they draw only on a terminal)")
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    size = None
    if args.image_size is not None:
        if len(args.image_size) > 2:
            p.error("--image-size takes H or H W")
        size = args.image_size[0] if len(args.image_size) == 1 else tuple(args.image_size)

    from omnissl.eval.export import export_checkpoint
    from omnissl.progress import set_quiet

    set_quiet(args.quiet)
    try:
        out = export_checkpoint(args.checkpoint, args.out, hf=args.hf, heads=args.heads, image_size=size,
                                overwrite=args.overwrite)
    except (ValueError, FileNotFoundError) as e:
        p.exit(2, f"omnissl export: error: {e}\n")
    kind = "transformers directory" if args.hf else "omnissl package"
    print(f"wrote {kind} {out}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
