"""The embedded corpora and `CORPORA`, the one registry of their names.

A data argument `"embedded:<name>[:<size>]"` names one of them (`"embedded:<size>"` is `"embedded:speech:<size>"`);
`embedded_corpus` writes it once under `$OMNISSL_DATA/corpora/<folder>-<size>-seed<seed>/` and returns its
manifests. Every corpus is generated from what the Python standard library and installed wheels ship.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from omnissl.datamodules.common import EMBEDDED_PREFIX, SIZES, check_size, data_root
from omnissl.datamodules.corpora import (captions, images, labeled_images, labeled_speech, labeled_text, shapes, speech,
                                        text)


@dataclass(frozen=True)
class Corpus:
    """generate(out, size=, seed=) -> {split: manifest}; folder: the cache folder's stem; modality: "audio",
    "text", "image" or "audio_text" (what its DataModule reads); labeled: whether manifests carry labels."""

    generate: Callable[..., dict[str, Path]]
    folder: str
    modality: str
    labeled: bool


CORPORA: dict[str, Corpus] = {
    "speech": Corpus(speech.generate, "speech", "audio", labeled=False),
    "keywords": Corpus(functools.partial(labeled_speech.generate, task="keywords"), "labeled_speech-keywords",
                       "audio", labeled=True),
    "speakers": Corpus(functools.partial(labeled_speech.generate, task="speakers"), "labeled_speech-speakers",
                       "audio", labeled=True),
    "captions": Corpus(captions.generate, "captions", "audio_text", labeled=False),
    "text": Corpus(text.generate, "text", "text", labeled=False),
    "images": Corpus(images.generate, "images", "image", labeled=False),
    "labeled_text": Corpus(labeled_text.generate, "labeled_text", "text", labeled=True),
    "labeled_images": Corpus(labeled_images.generate, "labeled_images", "image", labeled=True),
    "shapes": Corpus(shapes.generate, "shapes", "image", labeled=True),
}


def parse_embedded(spec: str, default_size: str = "small") -> tuple[str, str]:
    """"embedded:<name>[:<size>]" or "embedded:<size>" (speech) -> (name, size); a typo raises ValueError."""
    parts = spec[len(EMBEDDED_PREFIX):].split(":") if spec.startswith(EMBEDDED_PREFIX) else []
    if len(parts) == 1 and parts[0] in SIZES:
        parts = ["speech", parts[0]]
    if not parts or len(parts) > 2 or parts[0] not in CORPORA or (len(parts) == 2 and parts[1] not in SIZES):
        raise ValueError(f"unknown embedded corpus {spec!r}; expected embedded:<name>[:<size>] with name in "
                         f"{', '.join(CORPORA)} and size in {', '.join(SIZES)} (embedded:<size> is speech)")
    return parts[0], parts[1] if len(parts) == 2 else default_size


def embedded_corpus(spec: str, *, size: str = "small", seed: int = 0) -> dict[str, Path]:
    """Generate (once) the corpus that `spec` names -> {split: manifest path}. `size` applies when the spec
    names none."""
    name, size = parse_embedded(spec, size)
    check_size(size)
    corpus = CORPORA[name]
    return corpus.generate(data_root() / "corpora" / f"{corpus.folder}-{size}-seed{seed}", size=size, seed=seed)


def corpus_modality(spec: str) -> str:
    """The modality of the corpus that `spec` names ("audio", "text", "image", "audio_text")."""
    return CORPORA[parse_embedded(spec)[0]].modality
