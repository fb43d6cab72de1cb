"""`ImageDataModule`: image folders or file lists -> MAE-style augmented (B, 3, H, W) float32 batches.

Sources (`train`, `valid`):
* a folder: every image file below it (png, jpg, jpeg, bmp, gif, tif, tiff, webp), sorted; with class
  subfolders (`root/<class>/<file>`, torchvision's ImageFolder layout) the subfolder is the item's label,
  flat folders have none;
* a file list (`.tsv` / `.txt`): optional root line, then `relpath[<TAB>size[<TAB>label]]` per line;
* `"shards:<folder or URI>"`: a shard set of `omnissl data shard` (litdata, streamed; omnissl/datamodules/shards.py);
  then valid / test, when given, are shard sets too (no valid split is held out of a stream);
* `"embedded:images"`: real images that pip wheels ship (digits and photo crops; see
  `omnissl.datamodules.corpora.images`), generated into `$OMNISSL_DATA` on first use.

Transforms (torchvision.transforms.v2), as MAE pretraining (`main_pretrain.py`) and evaluation:
train `RandomResizedCrop(image_size, scale=(0.2, 1.0), bicubic)` + `RandomHorizontalFlip` + `Normalize`;
eval `Resize(image_size / 0.875, bicubic)` + `CenterCrop(image_size)` + `Normalize`. Any `image_size` works;
every image is converted to RGB first (grayscale and palette images become 3 equal channels, alpha is
dropped). `mean`/`std` default to ImageNet's. An undecodable file raises an error naming it, or with
`on_error="skip"` is replaced by the next decodable item and counted (`skipped`, with a warning naming the
first few files).

Items are {"id", "image": (3, image_size, image_size) float32} (+ "label" in labeled use).
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from omnissl.datamodules.base import DataModule, pretraining_splits
from omnissl.datamodules.collate import Collate
from omnissl.datamodules.common import (SkipLog, check_data_args, check_on_error, class_index, is_embedded,
                                        load_or_next, read_manifest, shown)
from omnissl.datamodules.corpora import embedded_corpus
from omnissl.datamodules.sampler import item_rng
from omnissl.datamodules.shards import ShardItems, is_shards, read_meta

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def list_images(source: str | os.PathLike, *, on_error: str = "raise",
                skips: SkipLog | None = None) -> list[tuple[Path, str | None]]:
    """(file, label or None) of an image folder or file list; labels from class subfolders or a 3rd column.
    A list line that is not valid UTF-8 raises naming the line, or with on_error="skip" is counted in `skips`."""
    path = Path(source)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        out = []
        for f in files:
            rel = f.relative_to(path)
            out.append((f, rel.parts[0] if len(rel.parts) > 1 else None))
        return out
    if path.is_file():
        root, rows = read_manifest(path, require_root=False, on_error=on_error, skips=skips)
        return [(root / row[0], row[2] if len(row) > 2 and row[2] != "" else None) for row in rows]
    raise FileNotFoundError(f"image source {source} does not exist (expected a folder, a file list, "
                            f"or 'embedded:images')")


def train_transform(image_size: int, mean: Sequence[float], std: Sequence[float], *, min_scale: float = 0.2,
                    hflip: bool = True):
    """MAE's pretraining augmentation: uint8 (3, H, W) tensor -> normalized float32 (3, S, S)."""
    from torchvision.transforms import InterpolationMode, v2  # lazy: torchvision is slow to import

    steps = [v2.RandomResizedCrop(image_size, scale=(min_scale, 1.0), interpolation=InterpolationMode.BICUBIC,
                                  antialias=True)]
    if hflip:
        steps.append(v2.RandomHorizontalFlip())
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
    return v2.Compose(steps)


def eval_transform(image_size: int, mean: Sequence[float], std: Sequence[float], *, crop_pct: float = 0.875):
    """Resize the short side to image_size / crop_pct, center-crop image_size, normalize."""
    from torchvision.transforms import InterpolationMode, v2

    return v2.Compose([
        v2.Resize(int(round(image_size / crop_pct)), interpolation=InterpolationMode.BICUBIC, antialias=True),
        v2.CenterCrop(image_size),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(list(mean), list(std)),
    ])


def transforms(image_size: int, mean: Sequence[float], std: Sequence[float], *, min_scale: float = 0.2,
               hflip: bool = True, crop_pct: float = 0.875, augment: bool = True) -> dict[str, object]:
    """{"train": ..., "eval": ...} transforms of the image DataModules; `augment=False` evaluates train too."""
    evalt = eval_transform(image_size, mean, std, crop_pct=crop_pct)
    traint = train_transform(image_size, mean, std, min_scale=min_scale, hflip=hflip) if augment else evalt
    return {"train": traint, "eval": evalt}


