"""`SyntheticDataModule`: contract-valid batches of any modality, for tests and smoke runs only.

Audio is a sum of random tones with harmonics plus noise (varied lengths, so padding is exercised); text is
random token ids; images are smooth random fields; "audio_text" pairs an item's audio with its text (both drawn
from its class, so the pairs share something a contrastive objective can learn). Real data lives in the other
DataModules.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch.utils.data import Dataset

from omnissl.batch import SAMPLE_RATE
from omnissl.datamodules.base import DataModule
from omnissl.datamodules.collate import Collate

MODALITIES = ("audio", "text", "image", "audio_text")


class SyntheticDataset(Dataset):
    def __init__(self, *, modality: str, size: int, seed: int, min_samples: int, max_samples: int,
                 vocab_size: int, seq_len: int, image_size: int, num_classes: int,
                 unit_frames: Callable[[int], int] | None = None) -> None:
        if modality not in MODALITIES:
            raise ValueError(f"unknown modality {modality!r}; expected {', '.join(MODALITIES)}")
        self.modality, self.size, self.seed = modality, size, seed
        self.min_samples, self.max_samples = min_samples, max_samples
        self.vocab_size, self.seq_len, self.image_size = vocab_size, seq_len, image_size
        self.num_classes, self.unit_frames = num_classes, unit_frames

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> dict:
        g = torch.Generator().manual_seed(self.seed * 100_003 + i)
        label = i % self.num_classes
        item: dict = {"id": i, "label": label}
        if self.modality in ("audio", "audio_text"):
            t = int(torch.randint(self.min_samples, self.max_samples + 1, (1,), generator=g))
            time = torch.arange(t) / SAMPLE_RATE
            f0 = 110.0 * 2 ** (label / 2) * (1 + 0.05 * torch.rand(1, generator=g))
            wave = sum(torch.sin(2 * math.pi * f0 * k * time + torch.rand(1, generator=g) * 6.28) / k for k in (1, 2, 3))
            item["audio"] = (0.3 * wave + 0.05 * torch.randn(t, generator=g)).float()
            if self.unit_frames is not None:  # frame-level units (HuBERT): frame f's unit is (label + f // 4) % 10
                item["units"] = (label + torch.arange(self.unit_frames(t)) // 4) % 10
        if self.modality in ("text", "audio_text"):
            n = int(torch.randint(self.seq_len // 2, self.seq_len + 1, (1,), generator=g))
            # a periodic sequence per class so there is structure to learn; ids 0-3 are specials
            period = 2 + label
            base = torch.randint(4, self.vocab_size, (period,), generator=g)
            item["text"] = base.repeat(n // period + 1)[:n]
        if self.modality == "image":
            low = torch.randn(3, 4, 4, generator=g)
            img = torch.nn.functional.interpolate(low[None], size=self.image_size, mode="bilinear")[0]
            item["image"] = img + 0.1 * torch.randn(img.shape, generator=g)
        return item


class SyntheticDataModule(DataModule):
    """Synthetic `Batch`es of one modality ("audio", "text", "image", or "audio_text" pairs); for tests and smoke
    runs. Labeled (item i has class i % num_classes, `classes` "0" ... "num_classes - 1"); `train_size` / `valid_size` /
    `test_size` items per split (0: no such split). `unit_frames(samples) -> encoder frames`: audio items get
    frame-level "units" (HuBERT's targets), frame f's unit (label + f // 4) % 10."""

    def __init__(
        self,
        *,
        modality: str = "audio",
        train_size: int = 64,
        valid_size: int = 16,
        test_size: int = 0,
        batch_size: int = 8,
        seed: int = 0,
        min_samples: int = 8_000,
        max_samples: int = 16_000,
        vocab_size: int = 1024,
        seq_len: int = 64,
        image_size: int = 32,
        num_classes: int = 4,
        unit_frames: Callable[[int], int] | None = None,
    ) -> None:
        super().__init__()
        if modality not in MODALITIES:
            raise ValueError(f"unknown modality {modality!r}; expected {', '.join(MODALITIES)}")
        if not 0 < min_samples <= max_samples:
            raise ValueError(f"need 0 < min_samples ({min_samples}) <= max_samples ({max_samples})")
        kw = dict(modality=modality, min_samples=min_samples, max_samples=max_samples, vocab_size=vocab_size,
                  seq_len=seq_len, image_size=image_size, num_classes=num_classes, unit_frames=unit_frames)
        sizes = {"train": train_size, "valid": valid_size, "test": test_size}
        self.datasets = {s: SyntheticDataset(size=n, seed=seed + k, **kw)
                         for k, (s, n) in enumerate(sizes.items()) if n > 0}
        self.classes = [str(c) for c in range(num_classes)]
        self.batch_size, self.seed, self.num_workers = batch_size, seed, 0
        self.collate = Collate()
