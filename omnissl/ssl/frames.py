"""Frame bookkeeping of frame-level audio objectives: encoder frames of an utterance without running the
encoder, and the filter that keeps utterances too short to mask away from masking and the quantizer.

Legend: B batch, T samples.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from omnissl.backbones.frontends import conv_output_lengths
from omnissl.batch import Batch

POLICIES = ("drop", "raise")


def encoder_frames(encoder: nn.Module, lengths: Tensor) -> Tensor:
    """(B,) audio samples -> (B,) valid encoder frames, without running the encoder."""
    layers = getattr(encoder.frontend, "layers", None)
    if layers is not None:
        return conv_output_lengths(lengths, layers)
    count = getattr(encoder.frontend, "token_count", None)  # LogMelPatches
    if count is not None:
        return count(lengths)
    if not encoder.samples_per_token:
        raise ValueError(f"{type(encoder.frontend).__name__} is not a time-based audio frontend")
    return torch.div(lengths, encoder.samples_per_token, rounding_mode="floor")


class ShortUtteranceFilter:
    """Audio utterances with fewer than `min_frames` encoder frames (masking needs room for its spans, the
    conv stack for its receptive field) are dropped and counted (policy "drop"), or stop the run with a
    ValueError naming their sample ids (policy "raise", or when every row of a batch is too short).

    Call it on a batch before the encoder: `filter(batch, modality, encoder) -> (batch, rows dropped)`. Audio
    batches get their missing lengths filled in; other modalities pass through. `dropped` counts every row
    dropped so far. what: the part that needs the frames, for the error message.
    """

    def __init__(self, min_frames: int, policy: str = "drop", *, what: str = "span masking") -> None:
        if policy not in POLICIES:
            raise ValueError(f"short_utterances must be 'drop' or 'raise', got {policy!r}")
        self.min_frames, self.policy, self.what = min_frames, policy, what
        self.dropped = 0

    def __call__(self, batch: Batch, modality: str, encoder: nn.Module) -> tuple[Batch, int]:
        if modality != "audio":
            return batch, 0
        x, lengths = batch.inputs["audio"], batch.lengths.get("audio")
        if lengths is None:
            lengths = torch.full((x.shape[0],), x.shape[1], dtype=torch.long, device=x.device)
            batch = Batch(batch.inputs, {**batch.lengths, "audio": lengths}, batch.targets, batch.ids)
        batch, dropped = self.filter(batch, encoder_frames(encoder, lengths))
        self.dropped += dropped
        return batch, dropped

    def filter(self, batch: Batch, frames: Tensor) -> tuple[Batch, int]:
        """Remove (or name) the audio rows whose `frames` (B,) encoder frames are fewer than min_frames."""
        short = frames < self.min_frames
        if not bool(short.any()):
            return batch, 0
        ids = batch.ids if batch.ids is not None else torch.arange(batch.batch_size)
        names = ids[short.to(ids.device)].tolist()
        if self.policy == "raise" or bool(short.all()):
            raise ValueError(
                f"samples {names} give {frames[short].tolist()} encoder frames, fewer than the {self.min_frames} "
                f"that {self.what} needs; raise the data module's min_samples or set short_utterances: drop"
            )
        keep = ~short
        audio, lengths = batch.inputs["audio"][keep], batch.lengths["audio"][keep]
        audio = audio[:, : int(lengths.max())]
        targets = {k: v[keep] for k, v in batch.targets.items()}
        kept = Batch({"audio": audio}, {"audio": lengths}, targets, None if batch.ids is None else batch.ids[keep])
        return kept, int(short.sum())
