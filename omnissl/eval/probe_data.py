"""The probe's data: labeled manifests, folders, .jsonl files or embedded specs of the train / valid / test
splits -> one unshuffled loader per split, with the modality taken from the data (`source_modality`).

    data = load_probe_data("embedded:keywords:small", test="embedded:keywords:small")  # ProbeData
    data.loaders["train"], data.classes, data.sources["test"]

Audio goes through AudioDataModule, text and images through the labeled DataModules; their own checks
(labels of held-out splits must occur in train, ...) apply unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from omnissl.batch import Batch
from omnissl.datamodules.audio import AudioDataModule
from omnissl.datamodules.audio_io import EXTENSIONS as AUDIO_EXTENSIONS
from omnissl.datamodules.audio_io import read_audio_manifest
from omnissl.datamodules.common import is_embedded, read_manifest
from omnissl.datamodules.corpora import CORPORA, corpus_modality, parse_embedded
from omnissl.datamodules.image import IMAGE_EXTENSIONS
from omnissl.datamodules.labeled import LabeledImageDataModule, LabeledTextDataModule


def source_modality(spec: str) -> str:
    """"audio", "text" or "image" for a manifest, a folder, a .jsonl file or an embedded spec."""
    if is_embedded(spec):
        name, _ = parse_embedded(spec)
        if CORPORA[name].labeled or name == "speech":  # unlabeled speech: transcripts, for --task ctc
            return corpus_modality(spec)
        raise ValueError(f"{spec!r} names no labeled embedded corpus; expected embedded:keywords:<size>, "
                         "embedded:speakers:<size>, embedded:<size> (speech, for --task ctc), "
                         "embedded:labeled_text[:<size>] or embedded:labeled_images[:<size>]")
    path = Path(spec).expanduser()
    if path.suffix == ".jsonl":
        return "text"
    if path.is_dir():
        first = next((p for p in sorted(path.rglob("*"))
                      if p.suffix.lower() in AUDIO_EXTENSIONS + tuple(IMAGE_EXTENSIONS)), None)
        if first is None:
            raise ValueError(f"{path}: the folder holds no audio or image files")
        ext = first.suffix.lower()
    else:
        _, rows = read_manifest(path)
        if not rows:
            raise ValueError(f"{path}: the manifest lists no items")
        ext = Path(rows[0][0]).suffix.lower()
    return "audio" if ext in AUDIO_EXTENSIONS else "image" if ext in IMAGE_EXTENSIONS else "text"


@dataclass
class ProbeData:
    """Loaders of the probe's splits. sources: split -> manifest (for messages); rows (audio): split ->
    dataset id -> manifest line index; classes (classification); vocab_size (text)."""

    modality: str
    loaders: dict[str, Iterable[Batch]]
    sources: dict[str, str]
    rows: dict[str, np.ndarray] = field(default_factory=dict)
    classes: list[str] | None = None
    vocab_size: int | None = None


def load_probe_data(train: str, test: str, valid: str | None = None, *, task: str = "classify",
                    batch_size: int = 16, tokenizer: str | None = None, image_size: int = 224,
                    max_tokens: int = 512) -> ProbeData:
    """Labeled manifests (or embedded specs) of the probe's splits -> ProbeData, with the modality taken
    from the data. Classification needs labels in every split, and valid/test labels must occur in train:
    otherwise a ValueError (or AudioDataError) names the file and the label. CTC (audio only) needs
    transcripts beside every manifest (see `read_transcripts`)."""
    given = {"train": train, "valid": valid, "test": test}
    modalities = {s: source_modality(v) for s, v in given.items() if v is not None}
    if len(set(modalities.values())) != 1:
        raise ValueError(f"the splits disagree on the modality: {modalities}")
    modality = modalities["train"]
    if task not in ("classify", "ctc"):
        raise ValueError(f"unknown task {task!r}; expected classify or ctc")
    if task == "ctc" and modality != "audio":
        raise ValueError(f"the CTC probe needs speech with transcripts, got {modality} data ({train})")
    if modality == "audio":
        return _audio_data(given, task, batch_size)
    if modality == "text":
        dm_class, kwargs = LabeledTextDataModule, {"tokenizer": tokenizer, "max_tokens": max_tokens}
    else:
        dm_class, kwargs = LabeledImageDataModule, {"image_size": image_size, "train_augment": False}
    args = dict(given)
    if is_embedded(train):
        for s in ("valid", "test"):  # the embedded corpus supplies its own held-out splits
            if args[s] is not None and is_embedded(args[s]):
                if parse_embedded(args[s]) != parse_embedded(train):
                    raise ValueError(f"--{s} {args[s]} must be the training corpus {train} or a manifest")
                args[s] = None
    dm = dm_class(train=args["train"], valid=args["valid"], test=args["test"], batch_size=batch_size,
                  num_workers=0, **kwargs)
    dm.prepare_data()
    dm.setup()
    sources = {s: str(p) for s, p in dm.sources().items() if given[s] is not None}
    loaders = {"train": dm.loader("train", shuffle=False)}
    for s in ("valid", "test"):
        if given[s] is not None:
            if dm.dataset(s) is None:
                raise ValueError(f"{sources[s]}: no {s} items")
            loaders[s] = dm.loader(s, shuffle=False)
    return ProbeData(modality, loaders, sources, classes=dm.classes,
                     vocab_size=dm.vocab_size if modality == "text" else None)


def _audio_data(given: dict[str, str | None], task: str, batch_size: int) -> ProbeData:
    dm = AudioDataModule(train=given["train"], valid=given["valid"], test=given["test"], max_samples=None,
                         min_samples=0, max_tokens=None, batch_size=batch_size, num_workers=0)
    dm.prepare_data()
    paths = dm.sources()
    if task == "classify":
        for s, p in paths.items():  # before setup(): it would take the classes of any labeled split
            if read_audio_manifest(p).labels is None:
                raise ValueError(f"{p}: no labels (a labeled manifest has a third column `label`; the probe "
                                 f"needs one in the {s} split)")
    dm.setup()
    loaders = {s: dm.loader(s, shuffle=False) for s in paths}
    rows = {s: dm.dataset(s).rows for s in paths}
    return ProbeData("audio", loaders, {s: str(p) for s, p in paths.items()}, rows=rows,
                     classes=dm.classes if task == "classify" else None)


