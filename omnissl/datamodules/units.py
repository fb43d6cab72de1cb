"""HuBERT unit files: one line of space-separated cluster ids per manifest row, at the encoder's frame rate.

    units_path_for(manifest, ext)            <manifest folder>/<manifest stem>.<ext>  (train.tsv -> train.km)
    read_units(path) -> [int64 (frames,)]    one array per line
    check_units(manifest, units, spf)        fail before training when a unit file does not belong to its manifest

The files are written by `omnissl hubert-units` (omnissl/eval/units.py) and read by AudioDataModule(units=...).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from omnissl.datamodules.audio_io import read_audio_manifest

SAMPLES_PER_FRAME = 320  # the conv extractor's hop at 16 kHz: 20 ms frames, 50 Hz units


def units_path_for(manifest: str | os.PathLike, ext: str = "km") -> Path:
    """`<manifest folder>/<manifest stem>.<ext>`."""
    manifest = Path(manifest)
    return manifest.with_name(f"{manifest.stem}.{ext}")


def read_units(path: str | os.PathLike) -> list[np.ndarray]:
    """One int64 array per line of a unit file."""
    with open(path, encoding="utf-8") as f:
        return [np.array(line.split(), dtype=np.int64) for line in f.read().splitlines()]


def check_units(
    manifest: str | os.PathLike,
    units_path: str | os.PathLike,
    samples_per_frame: int = SAMPLES_PER_FRAME,
    *,
    tolerance: int = 2,
) -> None:
    """Fail before training when a unit file does not belong to its manifest: missing file, one line per
    manifest row, and per line about num_samples / samples_per_frame units (± tolerance). Every error names
    the unit file (and the first offending rows)."""
    units_path = Path(units_path)
    if not units_path.is_file():
        raise FileNotFoundError(
            f"unit file {units_path} for manifest {manifest} does not exist; make it with "
            f"`omnissl hubert-units --manifest {manifest}`"
        )
    rows = read_audio_manifest(manifest)
    with open(units_path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    if len(lines) != len(rows):
        raise ValueError(f"unit file {units_path} has {len(lines)} lines but manifest {manifest} lists "
                         f"{len(rows)} utterances: it was made for another manifest")
    bad = []
    for i, (line, rel, num_samples) in enumerate(zip(lines, rows.paths, rows.sizes.tolist())):
        have, want = len(line.split()), num_samples // samples_per_frame
        if abs(have - want) > tolerance:
            bad.append(f"line {i + 1} ({rel}): {have} units, expected ~{want}")
            if len(bad) >= 5:
                break
    if bad:
        raise ValueError(f"unit file {units_path} does not match manifest {manifest} at {samples_per_frame} "
                         f"samples per frame: " + "; ".join(bad))
