"""Statistics of `LogMelPatches`' own log-mel features on the embedded speech corpus, for its normalization.

AST and AudioMAE normalize kaldi `fbank` features (pre-emphasis 0.97, DC removal, 512-point FFT, htk mel) of
AudioSet with a mean of -4.27 and a std of 4.57. `LogMelPatches` computes different features (torchaudio's
MelSpectrogram, 25 ms Hann window, 1024-point FFT, no pre-emphasis or DC removal, log(mel + 1e-6)), so those
constants leave its lowest mel bins about 7 nats off. This script measures the global mean and std (over every
frame and bin of every training utterance, no padding) of exactly those features, for each `n_mels` given;
the results are `LOGMEL_STATS` in `omnissl/backbones/frontends.py`.

    python bench/logmel_stats.py [--corpus embedded:speech:small] [--n-mels 64 128] [--n-fft 1024]

Prints one line per n_mels:  RESULT name=logmel_stats n_mels=... n_fft=... mean=... std=... frames=... utterances=...
"""

from __future__ import annotations

import argparse

import torch

from omnissl.backbones.frontends import LogMelPatches
from omnissl.datamodules.audio_io import load_audio
from omnissl.datamodules.common import read_manifest
from omnissl.datamodules.corpora import embedded_corpus


def logmel_stats(paths: list, n_mels: int, n_fft: int = 1024) -> tuple[float, float, int]:
    """-> (mean, std, frames) of log(mel + 1e-6) over every frame and bin of the given audio files, in fp64."""
    front = LogMelPatches(dim=8, n_mels=n_mels, patch_time=1, patch_freq=n_mels, n_fft=n_fft, mean=0.0, std=1.0)
    total, total_sq, count = 0.0, 0.0, 0
    with torch.no_grad():
        for path in paths:
            wav = load_audio(path)
            if wav.numel() < front.n_fft:
                continue
            logmel = torch.log(front.melspec(wav[None]) + 1e-6).double()
            total += float(logmel.sum())
            total_sq += float(logmel.pow(2).sum())
            count += logmel.numel()
    mean = total / count
    return mean, (total_sq / count - mean * mean) ** 0.5, count // n_mels


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", default="embedded:speech:small")
    ap.add_argument("--split", default="train")
    ap.add_argument("--n-mels", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--n-fft", type=int, default=1024)
    args = ap.parse_args()
    root, rows = read_manifest(embedded_corpus(args.corpus)[args.split])
    paths = [root / r[0] for r in rows]
    for n in args.n_mels:
        mean, std, frames = logmel_stats(paths, n, args.n_fft)
        print(f"RESULT name=logmel_stats corpus={args.corpus} split={args.split} n_mels={n} n_fft={args.n_fft} "
              f"mean={mean:.4f} "
              f"std={std:.4f} frames={frames} utterances={len(paths)}")


if __name__ == "__main__":
    main()
