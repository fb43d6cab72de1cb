"""Labeled DataModules with fixed splits, for downstream probing and fine-tuning of pretrained encoders.

A labeled manifest is the unlabeled one with a third column `label`: a root line, then
`relpath<TAB>size<TAB>label` (size: UTF-8 bytes for text, pixels for images). Image sources may also be
folders with class subfolders, or plain lists without a root line, `path<TAB>label` (`labeled_images`). Text may also come inline as `.jsonl` ({"text": ..., "label": ...} per line).
`classes` is the train split's label set in the one label policy (`common.class_index`: numeric-aware order;
index = position); a valid or test label that does not occur in training is an error naming the file and the
label. Items carry "label" (int); `Collate` puts them in `Batch.targets["label"]` (B,) int64.

Embedded tasks: `"embedded:labeled_text[:<size>]"` (which stdlib family a docstring comes from; test split by
module) and `"embedded:labeled_images[:<size>]"` (scikit-learn's 8x8 digits); see `omnissl.datamodules.corpora`.
The labeled audio DataModule is `omnissl.datamodules.audio.AudioDataModule` (same label policy).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from omnissl.datamodules.base import DataModule
from omnissl.datamodules.collate import Collate
from omnissl.datamodules.common import (SPLITS, SkipLog, check_data_args, class_index, data_root, encode_labels,
                                        file_fingerprint, is_embedded, read_manifest)
from omnissl.datamodules.corpora import CORPORA, embedded_corpus, parse_embedded
from omnissl.datamodules.documents import decode_utf8
from omnissl.datamodules.image import (IMAGE_EXTENSIONS, IMAGENET_MEAN, IMAGENET_STD, ImageDataset,
                                       image_shard_datasets, list_images, shard_splits, transforms)
from omnissl.datamodules.shards import (ShardItems, check_out, finish_shards, optimize_items, origin, read_meta)
from omnissl.datamodules.tokenizers import (cached_tokenizer, check_tokenizer, expected_info, load_tokenizer,
                                            resolve_tokenizer, set_token_ids)


def labeled_sources(train: str, valid: str | None, test: str | None, *, corpus: str,
                    size: str) -> dict[str, str | None]:
    """{split: source} of a labeled DataModule: the given ones, with an embedded `train` ("embedded:<corpus>")
    supplying its own train split and any valid/test split not given."""
    given = {"train": train, "valid": valid, "test": test}
    if not is_embedded(train):
        return given
    name = parse_embedded(train)[0]  # its own corpus, or another labeled one of the same modality (e.g. shapes)
    if name != corpus and not (CORPORA[name].labeled and CORPORA[name].modality == CORPORA[corpus].modality):
        raise ValueError(f"expected 'embedded:{corpus}', got {train!r}")
    found = embedded_corpus(train, size=size)
    out = {s: given.get(s) or (str(found[s]) if s in found else None) for s in SPLITS}
    out["train"] = str(found["train"])
    return out


# ---------------------------------------------------------------------------------------------------- images


class LabeledImageDataModule(DataModule):
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
        super().__init__(skipping="image")
        check_data_args(on_error, train, embedded_size)
        self.train, self.valid, self.test, self.embedded_size = train, valid, test, embedded_size
        self.image_size, self.train_augment, self.min_scale, self.hflip = image_size, train_augment, min_scale, hflip
        self.eval_crop_pct, self.mean, self.std = eval_crop_pct, tuple(mean), tuple(std)
        self.batch_size, self.num_workers, self.seed, self.on_error = batch_size, num_workers, seed, on_error
        self.collate = Collate()

    def sources(self) -> dict[str, str | None]:
        """{split: folder or file list} (the embedded corpus generated on first use)."""
        return labeled_sources(self.train, self.valid, self.test, corpus="labeled_images", size=self.embedded_size)

    def prepare_data(self) -> None:
        self.sources()

    def setup(self, stage: str | None = None) -> None:
        shards = shard_splits({"train": self.train, "valid": self.valid, "test": self.test}, type(self).__name__)
        if shards:  # streamed litdata shards (omnissl/datamodules/shards.py)
            tf = transforms(self.image_size, self.mean, self.std, min_scale=self.min_scale, hflip=self.hflip,
                            crop_pct=self.eval_crop_pct, augment=self.train_augment)
            self.datasets, self.classes = image_shard_datasets(shards, tf, seed=self.seed, on_error=self.on_error,
                                                               labeled=True)
            return
        sources = self.sources()
        items = {s: labeled_images(src) for s, src in sources.items() if src is not None}
        if not items["train"]:
            raise ValueError(f"no images found in {sources['train']} (extensions {', '.join(IMAGE_EXTENSIONS)})")
        for f, lab in items["train"]:
            if lab is None:
                raise ValueError(f"{sources['train']}: {f} has no label (expected a last column `label`: "
                                 f"path<TAB>label or path<TAB>size<TAB>label, or class subfolders)")
        self.classes = class_index([lab for _, lab in items["train"]], sources["train"])
        tf = transforms(self.image_size, self.mean, self.std, min_scale=self.min_scale, hflip=self.hflip,
                        crop_pct=self.eval_crop_pct, augment=self.train_augment)
        self.datasets = {}
        for split, its in items.items():
            if not its:
                continue
            labels = encode_labels([lab for _, lab in its], self.classes, sources[split])
            self.datasets[split] = ImageDataset([f for f, _ in its], tf["train" if split == "train" else "eval"],
                                                labels=labels, on_error=self.on_error, skips=self.skips,
                                                source=sources[split])


def labeled_images(source: str) -> list[tuple[Path, str | None]]:
    """(file, label or None) of a labeled image source: class subfolders (`list_images`); a manifest (first line
    its root folder) `relpath<TAB>size<TAB>label`; or a plain list (no root line) whose last column is the label:
    `path<TAB>label` (the common form) or `path<TAB>size<TAB>label`. A line without that column has no label."""
    if not Path(source).is_file():
        return list_images(source)
    root, rows = read_manifest(source, require_root=False)
    with open(source, encoding="utf-8", errors="replace") as f:
        first = next((line.strip() for line in f if line.strip()), "")
    has_root = "\t" not in first and (Path(source).parent / first).is_dir()
    column = 2 if has_root else -1  # a manifest's 2nd column is the size; a list's 2-column form is path, label
    return [(root / row[0], row[column] if len(row) > max(column, 1) and row[column] != "" else None)
            for row in rows]


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


@dataclass
class LabeledTextItems:
    """optimize() fn: (index, text, label) -> one labeled text shard item."""

    source: str

    def __call__(self, row: tuple) -> Iterator[dict]:
        i, text, label = row
        yield {"id": int(i), "text": text, "label": label, "origin": origin(self.source, f"{self.source} item {i}")}


def write_labeled_text_shards(source: str | os.PathLike, out: str, *, on_error: str = "raise",
                              chunk_bytes: str = "64MB", num_workers: int = 1) -> dict:
    """Shard a labeled text set (a manifest of text files with a label column, or `.jsonl`; read as the files
    path reads it, `read_labeled_texts`) into `out`: one item per example, `{"id", "text", "label", "origin"}`,
    zstd-compressed chunks; returns the metadata (kind "labeled_text", labels, skipped files)."""
    check_out(out)
    skips = SkipLog("text file")
    texts, labels = read_labeled_texts(source, on_error=on_error, skips=skips)
    if not texts:
        raise ValueError(f"{source}: no labeled texts to shard ({len(skips)} skipped)")
    optimize_items(LabeledTextItems(str(source)), [(i, t, y) for i, (t, y) in enumerate(zip(texts, labels))], out,
                   compression="zstd", chunk_bytes=chunk_bytes, num_workers=num_workers)
    return finish_shards(out, kind="labeled_text", source=source, skipped=skips.skipped, labels=labels)


@dataclass
class LabeledTextShardDecoder:
    """`ShardItems` decode of a labeled text item: {"id", "text": `<s> text </s>` truncated to `max_tokens`,
    "label"}, tokenized as the files path does (`LabeledTextDataModule.setup`). The tokenizer is loaded once per
    process."""

    tokenizer: str
    max_tokens: int
    classes: Sequence[str]

    def __call__(self, raw: dict, epoch: int) -> dict:
        tok = self.__dict__.get("loaded")
        if tok is None:
            tok = self.__dict__["loaded"] = load_tokenizer(self.tokenizer)
            tok.no_padding()
            tok.enable_truncation(self.max_tokens)
        ids = np.asarray(tok.encode(raw["text"], add_special_tokens=True).ids, dtype=np.int64)
        return {"id": int(raw["id"]), "text": torch.from_numpy(ids), "label": list(self.classes).index(raw["label"])}

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "loaded"}


class LabeledTextDataModule(DataModule):
    """Text classification with fixed train/valid/test splits (labeled manifests of text files, `.jsonl`, or
    `"embedded:labeled_text"`). Texts are tokenized once in `setup()` as `<s> text </s>`, truncated to
    `max_tokens`, with a given tokenizer (use the pretraining tokenizer when probing a pretrained encoder)
    or one trained on the train texts. Attributes as `TextDataModule`: `vocab_size`, `pad_id`, `mask_id`,
    `special_ids`; after `setup()` the `DataModule` surface (`classes`, `num_classes`, `skipped`, ...)."""

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
        super().__init__(skipping="text file")
        check_data_args(on_error, train, embedded_size)
        self.train, self.valid, self.test, self.embedded_size = train, valid, test, embedded_size
        self.tokenizer, self.tokenizer_kind, self.min_frequency = tokenizer, tokenizer_kind, min_frequency
        self.max_tokens, self.batch_size, self.num_workers = max_tokens, batch_size, num_workers
        self.seed, self.on_error = seed, on_error
        self.cache_dir = Path(cache_dir) if cache_dir else data_root() / "cache"
        set_token_ids(self, expected_info(tokenizer, tokenizer_kind, vocab_size))
        self._vocab_arg = vocab_size
        self.collate = Collate(text_pad_id=self.pad_id)
        self.tokenizer_path: Path | None = None

    def sources(self) -> dict[str, str | None]:
        """{split: labeled manifest or .jsonl} (the embedded corpus generated on first use)."""
        return labeled_sources(self.train, self.valid, self.test, corpus="labeled_text", size=self.embedded_size)

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
        self._resolve_tokenizer(self.sources()["train"])

    def setup(self, stage: str | None = None) -> None:
        shards = shard_splits({"train": self.train, "valid": self.valid, "test": self.test}, type(self).__name__)
        if shards:  # streamed litdata shards of `omnissl data shard LABELED.tsv|.jsonl`
            self._setup_shards(shards)
            return
        sources = self.sources()
        self.tokenizer_path = self._resolve_tokenizer(sources["train"])
        tok = check_tokenizer(self.tokenizer_path, self.info)
        tok.no_padding()
        tok.enable_truncation(self.max_tokens)
        data = {s: read_labeled_texts(src, on_error=self.on_error, skips=self.skips)
                for s, src in sources.items() if src is not None}
        if not data["train"][0]:
            raise ValueError(f"no labeled texts left in {sources['train']} "
                             f"({len(self.skips)} skipped as undecodable, on_error={self.on_error!r})")
        self.classes = class_index(data["train"][1], sources["train"])
        self.datasets = {}
        for split, (texts, labels) in data.items():
            if not texts:
                continue
            y = encode_labels(labels, self.classes, sources[split])
            ids = [np.asarray(e.ids, dtype=np.int32) for e in tok.encode_batch(texts, add_special_tokens=True)]
            self.datasets[split] = LabeledTextDataset(ids, y)

    def _setup_shards(self, shards: dict[str, str]) -> None:
        """Labeled text shards: the given tokenizer (a shard set is not read whole to train one); classes from the
        train set's labels; the same `<s> text </s>` truncated to `max_tokens` as from files."""
        if self.tokenizer is None:
            raise ValueError(f"train={self.train!r} is streamed: give `tokenizer` (the pretraining tokenizer, a "
                             "tokenizer.json or its folder)")
        path = Path(self.tokenizer)
        self.tokenizer_path = path / "tokenizer.json" if path.is_dir() else path
        check_tokenizer(self.tokenizer_path, self.info)
        metas = {s: read_meta(spec) for s, spec in shards.items()}
        for s, meta in metas.items():
            if meta.get("kind") != "labeled_text":
                raise ValueError(f"{s} data {shards[s]} holds {meta.get('kind')} shards, not labeled text "
                                 "(omnissl data shard LABELED.tsv or .jsonl)")
        self.classes = class_index(metas["train"]["labels"], shards["train"])
        for s, meta in metas.items():
            unseen = sorted(set(meta["labels"]) - set(self.classes))
            if unseen:
                raise ValueError(f"{shards[s]}: labels {unseen[:10]} do not occur in the training split")
        decode = LabeledTextShardDecoder(str(self.tokenizer_path), self.max_tokens, list(self.classes))
        self.datasets = {s: ShardItems(spec, decode=decode, shuffle=s == "train", seed=self.seed)
                         for s, spec in shards.items()}
