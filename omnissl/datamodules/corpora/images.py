"""Embedded image corpus: real images that pip wheels ship, as PNG files plus file lists.

Sources, all offline:
* scikit-learn's handwritten digits (`load_digits`: 8x8 grayscale, real scans of 43 writers), only the
  train and valid digits of `labeled_images` (its test digits are never in a pretraining corpus);
* random crops of real photographs: scikit-learn's two sample photos (`china.jpg`, `flower.jpg`) and, when
  scikit-image is installed, 17 of its offline sample images (astronaut, camera, cat, coffee, coins,
  bricks, grass, gravel, moon, retina, rocket, Hubble deep field, a motorcycle, cells, a page of text, ...).
  Each crop covers 2-50 % of its photo's area with an aspect ratio in [3/4, 4/3] (RandomResizedCrop's
  sampling), is flipped with probability 1/2 and resized to 64x64 (bicubic); colour photos stay RGB,
  grayscale ones stay single-channel (DataModules make 3 channels).
Why these: digits give thousands of real but tiny images; the photo crops give natural textures, edges and
colour statistics at a useful resolution. Both cost nothing to fetch. scikit-image adds variety (17 scenes
instead of 2) for a 14 MB wheel; its files are read directly with Pillow, skimage is never imported.

Layout of `out/`: `digits/<i>.png`, `crops/<i>.png`, `train.tsv` and `valid.tsv` (root line, then
`relpath<TAB>num_pixels`; valid = 5 % of images, seeded), `images.jsonl` (path, source, crop box).
Sizes: "tiny" 16 digits + 16 crops (tests), "small" all 1 436 train/valid digits + 2 000 crops,
"default" all digits + 10 000 crops.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
from tqdm import tqdm

from omnissl.datamodules.common import cached_generation, check_size, write_manifest
from omnissl.datamodules.corpora.labeled_images import digit_splits, load_digits_uint8

VERSION = 1
CROP_SIZE = 64
NUM_CROPS = {"tiny": 16, "small": 2000, "default": 10_000}
NUM_DIGITS = {"tiny": 16, "small": None, "default": None}  # None: all train + valid digits
VALID_FRACTION = 0.05
CROP_AREA = (0.02, 0.5)
SKIMAGE_PHOTOS = ("astronaut.png", "brick.png", "camera.png", "cell.png", "chelsea.png", "clock_motion.png",
                  "coffee.png", "coins.png", "grass.png", "gravel.png", "hubble_deep_field.jpg", "ihc.png",
                  "moon.png", "motorcycle_left.png", "page.png", "retina.jpg", "rocket.jpg", "text.png")
SKLEARN_PHOTOS = ("china.jpg", "flower.jpg")


def photo_paths() -> list[tuple[str, Path]]:
    """(source name, file) of every sample photo available offline, in a fixed order."""
    found = []
    sk = importlib.util.find_spec("sklearn")
    if sk is None or not sk.submodule_search_locations:
        raise RuntimeError("the images corpus needs scikit-learn (pip install scikit-learn)")
    base = Path(list(sk.submodule_search_locations)[0]) / "datasets" / "images"
    found += [(f"sklearn:{name}", base / name) for name in SKLEARN_PHOTOS if (base / name).is_file()]
    ski = importlib.util.find_spec("skimage")
    if ski is not None and ski.submodule_search_locations:
        base = Path(list(ski.submodule_search_locations)[0]) / "data"
        found += [(f"skimage:{name}", base / name) for name in SKIMAGE_PHOTOS if (base / name).is_file()]
    return found


def random_crop(rng: np.random.Generator, width: int, height: int) -> tuple[int, int, int, int]:
    """A (left, top, right, bottom) box covering CROP_AREA of the image with aspect ratio in [3/4, 4/3]."""
    for _ in range(10):
        area = rng.uniform(*CROP_AREA) * width * height
        ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        w, h = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
        if 0 < w <= width and 0 < h <= height:
            left, top = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
            return left, top, left + w, top + h
    side = min(width, height)
    return 0, 0, side, side


def generate(out: Path, size: str = "small", seed: int = 0) -> dict[str, Path]:
    """Write the corpus to `out` (once per (size, seed, sources)) -> {"train": tsv, "valid": tsv}."""
    from PIL import Image

    check_size(size)
    photos = photo_paths()
    config = {"corpus": "images", "version": VERSION, "size": size, "seed": seed,
              "photos": [name for name, _ in photos]}

    def build(tmp: Path, final: Path) -> dict[str, str]:
        rows, meta = [], []
        images, labels = load_digits_uint8()
        splits = digit_splits(labels)
        idx = np.concatenate([splits["train"], splits["valid"]])
        idx.sort()
        if NUM_DIGITS[size] is not None:
            idx = idx[: NUM_DIGITS[size]]
        (tmp / "digits").mkdir()
        for i in tqdm(idx.tolist(), desc="digits", unit="img"):
            rel = f"digits/{i:04d}.png"
            Image.fromarray(images[i]).save(tmp / rel, format="PNG")
            rows.append((rel, images[i].size))
            meta.append({"path": rel, "source": "sklearn:digits", "index": i})
        loaded = [(name, Image.open(path)) for name, path in photos]
        for _, im in loaded:
            im.load()
        (tmp / "crops").mkdir()
        for i in tqdm(range(NUM_CROPS[size]), desc="photo crops", unit="img"):
            rng = np.random.default_rng([seed, i])
            name, im = loaded[int(rng.integers(len(loaded)))]
            box = random_crop(rng, *im.size)
            crop = im.crop(box).resize((CROP_SIZE, CROP_SIZE), Image.Resampling.BICUBIC)
            flip = bool(rng.integers(2))
            if flip:
                crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            rel = f"crops/{i:05d}.png"
            crop.save(tmp / rel, format="PNG")
            rows.append((rel, CROP_SIZE * CROP_SIZE))
            meta.append({"path": rel, "source": name, "box": list(box), "flip": flip})
        perm = np.random.default_rng(seed).permutation(len(rows))
        valid = set(perm[: max(1, round(VALID_FRACTION * len(rows)))].tolist())
        write_manifest(tmp / "train.tsv", final, [r for i, r in enumerate(rows) if i not in valid])
        write_manifest(tmp / "valid.tsv", final, [r for i, r in enumerate(rows) if i in valid])
        with open(tmp / "images.jsonl", "w", encoding="utf-8") as f:
            for i, m in enumerate(meta):
                f.write(json.dumps({**m, "split": "valid" if i in valid else "train"}, sort_keys=True) + "\n")
        return {"train": "train.tsv", "valid": "valid.tsv"}

    return cached_generation(Path(out), config, build)
