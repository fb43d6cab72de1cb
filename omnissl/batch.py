"""The one data contract between DataModules and objectives.

Legend for shapes: B batch, T audio samples, N tokens, H/W image height/width.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

MODALITIES = ("audio", "text", "image")
SAMPLE_RATE = 16_000  # Hz of every "audio" input; DataModules resample to it
IGNORE_INDEX = -100  # padding value of frame-level targets, as torch's cross_entropy ignores it


@dataclass
class Batch:
    """A padded mini-batch.

    inputs:  modality -> padded tensor: "audio" (B, T) float32 at 16 kHz, "text" (B, N) int64,
             "image" (B, 3, H, W) float32.
    lengths: modality -> (B,) int64 valid lengths, for variable-length inputs only.
    targets: data-intrinsic targets only (HuBERT units (B, N_frames) int64 padded with -100, downstream
             labels (B,) int64). Objective-made targets never live here.
    ids:     (B,) int64 dataset indices, so a failing step can name its samples.
    segments: modality -> (B, N) int64, packed rows only (several documents per row, text
             `break_mode="documents"`): each token's document index within its row (0, 1, ...; -1 at
             padding). Not BERT's sentence A/B token types: the encoder restarts positions at each document
             and attends within it (`Encoder.encode(segments=)`). An objective that does not read them must
             refuse such a batch (`SSLModule.reads_segments`).
    """

    inputs: dict[str, Tensor]
    lengths: dict[str, Tensor] = field(default_factory=dict)
    targets: dict[str, Tensor] = field(default_factory=dict)
    ids: Tensor | None = None
    segments: dict[str, Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.inputs:
            raise ValueError("Batch.inputs is empty: a batch needs at least one modality")
        for name in list(self.inputs) + list(self.lengths):
            if name not in MODALITIES:
                raise ValueError(f"unknown modality {name!r}; expected one of {MODALITIES}")
        sizes = {name: int(x.shape[0]) for name, x in self.inputs.items()}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"inputs disagree on batch size: {sizes}")
        b = next(iter(sizes.values()))
        for name, n in self.lengths.items():
            if n.shape != (b,):
                raise ValueError(f"lengths[{name!r}] has shape {tuple(n.shape)}, expected ({b},)")
        for name, s in self.segments.items():
            x = self.inputs.get(name)
            if x is None or s.shape != x.shape[:2] or s.dtype != torch.int64:
                raise ValueError(f"segments[{name!r}] must be int64 shaped like inputs[{name!r}]'s first two "
                                 f"dimensions, got {tuple(s.shape)} {s.dtype}")

    @property
    def batch_size(self) -> int:
        return int(next(iter(self.inputs.values())).shape[0])

    def to(self, device: torch.device | str) -> "Batch":
        move = lambda d: {k: v.to(device) for k, v in d.items()}  # noqa: E731
        ids = None if self.ids is None else self.ids.to(device)
        return Batch(move(self.inputs), move(self.lengths), move(self.targets), ids, move(self.segments))
