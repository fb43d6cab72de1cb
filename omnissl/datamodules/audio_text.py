"""`AudioTextDataModule`: (audio, caption) pairs for contrastive language-audio pretraining (CLAP).

Manifests are fairseq-style TSVs whose third column is the caption: a root line, then
`relpath<TAB>num_samples<TAB>caption`. Rows that share a file are several captions of one clip (Clotho and
AudioCaps have 5): a training item is a clip with one of its captions drawn at random each time (LAION-CLAP),
an evaluation item a clip with its first caption (the validation loss), and `eval_captions(split, clips)` gives
every caption of the clips for retrieval (LAION-CLAP's several-captions protocol, omnissl/ssl/clap.py).
`"embedded:captions"` generates the synthetic captioned-sound corpus (`omnissl.datamodules.corpora.captions`)
into `$OMNISSL_DATA` on first use and reads its `<split>.captions.tsv` (5 captions per clip); its test split
holds the held-out factor combinations.

Zero-shot classification data: `zeroshot`, a labeled audio manifest (`relpath<TAB>num_samples<TAB>label`, e.g.
`embedded:keywords`' or the captions corpus's `zeroshot.tsv`, the default with an embedded train), classified
against prompts of its class names (`zeroshot_data()`); a `<manifest stem>.classes.json` beside it
({"classes": [...], "heldout": [...]}) fixes the candidate classes and marks the held-out ones.

Captions are tokenized by a `tokenizers` tokenizer: a given `tokenizer.json`, or one trained on the train
captions (byte-level BPE or WordPiece, specials as in `omnissl.datamodules.text`), once, in
`prepare_data`, cached by the captions' content. Each caption becomes `<s> ... </s>` truncated to
`max_text_tokens` (77, CLIP's context; LAION-CLAP's RoBERTa tower also truncates to 77). All captions are
tokenized once in `setup()`, so workers never touch the tokenizer.

Audio is decoded by the one audio decoder (`omnissl.datamodules.audio_io.load_clip` / `load_audio`: soundfile,
mono, 16 kHz), reading only a window of `max_samples` (random in training, LAION-CLAP's `rand_trunc`; centred in
evaluation). A caption describes its whole clip, so keep `max_samples` at least as long as the clips for
exact pairs (the embedded clips are at most 4 s). An undecodable file raises `AudioDataError` naming it, or
with `on_error="skip"` is replaced by the next decodable item and counted.

Streamed: `train: shards:<folder or URI>` of `omnissl data shard CAPTIONS.tsv` (audio shards whose label is the
caption, one caption per clip; docs/streaming.md): captions tokenized in the workers, windows from (seed, epoch,
id).

Items are {"id", "audio": (T,) float32, "text": (N,) int64} (id: the clip's index in its split);
`Collate(text_pad_id=pad_id)` pads both into a `Batch` with `inputs` "audio" (B, T) and "text" (B, N) and their
`lengths`. Zero-shot items are {"id", "audio", "label"}.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from omnissl.datamodules.audio import shard_audio
from omnissl.datamodules.audio_io import AudioDataError, load_clip
from omnissl.datamodules.base import DataModule, pretraining_splits
from omnissl.datamodules.collate import Collate
from omnissl.datamodules.common import (SkipLog, check_data_args, check_on_error, class_index, crop_start, data_root,
                                        encode_labels, is_embedded, load_or_next, read_manifest)
from omnissl.datamodules.corpora import captions as captions_corpus
from omnissl.datamodules.corpora import embedded_corpus, parse_embedded
from omnissl.datamodules.shards import ShardItems, is_shards, read_meta
from omnissl.datamodules.tokenizers import (cached_tokenizer, check_tokenizer, expected_info, load_tokenizer,
                                            set_token_ids)


def read_caption_manifest(path: str | os.PathLike) -> tuple[list[Path], list[str]]:
    """(files, captions) of a `relpath<TAB>num_samples<TAB>caption` manifest."""
    root, rows = read_manifest(path)
    files, captions = [], []
    for n, row in enumerate(rows, start=2):
        if len(row) < 3 or not row[2].strip():
            raise ValueError(f"{path}: line {n} has no caption (expected relpath<TAB>num_samples<TAB>caption)")
        files.append(root / row[0])
        captions.append(row[2])
    return files, captions


def group_captions(files: Sequence[Path], captions: Sequence[str]) -> tuple[list[Path], list[list[str]]]:
    """Rows -> (clips, their captions): rows that name the same file are captions of one clip (first-seen order)."""
    order: dict[Path, list[str]] = {}
    for f, c in zip(files, captions):
        order.setdefault(f, []).append(c)
    return list(order), list(order.values())


class AudioTextDataset(Dataset):
    """(audio, caption ids) items: {"id", "audio": (T,) float32, "text": (N,) int64}; a clip's caption is drawn
    at random among its captions when `random_caption` (training), else its first. With `labels` instead of
    captions, items are {"id", "audio", "label"} (zero-shot classification)."""

    def __init__(self, files: Sequence[Path], token_ids: Sequence[Sequence[np.ndarray]] | None = None, *,
                 max_samples: int, random_crop: bool, random_caption: bool = False,
                 labels: Sequence[int] | None = None, on_error: str = "raise", skips: SkipLog | None = None,
                 source: object = "the caption manifest") -> None:
        check_on_error(on_error)
        described = labels if token_ids is None else token_ids
        if described is None or len(files) != len(described) or not files:
            raise ValueError(f"need as many captions (or labels) as files (got {len(files)} files)")
        self.files = [str(f) for f in files]
        self.token_ids = None if token_ids is None else [list(t) for t in token_ids]
        self.labels = None if labels is None else [int(x) for x in labels]
        self.max_samples, self.random_crop, self.on_error, self.source = max_samples, random_crop, on_error, source
        self.random_caption = random_caption
        self.skips = skips if skips is not None else SkipLog("audio file")

    @property
    def skipped(self) -> dict[str, str]:
        return self.skips.skipped

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> dict:
        return load_or_next(i, len(self.files), self._load, errors=(AudioDataError,), on_error=self.on_error,
                            skips=self.skips, name=lambda j: self.files[j], source=self.source)

    def _load(self, j: int) -> dict:
        audio = load_clip(self.files[j], self.max_samples, random=self.random_crop)
        if self.token_ids is None:
            return {"id": j, "audio": audio, "label": self.labels[j]}
        caps = self.token_ids[j]
        # torch's global generator: seeded per worker and epoch by the loaders, like the random crop
        k = int(torch.randint(0, len(caps), ())) if self.random_caption and len(caps) > 1 else 0
        return {"id": j, "audio": audio, "text": torch.from_numpy(caps[k].astype(np.int64))}


@dataclass
class AudioTextShardDecoder:
    """`ShardItems` decode of a captioned-audio shard item (an audio shard whose "label" is the caption):
    {"id", "audio": a `max_samples` window (random from (seed, epoch, id), or centred), "text": `<s> ... </s>`
    truncated to `max_text_tokens`}. An undecodable item raises `AudioDataError` naming the set and the item,
    or with on_error="skip" becomes {"id", "error", "file"} (counted by the loader)."""

    source: str
    tokenizer: str
    max_text_tokens: int
    max_samples: int
    random_crop: bool
    seed: int
    on_error: str

    def __call__(self, raw: dict, epoch: int) -> dict:
        tok = self.__dict__.get("loaded")
        if tok is None:
            tok = self.__dict__["loaded"] = load_tokenizer(self.tokenizer)
            tok.no_padding()
            tok.enable_truncation(self.max_text_tokens)
        i, n = int(raw["id"]), int(raw["n"])
        num = min(n, self.max_samples)
        start = crop_start(n, num, step=1, crop="random" if self.random_crop else "center", seed=self.seed,
                           epoch=epoch, i=i) if num < n else 0
        try:
            audio = shard_audio(raw["audio"], start=start, num=num, expected=n)
        except AudioDataError as e:
            msg = f"{self.source} item {i}: {e}"
            if self.on_error == "raise":
                raise AudioDataError(msg) from None
            return {"id": i, "error": msg, "file": f"{self.source}#{i}"}
        ids = np.asarray(tok.encode(raw["label"], add_special_tokens=True).ids, dtype=np.int64)
        return {"id": i, "audio": audio, "text": torch.from_numpy(ids)}

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "loaded"}


class AudioTextDataModule(DataModule):
    """Captioned audio (see module doc). train / valid / test: caption manifests or "embedded:captions" (whose
    valid and test splits are used unless given); without `valid`, a fixed `valid_fraction` of train's clips.
    zeroshot: a labeled audio manifest for zero-shot classification (default with an embedded train: the
    corpus's zero-shot clips; "none" for none). coarse_captions k (embedded corpus only): up to k more captions per
    train clip that name each tone or beeps event by its pitch or its sound only, not both (`_add_coarse_captions`;
    valid, test and zero-shot data unchanged). Attributes known at construction: `vocab_size` (padded to 64),
    `pad_id`, `mask_id`, `bos_id`, `eos_id`, `special_ids`; after `setup()`, besides the `DataModule` surface:
    `tokenizer_path`, `eval_captions()`, `zeroshot_data()`, `tokenize()`."""

    def __init__(
        self,
        *,
        train: str = "embedded:captions",
        valid: str | None = None,
        test: str | None = None,
        zeroshot: str | None = None,
        valid_fraction: float = 0.01,
        embedded_size: str = "small",
        tokenizer: str | None = None,
        tokenizer_kind: str = "bpe",
        vocab_size: int = 8192,
        min_frequency: int = 2,
        max_text_tokens: int = 77,  # CLIP / LAION-CLAP text context
        max_samples: int = 160_000,  # 10 s at 16 kHz (LAION-CLAP: 10 s at 48 kHz)
        batch_size: int = 96,  # LAION-CLAP: 96 per GPU x 24 GPUs
        num_workers: int = 4,
        seed: int = 0,
        on_error: str = "raise",
        cache_dir: str | None = None,
        coarse_captions: int = 0,
    ) -> None:
        super().__init__(skipping="audio file")
        check_data_args(on_error, train, embedded_size)
        if coarse_captions < 0:
            raise ValueError(f"coarse_captions must be >= 0, got {coarse_captions}")
        if coarse_captions and not (is_embedded(train) and parse_embedded(train)[0] == "captions"):
            raise ValueError(f"coarse_captions needs the embedded captions corpus (train: embedded:captions), whose "
                             f"labels name each event's factors; got train={train!r}")
        self.coarse_captions = coarse_captions
        if max_text_tokens < 3:
            raise ValueError(f"max_text_tokens must be at least 3 (<s> x </s>), got {max_text_tokens}")
        self.train, self.valid, self.test, self.valid_fraction = train, valid, test, valid_fraction
        self.zeroshot = zeroshot
        self.embedded_size, self.tokenizer = embedded_size, tokenizer
        self.tokenizer_kind, self.min_frequency = tokenizer_kind, min_frequency
        self.max_text_tokens, self.max_samples = max_text_tokens, max_samples
        self.batch_size, self.num_workers, self.seed, self.on_error = batch_size, num_workers, seed, on_error
        self.cache_dir = Path(cache_dir) if cache_dir else data_root() / "cache"
        if tokenizer is not None and Path(tokenizer).is_dir():
            tokenizer = str(Path(tokenizer) / "tokenizer.json")  # a text encoder's package: its tokenizer
            self.tokenizer = tokenizer
        # a given tokenizer that does not exist yet (written by an earlier step of a pipeline, e.g. the MLM run a
        # text tower starts from) is announced as a tokenizer of `tokenizer_kind` and `vocab_size`, and checked
        # against that at setup
        known = tokenizer if tokenizer is not None and Path(tokenizer).is_file() else None
        set_token_ids(self, expected_info(known, tokenizer_kind, vocab_size))
        self._vocab_arg = vocab_size
        self.collate = Collate(text_pad_id=self.pad_id)
        self.tokenizer_path: Path | None = None
        self._tok = None
        self.zeroshot_classes: list[str] | None = None
        self.zeroshot_heldout: list[bool] | None = None

    def _sources(self) -> tuple[dict[str, object], object | None]:
        """({split: caption manifest}, zero-shot manifest or None); an embedded train brings every caption of its
        clips (`<split>.captions.tsv`), its valid and test splits and its zero-shot clips."""
        zeroshot = None if self.zeroshot in (None, "none") else self.zeroshot
        if not is_embedded(self.train):
            return {"train": self.train, "valid": self.valid, "test": self.test}, zeroshot
        if parse_embedded(self.train)[0] != "captions":
            raise ValueError(f"this DataModule reads 'embedded:captions', not {self.train!r}")
        found = embedded_corpus(self.train, size=self.embedded_size)
        every = {s: m.with_name(f"{s}.captions.tsv") for s, m in found.items()}
        if self.zeroshot is None:
            zeroshot = found["train"].with_name("zeroshot.tsv")
        return {"train": every["train"], "valid": self.valid or every["valid"],
                "test": self.test or every["test"]}, zeroshot

    def manifests(self) -> dict[str, tuple[list[Path], list[list[str]]]]:
        """{"train": (clips, captions per clip), "valid": ...[, "test": ...]}."""
        sources, _ = self._sources()
        read = lambda src: list(zip(*group_captions(*read_caption_manifest(src))))  # noqa: E731
        if sources["valid"] is not None:
            pairs = {s: read(src) for s, src in sources.items() if src is not None}
        else:
            pairs = pretraining_splits(str(sources["train"]), None, None, corpus="captions", size=self.embedded_size,
                                       valid_fraction=self.valid_fraction, read=read)
            if sources["test"] is not None:
                pairs["test"] = read(sources["test"])
        out = {s: ([f for f, _ in ps], [c for _, c in ps]) for s, ps in pairs.items()}
        if self.coarse_captions:
            self._add_coarse_captions(*out["train"])
        return out

    def _add_coarse_captions(self, files: list[Path], captions: list[list[str]]) -> None:
        """Add (in place) up to `coarse_captions` captions to each train clip of the embedded corpus that name each
        tone or beeps event by its pitch or its sound only (`corpora.captions.coarse_captions`, drawn from the
        clip's labels with a generator of (corpus seed, clip); those equal to one of its captions are left out)."""
        manifest = embedded_corpus(self.train, size=self.embedded_size)["train"]
        labels = {}
        for line in manifest.with_suffix(".labels.jsonl").read_text(encoding="utf-8").splitlines():
            lab = json.loads(line)
            labels[lab["path"]] = lab
        root = read_manifest(manifest)[0]
        for i, (f, caps) in enumerate(zip(files, captions)):
            rel = Path(f).relative_to(root).as_posix()
            if rel not in labels:
                raise ValueError(f"{manifest.with_suffix('.labels.jsonl')}: no labels for train clip {rel}")
            rng = np.random.default_rng([0, 11, int(Path(rel).stem)])
            for c in captions_corpus.coarse_captions(labels[rel], self.coarse_captions, rng):
                if c not in caps:
                    caps.append(c)

    def _tokenizer_path(self, captions: list[str]) -> Path:
        if self.tokenizer is not None:
            path = Path(self.tokenizer)
            return path / "tokenizer.json" if path.is_dir() else path
        digest = hashlib.sha1("\n".join(captions).encode("utf-8")).hexdigest()
        return cached_tokenizer(lambda: iter(captions), key=digest, name="captions", kind=self.tokenizer_kind,
                                vocab_size=self._vocab_arg, min_frequency=self.min_frequency,
                                cache_dir=self.cache_dir)

    def prepare_data(self) -> None:
        if is_shards(self.train):
            self._shard_setup(build=False)
            return
        self._tokenizer_path([c for caps in self.manifests()["train"][1] for c in caps])

    def tokenize(self, texts: Sequence[str]) -> list[torch.Tensor]:
        """Texts -> `<s> ... </s>` token ids (1-D int64 tensors), truncated to max_text_tokens (after setup)."""
        if self._tok is None:
            raise RuntimeError("call setup() before tokenize()")
        return [torch.tensor(e.ids, dtype=torch.long) for e in self._tok.encode_batch(list(texts),
                                                                                       add_special_tokens=True)]

    def decode(self, ids) -> str:
        """Token ids -> text (after setup)."""
        if self._tok is None:
            raise RuntimeError("call setup() before decode()")
        return self._tok.decode([int(i) for i in ids])

    def _shard_setup(self, build: bool = True) -> None:
        """Streamed captioned audio (`omnissl data shard CAPTIONS.tsv`: the caption is the item's label); the
        tokenizer is the given one or is trained on the train set's captions (recorded when sharding)."""
        given = {"train": self.train, "valid": self.valid, "test": self.test}
        plain = [s for s, spec in given.items() if spec is not None and not is_shards(spec)]
        if plain:
            raise ValueError(f"AudioTextDataModule: train is a shard set, so {plain} must be too")
        captions = read_meta(self.train).get("labels") or []
        if self.tokenizer is None and not captions:
            raise ValueError(f"{self.train}: the shards hold no captions (third manifest column when sharding)")
        self.tokenizer_path = self._tokenizer_path(captions)
        tok = check_tokenizer(self.tokenizer_path, self.info)
        tok.no_padding()
        tok.enable_truncation(self.max_text_tokens)
        self._tok = tok
        if not build:
            return
        self.datasets = {}
        for split, spec in given.items():
            if spec is None:
                continue
            decode = AudioTextShardDecoder(spec, str(self.tokenizer_path), self.max_text_tokens, self.max_samples,
                                           split == "train", self.seed, self.on_error)
            self.datasets[split] = ShardItems(spec, decode=decode, shuffle=split == "train", seed=self.seed)

    def setup(self, stage: str | None = None) -> None:
        if is_shards(self.train):
            self._shard_setup()
            return
        splits = self.manifests()
        if not splits["train"][0]:
            raise ValueError(f"no (audio, caption) pairs in {self.train!r}")
        self.tokenizer_path = self._tokenizer_path([c for caps in splits["train"][1] for c in caps])
        tok = check_tokenizer(self.tokenizer_path, self.info)
        tok.no_padding()
        tok.enable_truncation(self.max_text_tokens)
        self._tok = tok
        sources, zeroshot = self._sources()
        sources = {**sources, "valid": sources["valid"] or sources["train"]}
        self.datasets = {}
        for split, (files, caps) in splits.items():
            if not files:
                continue
            flat = [c for cs in caps for c in cs]
            ids = [np.asarray(e.ids, dtype=np.int32) for e in tok.encode_batch(flat, add_special_tokens=True)]
            per_clip, k = [], 0
            for cs in caps:
                per_clip.append(ids[k:k + len(cs)])
                k += len(cs)
            self.datasets[split] = AudioTextDataset(files, per_clip, max_samples=self.max_samples,
                                                    random_crop=split == "train", random_caption=split == "train",
                                                    on_error=self.on_error, skips=self.skips, source=sources[split])
        if zeroshot is not None:
            self._setup_zeroshot(Path(str(zeroshot)))

    def _setup_zeroshot(self, manifest: Path) -> None:
        root, rows = read_manifest(manifest)
        if any(len(r) < 3 for r in rows):
            raise ValueError(f"{manifest}: a zero-shot manifest needs a label column (relpath<TAB>num_samples<TAB>"
                             "label)")
        labels = [r[2] for r in rows]
        spec = manifest.with_name(f"{manifest.stem}.classes.json")
        if spec.is_file():
            described = json.loads(spec.read_text())
            classes = [str(c) for c in described["classes"]]
            held = set(described.get("heldout", []))
            self.zeroshot_heldout = [c in held for c in classes] if held else None
        else:
            classes = class_index(labels, manifest)
        self.zeroshot_classes = classes
        self.datasets["zeroshot"] = AudioTextDataset([root / r[0] for r in rows], None,
                                                     labels=encode_labels(labels, classes, manifest),
                                                     max_samples=self.max_samples, random_crop=False,
                                                     on_error=self.on_error, skips=self.skips, source=manifest)

    def eval_captions(self, split: str, clips: Sequence[int]) -> list[list[torch.Tensor]]:
        """Every caption (token ids) of each of `clips` (indices into `split`'s dataset, as `Batch.ids`)."""
        ds = self.dataset(split)
        if ds is None or getattr(ds, "token_ids", None) is None:
            raise ValueError(f"no captioned split {split!r} (retrieval over several captions per clip needs a caption "
                             "manifest or the embedded corpus; a streamed shard set holds one caption per clip)")
        return [[torch.from_numpy(t.astype(np.int64)) for t in ds.token_ids[int(i)]] for i in clips]

    def zeroshot_data(self):
        """(loader of labeled clips, class names, tokenize, held-out flags per class or None), or None without
        zero-shot data: what CLAP's validation classifies by prompts."""
        if self.dataset("zeroshot") is None:
            return None
        return self.loader("zeroshot", shuffle=False), self.zeroshot_classes, self.tokenize, self.zeroshot_heldout
