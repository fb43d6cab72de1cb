"""Data-loading throughput, per DataLoader worker (one process, one thread), against the raw decoder.

Audio (`measure_audio`): `AudioDataset.__getitem__` (soundfile decode of the cropped span + downmix +
resample + crop + tensor) over the embedded "small" speech corpus (16 kHz wav, 2-16 s utterances, so the
250 k-sample crop keeps them whole), against `soundfile.read` of the same files. Realtime factor (rtf) =
seconds of audio delivered per wall-clock second. Warm-up round first (page cache), then the median of
`--rounds` interleaved rounds. The floor is ratio = ours / raw >= 0.5. A second, informational line does
the same on 44.1 kHz stereo FLAC copies, where resampling dominates.

Run with glibc's allocator kept from returning memory to the OS between items:

    GLIBC_TUNABLES=glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=68719476736 \\
        python bench/data_throughput.py [--only audio] [--rounds 5] [--manifest M.tsv]

Ends each measurement with a `RESULT name=... ` line.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from omnissl.datamodules.audio import AudioDataset
from omnissl.datamodules.audio_io import read_audio_manifest


def _rtf_rounds(fns: dict[str, Callable[[], float]], rounds: int, warmup: int) -> dict[str, float]:
    """Each fn returns seconds of audio processed; -> name -> median realtime factor over rounds."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    rtfs: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():  # interleaved, so load from other processes hits both alike
            t0 = time.perf_counter()
            seconds = fn()
            rtfs[name].append(seconds / (time.perf_counter() - t0))
    return {k: statistics.median(v) for k, v in rtfs.items()}


def _audio_pair(manifest: Path, rounds: int, warmup: int) -> tuple[float, float, int, float]:
    m = read_audio_manifest(manifest)
    ds = AudioDataset(m, max_samples=250_000, min_samples=0, crop="random")
    files = [str(m.root / p) for p in m.paths]
    epoch = [0]

    def ours() -> float:
        epoch[0] += 1
        return sum(len(ds[(i, epoch[0])]["audio"]) for i in range(len(ds))) / 16_000

    def raw() -> float:
        total = 0.0
        for f in files:
            x, sr = sf.read(f, dtype="float32")
            total += len(x) / sr
        return total

    r = _rtf_rounds({"ours": ours, "raw": raw}, rounds, warmup)
    return r["ours"], r["raw"], len(files), float(m.sizes.sum()) / 16_000


def measure_audio(rounds: int = 5, warmup: int = 1, manifest: Path | None = None) -> None:
    torch.set_num_threads(1)
    if manifest is None:
        from omnissl.datamodules.corpora import embedded_corpus

        manifest = embedded_corpus("embedded:small", size="default")["train"]
    ours, raw, n, seconds = _audio_pair(manifest, rounds, warmup)
    print(f"audio loader: {n} files, {seconds / 60:.1f} min of 16 kHz wav, median of {rounds} rounds")
    print(f"  ours (decode+resample+crop via AudioDataset): {ours:8.0f} x realtime")
    print(f"  raw soundfile.read:                           {raw:8.0f} x realtime")
    print(f"RESULT name=audio_loader rtf={ours:.1f} raw_rtf={raw:.1f} ratio={ours / raw:.3f}", flush=True)

    # informational: 44.1 kHz stereo FLAC, so that resampling and downmixing do real work
    m = read_audio_manifest(manifest)
    with tempfile.TemporaryDirectory() as tmp:
        rows = []
        for rel, n16 in list(zip(m.paths, m.sizes.tolist()))[:40]:
            x, _ = sf.read(m.root / rel, dtype="float32")
            y = np.interp(np.arange(int(len(x) * 44_100 / 16_000)) * 16_000 / 44_100, np.arange(len(x)), x)
            name = rel.replace("/", "_").replace(".wav", ".flac")
            sf.write(Path(tmp) / name, np.stack([y, 0.5 * y], 1).astype(np.float32), 44_100)
            rows.append(f"{name}\t{n16}")
        (Path(tmp) / "m.tsv").write_text(f"{tmp}\n" + "\n".join(rows) + "\n")
        ours, raw, n, seconds = _audio_pair(Path(tmp) / "m.tsv", rounds, warmup)
    print(f"RESULT name=audio_loader_flac44k_stereo rtf={ours:.1f} raw_rtf={raw:.1f} ratio={ours / raw:.3f}",
          flush=True)


MEASUREMENTS: dict[str, Callable[..., None]] = {"audio": measure_audio}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="+", choices=sorted(MEASUREMENTS), default=sorted(MEASUREMENTS))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--manifest", type=Path, default=None, help="audio manifest (default: embedded small corpus)")
    args = ap.parse_args()
    if "glibc.malloc.mmap_threshold" not in os.environ.get("GLIBC_TUNABLES", ""):
        print("note: GLIBC_TUNABLES is not set (see the docstring); numbers may be noisier", file=sys.stderr)
    for name in args.only:
        kwargs = {"rounds": args.rounds, "warmup": args.warmup}
        if name == "audio":
            kwargs["manifest"] = args.manifest
        MEASUREMENTS[name](**kwargs)


if __name__ == "__main__":
    main()
