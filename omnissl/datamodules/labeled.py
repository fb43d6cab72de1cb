"""Labeled DataModules with fixed splits, for downstream probing and fine-tuning of pretrained encoders.

A labeled manifest is the unlabeled one with a third column `label`: a root line, then
`relpath<TAB>size<TAB>label` (size: UTF-8 bytes for text, pixels for images). Image sources may also be
folders with class subfolders. Text may also come inline as `.jsonl` ({"text": ..., "label": ...} per line).
`classes` is the sorted set of the train split's labels (index = position); a valid or test label that does
not occur in training is an error naming the file and the label. Items carry "label" (int); `Collate` puts
them in `Batch.targets["label"]` (B,) int64.

Embedded tasks: `"embedded:labeled_text"` (which stdlib family a docstring comes from; test split by module)
and `"embedded:labeled_images"` (scikit-learn's 8x8 digits); see `omnissl.datamodules.corpora`. The labeled
audio DataModule lives in `omnissl.datamodules.audio`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from omnissl.datamodules.collate import Collate
from omnissl.datamodules.common import (SkipLog, check_on_error, check_size, data_root, embedded_corpus,
                                        file_fingerprint, is_embedded, read_manifest, split_loader)
from omnissl.datamodules.image import (IMAGE_EXTENSIONS, IMAGENET_MEAN, IMAGENET_STD, ImageDataset, eval_transform,
                                       list_images, train_transform)
from omnissl.datamodules.text import (cached_tokenizer, decode_utf8, kind_info, load_tokenizer, resolve_tokenizer,
                                      tokenizer_info)

SPLITS = ("train", "valid", "test")


def class_index(train_labels: Sequence[str], train_source: object) -> list[str]:
    """The sorted label set of the training split (numerically when every label is an integer)."""
    labels = set(train_labels)
    numeric = all(lab.lstrip("-").isdigit() for lab in labels)
    classes = sorted(labels, key=(lambda x: (int(x), x)) if numeric else None)
    if not classes:
        raise ValueError(f"{train_source}: the training split has no labeled items")
    return classes


def encode_labels(labels: Sequence[str | None], classes: list[str], source: object) -> list[int]:
    """Label strings -> class indices; a label unseen in training (or a missing one) raises naming `source`."""
    index = {c: i for i, c in enumerate(classes)}
    out = []
    for n, lab in enumerate(labels):
        if lab is None:
            raise ValueError(f"{source}: item {n} has no label (expected a third column `label` or class "
                             f"subfolders)")
        if lab not in index:
            raise ValueError(f"{source}: label {lab!r} does not occur in the training split "
                             f"(training classes: {classes[:20]}{' ...' if len(classes) > 20 else ''})")
        out.append(index[lab])
    return out


def _embedded_splits(spec: str, expected: str, size: str, given: dict[str, str | None]) -> dict:
    if spec != expected:
        raise ValueError(f"expected {expected!r}, got {spec!r}")
    found = embedded_corpus(spec, size=size)
    out = {s: given.get(s) or (str(found[s]) if s in found else None) for s in SPLITS}
    out["train"] = str(found["train"])
    return out


class _LabeledBase(L.LightningDataModule):
    classes: list[str]

    def _loader(self, ds: Dataset | None, train: bool) -> DataLoader | list:
        return split_loader(self, ds, train, self.collate)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.sets.get("train"), True)

    def val_dataloader(self) -> DataLoader | list:
        return self._loader(self.sets.get("valid"), False)

    def test_dataloader(self) -> DataLoader | list:
        return self._loader(self.sets.get("test"), False)

    def predict_dataloader(self) -> DataLoader | list:
        return self._loader(self.sets.get("test"), False)


# ---------------------------------------------------------------------------------------------------- images


class LabeledImageDataModule(_LabeledBase):
    """Image classification with fixed train/valid/test splits (folders with class subfolders, labeled lists,
    or `"embedded:labeled_images"`). Train uses MAE's augmentation when `train_augment`, else the eval
    transform (as for a frozen linear probe)."""

    def __init__(
        self,
        *,
        train: str = "embedded:labeled_images",
        valid: str | None = None,
        test: str | None = None,
        embedded_size: str = "small",
        image_size: int = 224,
        train_augment: bool = True,
        min_scale: float = 0.2,
        hflip: bool = True,
        eval_crop_pct: float = 0.875,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
        batch_size: int = 64,
        num_workers: int = 4,
        seed: int = 0,
        on_error: str = "raise",
    ) -> None:
        super().__init__()
        check_on_error(on_error)
        if is_embedded(train):
            check_size(embedded_size)
        self.train, self.valid, self.test, self.embedded_size = train, valid, test, embedded_size
        self.image_size, self.train_augment, self.min_scale, self.hflip = image_size, train_augment, min_scale, hflip
        self.eval_crop_pct, self.mean, self.std = eval_crop_pct, tuple(mean), tuple(std)
        self.batch_size, self.num_workers, self.seed, self.on_error = batch_size, num_workers, seed, on_error
        self.collate = Collate()
        self.classes: list[str] = []
        self.sets: dict[str, ImageDataset] = {}

    def split_sources(self) -> dict[str, str | None]:
        given = {"train": self.train, "valid": self.valid, "test": self.test}
        if is_embedded(self.train):
            return _embedded_splits(self.train, "embedded:labeled_images", self.embedded_size, given)
        return given

    def prepare_data(self) -> None:
        self.split_sources()

    def setup(self, stage: str | None = None) -> None:
        sources = self.split_sources()
        items = {s: list_images(src) for s, src in sources.items() if src is not None}
        if not items["train"]:
            raise ValueError(f"no images found in {sources['train']} (extensions {', '.join(IMAGE_EXTENSIONS)})")
        for n, (f, lab) in enumerate(items["train"]):
            if lab is None:
                raise ValueError(f"{sources['train']}: {f} has no label (expected a third column `label` or "
                                 f"class subfolders)")
        self.classes = class_index([lab for _, lab in items["train"]], sources["train"])
        evalt = eval_transform(self.image_size, self.mean, self.std, crop_pct=self.eval_crop_pct)
        traint = (train_transform(self.image_size, self.mean, self.std, min_scale=self.min_scale, hflip=self.hflip)
                  if self.train_augment else evalt)
        self.sets = {}
        for split, its in items.items():
            if not its:
                continue
            labels = encode_labels([lab for _, lab in its], self.classes, sources[split])
            self.sets[split] = ImageDataset([f for f, _ in its], traint if split == "train" else evalt,
                                            labels=labels, on_error=self.on_error)

    @property
    def skipped(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for ds in self.sets.values():
            out.update(ds.skipped)
        return out


# ------------------------------------------------------------------------------------------------------ text


class LabeledTextDataset(Dataset):
    """{"id", "text": (N,) int64 (`<s> ... </s>`, truncated), "label": int}."""

    def __init__(self, token_ids: Sequence[np.ndarray], labels: Sequence[int]) -> None:
        self.token_ids, self.labels = list(token_ids), [int(x) for x in labels]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"id": i, "text": torch.from_numpy(self.token_ids[i].astype(np.int64)), "label": self.labels[i]}


def read_labeled_texts(source: str | os.PathLike, *, on_error: str, skips: SkipLog) -> tuple[list[str], list[str]]:
    """(texts, labels) of a labeled manifest (`relpath<TAB>num_bytes<TAB>label`) or `.jsonl` file."""
    path = Path(source)
    texts, labels = [], []
    if path.suffix == ".jsonl":
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                text, label = obj["text"], obj["label"]
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{path}: line {n} is not a JSON object with 'text' and 'label': {e}") from None
            texts.append(str(text))
            labels.append(str(label))
        return texts, labels
    root, rows = read_manifest(path)
    for n, row in enumerate(rows, start=2):
        if len(row) < 3 or row[2] == "":
            raise ValueError(f"{path}: line {n} has no label (expected relpath<TAB>num_bytes<TAB>label)")
        file = root / row[0]
        try:
            text = decode_utf8(file, file.read_bytes())
        except (ValueError, OSError) as e:
            if on_error == "raise":
                raise ValueError(str(e) if isinstance(e, ValueError) else f"{file}: cannot read: {e}") from None
            skips.add(file, str(e))
            continue
        texts.append(text)
        labels.append(row[2])
    return texts, labels


class LabeledTextDataModule(_LabeledBase):
    """Text classification with fixed train/valid/test splits (labeled manifests of text files, `.jsonl`, or
    `"embedded:labeled_text"`). Texts are tokenized once in `setup()` as `<s> text </s>`, truncated to
    `max_tokens`, with a given tokenizer (use the pretraining tokenizer when probing a pretrained encoder)
    or one trained on the train texts. Attributes as `TextDataModule`: `vocab_size`, `pad_id`, `mask_id`,
    `special_ids`; after `setup()`: `classes`, `num_classes`, `skipped`."""

    def __init__(
        self,
        *,
        train: str = "embedded:labeled_text",
        valid: str | None = None,
        test: str | None = None,
        embedded_size: str = "small",
        tokenizer: str | None = None,
        tokenizer_kind: str = "bpe",
        vocab_size: int = 32_768,
        min_frequency: int = 2,
        max_tokens: int = 512,
        batch_size: int = 32,
        num_workers: int = 0,
        seed: int = 0,
        on_error: str = "raise",
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        check_on_error(on_error)
        if is_embedded(train):
            check_size(embedded_size)
        self.train, self.valid, self.test, self.embedded_size = train, valid, test, embedded_size
        self.tokenizer, self.tokenizer_kind, self.min_frequency = tokenizer, tokenizer_kind, min_frequency
        self.max_tokens, self.batch_size, self.num_workers = max_tokens, batch_size, num_workers
        self.seed, self.on_error = seed, on_error
        self.cache_dir = Path(cache_dir) if cache_dir else data_root() / "cache"
        info = tokenizer_info(load_tokenizer(tokenizer)) if tokenizer else kind_info(tokenizer_kind, vocab_size)
        self.info = info
        self.vocab_size, self.pad_id, self.mask_id = info.vocab_size, info.pad_id, info.mask_id
        self.bos_id, self.eos_id, self.unk_id = info.bos_id, info.eos_id, info.unk_id
        self.special_ids = info.special_ids
        self._vocab_arg = vocab_size
        self.collate = Collate(text_pad_id=self.pad_id)
        self.classes: list[str] = []
        self.sets: dict[str, LabeledTextDataset] = {}
        self.skips = SkipLog("text file")
        self.tokenizer_path: Path | None = None

    def split_sources(self) -> dict[str, str | None]:
        given = {"train": self.train, "valid": self.valid, "test": self.test}
        if is_embedded(self.train):
            return _embedded_splits(self.train, "embedded:labeled_text", self.embedded_size, given)
        return given

    def _train_files(self, source: str) -> list[Path]:
        if Path(source).suffix == ".jsonl":
            return [Path(source)]
        root, rows = read_manifest(source)
        return [root / row[0] for row in rows]

    def _resolve_tokenizer(self, train_source: str) -> Path:
        if self.tokenizer is None and Path(train_source).suffix == ".jsonl":  # inline texts
            return cached_tokenizer(
                lambda: read_labeled_texts(train_source, on_error=self.on_error, skips=SkipLog("text"))[0],
                key=file_fingerprint([Path(train_source)]), name="jsonl", kind=self.tokenizer_kind,
                vocab_size=self._vocab_arg, min_frequency=self.min_frequency, cache_dir=self.cache_dir)
        return resolve_tokenizer(self.tokenizer, train_files=self._train_files(train_source),
                                 kind=self.tokenizer_kind, vocab_size=self._vocab_arg,
                                 min_frequency=self.min_frequency, lowercase=None, on_error=self.on_error,
                                 cache_dir=self.cache_dir, progress=False)

    def prepare_data(self) -> None:
        sources = self.split_sources()
        self._resolve_tokenizer(sources["train"])

    def setup(self, stage: str | None = None) -> None:
        sources = self.split_sources()
        self.tokenizer_path = self._resolve_tokenizer(sources["train"])
        tok = load_tokenizer(self.tokenizer_path)
        info = tokenizer_info(tok)
        if info.vocab_size > self.vocab_size or info.pad_id != self.pad_id:
            raise ValueError(f"tokenizer {self.tokenizer_path} ({info}) disagrees with vocab_size/pad_id "
                             f"({self.vocab_size}/{self.pad_id})")
        tok.no_padding()
        tok.enable_truncation(self.max_tokens)
        data = {s: read_labeled_texts(src, on_error=self.on_error, skips=self.skips)
                for s, src in sources.items() if src is not None}
        if not data["train"][0]:
            raise ValueError(f"no labeled texts left in {sources['train']} "
                             f"({len(self.skips)} skipped as undecodable, on_error={self.on_error!r})")
        self.classes = class_index(data["train"][1], sources["train"])
        self.sets = {}
        for split, (texts, labels) in data.items():
            if not texts:
                continue
            y = encode_labels(labels, self.classes, sources[split])
            ids = [np.asarray(e.ids, dtype=np.int32) for e in tok.encode_batch(texts, add_special_tokens=True)]
            self.sets[split] = LabeledTextDataset(ids, y)

    @property
    def skipped(self) -> dict[str, str]:
        return self.skips.skipped
