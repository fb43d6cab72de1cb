"""Embedded image classification task: scikit-learn's handwritten digits (`load_digits`, UCI optdigits).

1 797 real 8x8 grayscale digits from 43 writers, 10 classes, values 0..16 stored as 8-bit PNGs
(v * 255 / 16, rounded). The splits are fixed (stratified, independent of `seed`): test 20 %, valid 10 %,
train the rest; the unlabeled `images` corpus uses only the train and valid digits, so pretraining on it
never sees a test digit.

Layout of `out/`: `digits/<label>/<index>.png`, `train.tsv`, `valid.tsv`, `test.tsv` (root line, then
`relpath<TAB>num_pixels<TAB>label`). Sizes: "tiny" keeps 10/2/4 images per class (tests), "small" and
"default" keep all.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm import tqdm

from omnissl.datamodules.common import cached_generation, check_size, write_manifest

VERSION = 1
SPLIT_SEED = 20240501  # fixed: the splits never depend on the generator's seed
TINY_PER_CLASS = {"train": 10, "valid": 2, "test": 4}


def load_digits_uint8() -> tuple[np.ndarray, np.ndarray]:
    """-> (images (1797, 8, 8) uint8 in 0..255, labels (1797,) int64)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.round(d.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    return images, d.target.astype(np.int64)


def digit_splits(labels: np.ndarray) -> dict[str, np.ndarray]:
    """Fixed stratified split of the digit indices -> {"train", "valid", "test": sorted index arrays}."""
    rng = np.random.default_rng(SPLIT_SEED)
    out: dict[str, list[int]] = {"train": [], "valid": [], "test": []}
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_test, n_valid = round(0.2 * len(idx)), round(0.1 * len(idx))
        out["test"] += idx[:n_test].tolist()
        out["valid"] += idx[n_test:n_test + n_valid].tolist()
        out["train"] += idx[n_test + n_valid:].tolist()
    return {k: np.array(sorted(v), dtype=np.int64) for k, v in out.items()}


def generate(out: Path, size: str = "small", seed: int = 0) -> dict[str, Path]:
    """Write the digits task to `out` (once per size) -> {"train", "valid", "test": tsv}.

    `seed` is accepted for a uniform signature; the splits are fixed and nothing else is random.
    """
    from PIL import Image

    check_size(size)
    config = {"corpus": "labeled_images", "version": VERSION, "size": size}

    def build(tmp: Path, final: Path) -> dict[str, str]:
        images, labels = load_digits_uint8()
        for split, idx in digit_splits(labels).items():
            if size == "tiny":
                idx = np.concatenate([idx[labels[idx] == c][:TINY_PER_CLASS[split]] for c in range(10)])
                idx.sort()
            rows = []
            for i in tqdm(idx.tolist(), desc=f"digits/{split}", unit="img"):
                rel = f"digits/{labels[i]}/{i:04d}.png"
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(images[i]).save(tmp / rel, format="PNG")
                rows.append((rel, images[i].size, int(labels[i])))
            write_manifest(tmp / f"{split}.tsv", final, rows)
        return {"train": "train.tsv", "valid": "valid.tsv", "test": "test.tsv"}

    return cached_generation(Path(out), config, build)