def _to_8bit(im):
    """A PIL image of more than 8 bits per sample ("I;16*" of 16-bit PNG/TIFF, "I" of 16-bit PNG) -> mode "L",
    scaled by 255 / 65535 (PIL's convert("RGB") clips such values at 255: a 16-bit image turns white)."""
    import numpy as np
    from PIL import Image

    if im.mode.startswith("I;16") or im.mode == "I":
        a = np.asarray(im).astype(np.int64)
        if a.size and (a.min() < 0 or a.max() > 65535):
            raise ValueError(f"{im.mode} image with values in [{a.min()}, {a.max()}], outside 16 bits")
        return Image.fromarray(((a * 255 + 32767) // 65535).astype(np.uint8), mode="L")
    if im.mode == "F":
        raise ValueError("32-bit floating-point image (mode F): its value range is unknown; convert it to 8 or 16 "
                         "bits")
    return im


def load_rgb(path: Path | io.BytesIO, name: object = None) -> torch.Tensor:
    """Decode an image file (or encoded bytes in memory, named `name` in errors) -> uint8 (3, H, W); raises
    ValueError naming the file if it cannot be decoded (or is larger than PIL's decompression-bomb limit,
    `PIL.Image.MAX_IMAGE_PIXELS`). 16-bit images are scaled to 8 bits, not clipped."""
    from PIL import Image, UnidentifiedImageError

    shown_name = shown(path if name is None else name)
    try:
        with Image.open(path) as im:
            im = _to_8bit(im).convert("RGB")  # L, P, LA, RGBA, I;16 ... -> 3 channels
            arr = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
            w, h = im.size
    except Image.DecompressionBombError as e:
        raise ValueError(f"{shown_name}: refused as a possible decompression bomb ({e})") from None
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
        raise ValueError(f"{shown_name}: cannot decode image: {e}") from None
    if w == 0 or h == 0:
        raise ValueError(f"{shown_name}: empty image ({w}x{h})")
    return arr.view(h, w, 3).permute(2, 0, 1).contiguous()


class ImageDataset(Dataset):
    """Decoded, transformed images: {"id", "image": (3, S, S) float32} plus "label" when `labels` is given.
    Under on_error="skip" an undecodable file is replaced by the next decodable one and counted in `skips`
    (the DataModule's, when it passes its own)."""

    def __init__(self, files: Sequence[Path], transform, *, labels: Sequence[int] | None = None,
                 on_error: str = "raise", skips: SkipLog | None = None, source: object = "the image list") -> None:
        check_on_error(on_error)
        if not files:
            raise ValueError("ImageDataset needs at least one file")
        self.files = [str(f) for f in files]
        self.labels = None if labels is None else [int(x) for x in labels]
        self.transform, self.on_error, self.source = transform, on_error, source
        self.skips = skips if skips is not None else SkipLog("image")

    @property
    def skipped(self) -> dict[str, str]:
        """Files skipped so far in this process (each worker process counts its own)."""
        return self.skips.skipped

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> dict:
        return load_or_next(i, len(self.files), self._load, errors=(ValueError,), on_error=self.on_error,
                            skips=self.skips, name=lambda j: self.files[j], source=self.source)

    def _load(self, j: int) -> dict:
        item = {"id": j, "image": self.transform(load_rgb(Path(self.files[j])))}
        if self.labels is not None:
            item["label"] = self.labels[j]
        return item


@dataclass
class ImageShardDecoder:
    """`ShardItems` decode of an image shard item: `transform` of the decoded image with torch's generator seeded
    by (seed, epoch, id) (as `SeededItems` does for files), "label" as the index in `classes` when given. An
    undecodable item raises ValueError naming the shard set, the item and its source, or with on_error="skip"
    becomes {"id", "error", "file"} (counted by the loader)."""

    source: str
    transform: Any
    seed: int
    on_error: str
    classes: Sequence[str] | None = None

    def __call__(self, raw: dict, epoch: int) -> dict:
        i = int(raw["id"])
        name = f"{self.source} item {i} (from {json.loads(raw['origin'])['where']})"
        try:
            with item_rng(self.seed, epoch, i):
                image = self.transform(load_rgb(io.BytesIO(np.asarray(raw["image"], np.uint8).tobytes()), name))
        except ValueError as e:
            if self.on_error == "raise":
                raise
            return {"id": i, "error": str(e), "file": f"{self.source}#{i}"}
        item = {"id": i, "image": image}
        if self.classes is not None and raw.get("label"):
            item["label"] = list(self.classes).index(raw["label"])
        return item


def shard_splits(specs: dict[str, str | None], owner: str) -> dict[str, str]:
    """{split: "shards:..."} of the splits given, when train is a shard set (then every given split must be)."""
    given = {s: spec for s, spec in specs.items() if spec is not None}
    if not is_shards(given.get("train")):
        return {}
    plain = [s for s, spec in given.items() if not is_shards(spec)]
    if plain:
        raise ValueError(f"{owner}: train is a shard set, so {plain} must be too (shards:<folder or URI>); "
                         "without valid, there is no valid split")
    return given  # type: ignore[return-value]


def image_shard_datasets(shards: dict[str, str], tf: dict[str, Any], *, seed: int, on_error: str,
                         labeled: bool = False) -> tuple[dict[str, ShardItems], list[str] | None]:
    """({split: ShardItems}, classes) of image shard sets; `labeled`: classes are the train set's labels (the
    one label policy, `class_index`) and a valid/test label unseen in training is an error naming the set."""
    classes = None
    if labeled:
        metas = {s: read_meta(spec) for s, spec in shards.items()}
        if not metas["train"].get("labels"):
            raise ValueError(f"{shards['train']}: the shards hold no labels (class subfolders or a third column "
                             "`label` when sharding)")
        classes = class_index(metas["train"]["labels"], shards["train"])
        for s, meta in metas.items():
            unseen = sorted(set(meta.get("labels") or []) - set(classes))
            if unseen:
                raise ValueError(f"{shards[s]}: labels {unseen[:10]} do not occur in the training split")
    datasets = {s: ShardItems(spec, decode=ImageShardDecoder(spec, tf["train" if s == "train" else "eval"], seed,
                                                             on_error, classes),
                              shuffle=s == "train", seed=seed) for s, spec in shards.items()}
    return datasets, classes


class ImageDataModule(DataModule):
    """Unlabeled images for MAE / data2vec pretraining (see module doc for sources and transforms).

    train / valid / test: a folder, a file list or "embedded:images"; without `valid`, a fixed
    `valid_fraction` of the train images."""

    def __init__(
        self,
        *,
        train: str = "embedded:images",
        valid: str | None = None,
        test: str | None = None,
        valid_fraction: float = 0.01,
        embedded_size: str = "small",
        image_size: int = 224,  # MAE: ViT at 224x224
        min_scale: float = 0.2,  # MAE: RandomResizedCrop(scale=(0.2, 1.0))
        hflip: bool = True,
        eval_crop_pct: float = 0.875,  # 224 / 256
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
        batch_size: int = 64,  # MAE: 4096 global = 64 per GPU x 64 GPUs
        num_workers: int = 4,
        seed: int = 0,
        on_error: str = "raise",
    ) -> None:
        super().__init__(skipping="image")
        check_data_args(on_error, train, embedded_size)
        if image_size < 1:
            raise ValueError(f"image_size must be positive, got {image_size}")
        self.train, self.valid, self.test, self.valid_fraction = train, valid, test, valid_fraction
        self.embedded_size, self.image_size, self.min_scale, self.hflip = embedded_size, image_size, min_scale, hflip
        self.eval_crop_pct, self.mean, self.std = eval_crop_pct, tuple(mean), tuple(std)
        self.batch_size, self.num_workers, self.seed, self.on_error = batch_size, num_workers, seed, on_error
        self.collate = Collate()

    def split_files(self) -> dict[str, list[Path]]:
        """{"train": files, "valid": files[, "test": files]}."""
        return pretraining_splits(self.train, self.valid, self.test, corpus="images", size=self.embedded_size,
                                  valid_fraction=self.valid_fraction,
                                  read=lambda src: [f for f, _ in list_images(src, on_error=self.on_error,
                                                                              skips=self.skips)])

    def prepare_data(self) -> None:
        if is_embedded(self.train):
            embedded_corpus(self.train, size=self.embedded_size)

    def setup(self, stage: str | None = None) -> None:
        tf = transforms(self.image_size, self.mean, self.std, min_scale=self.min_scale, hflip=self.hflip,
                        crop_pct=self.eval_crop_pct)
        shards = shard_splits({"train": self.train, "valid": self.valid, "test": self.test}, "ImageDataModule")
        if shards:
            self.datasets, _ = image_shard_datasets(shards, tf, seed=self.seed, on_error=self.on_error)
            return
        files = self.split_files()
        if not files["train"]:
            raise ValueError(f"no images found in {self.train!r} (extensions {', '.join(IMAGE_EXTENSIONS)})")
        sources = {"train": self.train, "valid": self.valid or self.train, "test": self.test}
        self.datasets = {s: ImageDataset(fs, tf["train" if s == "train" else "eval"], on_error=self.on_error,
                                         skips=self.skips, source=sources[s])
                         for s, fs in files.items() if fs}
