"""Dump one layer's hidden states of an audio encoder, one (frames, dim) float32 array per manifest row.

    omnissl features ENCODER MANIFEST --layer K --out DIR [--format npy|safetensors]

ENCODER is an omnissl package directory or a Lightning checkpoint (omnissl.checkpoints.load_encoder, weights
only). Layer K is the output of trunk block K (1-based; 0 = the trunk input), as `omnissl hubert-units
--iteration 2` clusters it (omnissl.eval.units.LayerFeatures: one utterance at a time, no masking, no padding).
Audio is decoded as training decodes it (omnissl.datamodules.audio_io.load_audio: resampled to 16 kHz, channels
averaged), and normalized per utterance when the encoder was trained on normalized waveforms.

Row `wav/a/1.flac` of the manifest is written to `DIR/wav/a/1.npy` (np.save), or `DIR/wav/a/1.safetensors`
holding one tensor "features"; every file is written through a temporary sibling and renamed.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn
from tqdm import tqdm

from omnissl.backbones.frontends import ConvFeatureExtractor, LogMelPatches
from omnissl.datamodules.audio_io import AudioDataError, load_audio, read_audio_manifest
from omnissl.datamodules.common import atomic_file
from omnissl.eval.units import LayerFeatures

FORMATS = {"npy": ".npy", "safetensors": ".safetensors"}


def feature_path(out: Path, row: str, fmt: str) -> Path:
    """`out/<row without its suffix>.<npy|safetensors>`; a row that would leave `out` (`..`) is refused."""
    rel = Path(row)
    if rel.is_absolute():
        rel = rel.relative_to(rel.anchor)
    if ".." in rel.parts:
        raise ValueError(f"manifest row {row!r} climbs out of its root ('..'): cannot name its feature file")
    return out / rel.with_suffix(FORMATS[fmt])


def _save(path: Path, feats: np.ndarray, fmt: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "npy":
        def write(p: Path) -> None:
            with open(p, "wb") as f:
                np.save(f, feats)
    else:
        def write(p: Path) -> None:
            save_file({"features": torch.from_numpy(feats)}, str(p))
    with atomic_file(path) as tmp:
        write(tmp)


def dump_features(
    encoder: nn.Module,
    manifest: str | os.PathLike,
    out: str | os.PathLike,
    *,
    layer: int,
    fmt: str = "npy",
    normalize: bool = False,
    device: str = "cpu",
    progress: bool | None = None,
) -> list[Path]:
    """Write layer `layer`'s (frames, dim) float32 features of every row of `manifest` under `out`; returns
    the files in manifest order. progress: a tqdm bar on stderr (None: only when stderr is a terminal)."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {sorted(FORMATS)}, got {fmt!r}")
    frontend = getattr(encoder, "frontend", None)
    if not isinstance(frontend, (ConvFeatureExtractor, LogMelPatches)):
        raise ValueError(f"features reads audio manifests: the encoder's frontend is {type(frontend).__name__}, "
                         "not a waveform frontend (ConvFeatureExtractor, LogMelPatches)")
    rows = read_audio_manifest(manifest)
    out = Path(out)
    paths = [feature_path(out, rel, fmt) for rel in rows.paths]
    extract = LayerFeatures(encoder, layer, device)
    disable = None if progress is None else not progress  # tqdm: None = off when stderr is not a terminal
    for i in tqdm(range(len(rows)), desc="features", unit="utt", file=sys.stderr, disable=disable):
        try:
            wav = load_audio(rows.root / rows.paths[i], expected=int(rows.sizes[i]))
        except AudioDataError as e:
            raise AudioDataError(f"{rows.where(i)}: {e}") from e
        if normalize:  # as AudioDataset(normalize=True): zero mean, unit variance per utterance
            wav = torch.nn.functional.layer_norm(wav, wav.shape)
        _save(paths[i], extract(wav).numpy().astype(np.float32, copy=False), fmt)
    return paths
