"""`omnissl features`: one layer's hidden states per utterance of an audio manifest (omnissl/eval/features.py).

    omnissl features ENCODER MANIFEST --layer K --out DIR [--format npy|safetensors]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from omnissl.commands import HelpFormatter, device


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="omnissl features", formatter_class=HelpFormatter,
        description="Write the (frames, dim) float32 output of trunk block K of an audio encoder for every row "
                    "of a manifest: DIR/<row without suffix>.npy (or .safetensors, tensor 'features').",
    )  # fmt: skip
    p.add_argument("encoder", help="omnissl package directory (omnissl export) or Lightning checkpoint (.ckpt)")
    p.add_argument("manifest", help="audio manifest (fairseq TSV), a folder of audio files, or embedded:<size>")
    p.add_argument("--layer", type=int, required=True, help="trunk block whose output is written (1-based; 0 = "
                                                            "the trunk input)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--format", choices=("npy", "safetensors"), default="npy", help="file format of each array")
    p.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=None,
                   help="zero-mean unit-variance waveform per utterance (default: as the checkpoint's data module "
                        "was set; off for a package)")
    p.add_argument("--split", default="train", help="embedded manifests only: which split")
    p.add_argument("--device", default=None, help="device of the encoder (default: cuda if available)")
    p.add_argument("--quiet", action="store_true", help="no progress bars (they draw only on a terminal)")
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    a = p.parse_args(argv)

    from omnissl.checkpoints import load_encoder
    from omnissl.datamodules.audio_io import AudioDataError
    from omnissl.eval.export import trained_with_normalized_audio
    from omnissl.eval.features import dump_features
    from omnissl.eval.units import resolve_manifest

    try:
        encoder = load_encoder(a.encoder)
        normalize = a.normalize
        if normalize is None:
            normalize = not Path(a.encoder).is_dir() and trained_with_normalized_audio(a.encoder)
        paths = dump_features(encoder, resolve_manifest(a.manifest, a.split), a.out, layer=a.layer,
                              fmt=a.format, normalize=normalize, device=device(a.device),
                              progress=False if a.quiet else None)
    except (ValueError, FileNotFoundError, AudioDataError) as e:
        p.exit(2, f"omnissl features: error: {e}\n")
    print(f"wrote {len(paths)} arrays (layer {a.layer}, {a.format}) under {a.out}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
