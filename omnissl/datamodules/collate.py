"""The only code that builds a `Batch`: pads a list of items from any dataset.

An item is a dict with an "id" (int dataset index) and any of:
  "audio" (T,) float32 at 16 kHz, "text" (N,) int64 token ids, "image" (3, H, W) float32,
  "segments" (N,) int64 document index of each text token in a packed row (padded with -1),
  "units" (F,) int64 frame-level labels (HuBERT), "label" int (downstream classes).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from omnissl.batch import IGNORE_INDEX, Batch



def pad_right(seqs: Sequence[Tensor], value: float | int) -> tuple[Tensor, Tensor]:
    """Right-pad 1-D tensors to the longest: -> (padded (B, Tmax), lengths (B,) int64)."""
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.int64)
    out = seqs[0].new_full((len(seqs), int(lengths.max())), value)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = s
    return out, lengths


@dataclass
class Collate:
    """Callable collate_fn. `text_pad_id` is the tokenizer's padding id."""

    text_pad_id: int = 1

    def __call__(self, items: Sequence[dict]) -> Batch:
        if not items:
            raise ValueError("cannot collate an empty list of items")
        inputs: dict[str, Tensor] = {}
        lengths: dict[str, Tensor] = {}
        targets: dict[str, Tensor] = {}
        if "audio" in items[0]:
            inputs["audio"], lengths["audio"] = pad_right([it["audio"].float() for it in items], 0.0)
        if "text" in items[0]:
            inputs["text"], lengths["text"] = pad_right([it["text"].long() for it in items], self.text_pad_id)
        segments: dict[str, Tensor] = {}
        if "segments" in items[0]:
            segments["text"], _ = pad_right([it["segments"].long() for it in items], -1)
        if "image" in items[0]:
            inputs["image"] = torch.stack([it["image"] for it in items])
        if "units" in items[0]:
            targets["units"], _ = pad_right([it["units"].long() for it in items], IGNORE_INDEX)
        if "label" in items[0]:
            targets["label"] = torch.tensor([int(it["label"]) for it in items], dtype=torch.int64)
        ids = torch.tensor([int(it["id"]) for it in items], dtype=torch.int64)
        return Batch(inputs, lengths, targets, ids, segments)
