"""`AudioDataModule`: raw 16 kHz waveforms (wav2vec 2.0, HuBERT, data2vec pretraining; labeled probes),
emitted as `Batch` through `Collate`.

Inputs
------
* **Manifests**, fairseq style (`omnissl.datamodules.audio_io`): first line the root folder, then
  `relative_path<TAB>num_samples[<TAB>label]` per utterance, `num_samples` counted at 16 kHz.
* **Folders**: any split argument that is a directory is scanned recursively for wav/flac/ogg (and
  opus/mp3 where libsndfile decodes them); `omnissl data manifest FOLDER --out FILE` writes the manifest once.
* **Embedded corpora** (`omnissl.datamodules.corpora.CORPORA`, generated on first use under `$OMNISSL_DATA`,
  default `~/.cache/omnissl`, in `prepare_data`):
  `"embedded:small"`, `"embedded:default"`, `"embedded:tiny"` (= `"embedded:speech:<size>"`): espeak-ng speech
  (with `.wrd`/`.ltr` transcripts beside each split's manifest, for the CTC probe);
  `"embedded:keywords:<size>"`, `"embedded:speakers:<size>"`: labeled sets. The split is taken from the
  argument: `train` -> train.tsv, `valid` -> valid.tsv, `test` -> test.tsv.
* **Frame-level units** (HuBERT targets): with `units="km"`, `train.tsv` is paired with `train.km` beside it,
  one line of space-separated ints per manifest line, at `label_rate` Hz (50 Hz = 320 samples per unit).
* **Labels**: a third manifest column; `item["label"]` is the index in `AudioDataModule.classes`, the train
  split's labels in the one label policy `common.class_index` (numeric-aware: "2" before "10").

Per item: decode with soundfile, downmix to mono, resample to 16 kHz, crop to `max_samples` (random for
training, centred for evaluation; only the cropped span is read from disk), optional per-utterance
normalization. Crops of unit-labeled audio start on a unit boundary, and the units kept are those whose
frame starts inside the crop, so audio and units stay aligned.

Batches: bucketed by length; every batch satisfies `len(batch) * longest_item <= max_tokens` (fairseq's
`max_tokens`), and/or holds at most `batch_size` items. Order and crops are functions of (seed, epoch), so a
resumed run sees the same data; under DDP each rank takes every world_size-th batch of one global list.

In a LightningCLI recipe:

    data:
      class_path: omnissl.datamodules.audio.AudioDataModule
      init_args:
        train: /data/librispeech/train.tsv    # or a folder, or "embedded:default"
        valid: /data/librispeech/valid.tsv
        max_tokens: 1400000
        units: km                             # HuBERT: train.km / valid.km beside the manifests

Bad input (corrupt, empty, zero-length, truncated or unreadable file; a manifest line naming a missing file;
units that do not match the audio): by default an `AudioDataError` naming the manifest line and the file;
with `on_error="skip"` the item is dropped and the count is logged at the end of each epoch (an epoch in
which every item failed raises, naming the manifest).
"""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, Dataset

from omnissl.batch import SAMPLE_RATE
from omnissl.datamodules.audio_io import (AudioDataError, AudioManifest, crop_units, line_offsets, load_audio,
                                          read_audio_manifest)
from omnissl.datamodules.base import DataModule
from omnissl.datamodules.collate import Collate
from omnissl.datamodules.common import SkipLog, check_on_error, class_index, crop_start, is_embedded
from omnissl.datamodules.corpora import embedded_corpus, parse_embedded
from omnissl.datamodules.sampler import BucketBatchSampler, ResumableLoader
from omnissl.datamodules.shards import ShardItems, ShardLoader, is_shards, read_meta

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------------
# dataset


class AudioDataset(Dataset):
    """Utterances of one manifest, filtered to >= `min_samples`.

    `dataset[i]` or `dataset[(i, epoch)]` -> {"id": i, "audio": (T,) float32 at 16 kHz, T <= max_samples,
    "units": (F,) int64 (with a units file), "label": int (labeled manifests)}; with on_error="skip" a bad item
    is {"id": i, "error": message} instead. Random crops are drawn from (seed, epoch, i), so they do not
    depend on worker assignment. Holds no open files (safe to fork into DataLoader workers).
    """

    def __init__(
        self, manifest: AudioManifest, *, max_samples: int | None = 250_000, min_samples: int = 0,
        crop: Literal["random", "center"] = "random", units: str | os.PathLike | None = None,
        label_rate: float = 50.0, classes: Sequence[str] | None = None, normalize: bool = False, seed: int = 0,
        on_error: Literal["raise", "skip"] = "raise",
    ) -> None:  # fmt: skip
        check_on_error(on_error)
        if crop not in ("random", "center"):
            raise ValueError(f"crop must be 'random' or 'center', got {crop!r}")
        self.manifest, self.max_samples, self.crop = manifest, max_samples, crop
        self.normalize, self.seed, self.on_error = normalize, seed, on_error
        self.rows = np.flatnonzero(manifest.sizes >= min_samples)  # dataset index -> manifest row
        self.num_filtered = len(manifest) - len(self.rows)
        full = manifest.sizes[self.rows]
        self.sizes = full if max_samples is None else np.minimum(full, max_samples)  # (n,) lengths as batched
        self.units_path = None if units is None else Path(units)
        self.samples_per_unit = SAMPLE_RATE / label_rate
        if self.units_path is not None:
            if not self.samples_per_unit.is_integer():
                raise ValueError(f"label_rate {label_rate} Hz must divide {SAMPLE_RATE} Hz")
            self.samples_per_unit = int(self.samples_per_unit)
            if not self.units_path.is_file():
                raise FileNotFoundError(f"units file {self.units_path} (for {manifest.source}) does not exist")
            self._offsets = line_offsets(self.units_path)
            if len(self._offsets) - 1 != len(manifest):
                raise AudioDataError(
                    f"{self.units_path} has {len(self._offsets) - 1} lines but {manifest.source} lists "
                    f"{len(manifest)} utterances: one line of units per manifest line is required"
                )
        self.classes = list(classes) if classes is not None else None
        if manifest.labels is not None and self.classes is not None:
            index = {c: k for k, c in enumerate(self.classes)}
            unknown = sorted({manifest.labels[r] for r in self.rows} - set(index))
            if unknown:
                raise AudioDataError(
                    f"{manifest.source}: labels {unknown[:10]} are not in the classes {self.classes[:20]}"
                )
            self._label_ids = np.array([index[manifest.labels[r]] for r in self.rows], np.int64)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def source(self) -> str:
        """The manifest (or scanned folder) this dataset reads."""
        return self.manifest.source

    def where(self, i: int) -> str:
        return self.manifest.where(int(self.rows[i]))

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        i, epoch = (int(key[0]), int(key[1])) if isinstance(key, tuple) else (int(key), 0)
        try:
            return self._load(i, epoch)
        except AudioDataError as e:
            msg = f"{self.where(i)}: {e}"
            if self.on_error == "raise":
                raise AudioDataError(msg) from e.__cause__
            row = int(self.rows[i])
            return {"id": i, "error": msg, "file": str(self.manifest.root / self.manifest.paths[row])}

    def _load(self, i: int, epoch: int) -> dict:
        # NOTE(ref): fairseq's RawAudioDataset (wav2vec 2.0 base, pad=False) crops every item of a batch to the
        # batch's shortest; we crop each item to max_samples alone and pad (Batch.lengths carries the valid
        # lengths), since length bucketing keeps padding small and no audio is thrown away.
        row = int(self.rows[i])
        n = int(self.manifest.sizes[row])
        num = n if self.max_samples is None else min(n, self.max_samples)
        step = self.samples_per_unit if self.units_path is not None else 1
        start = crop_start(n, num, step=step, crop=self.crop, seed=self.seed, epoch=epoch, i=i) if num < n else 0
        item: dict = {"id": i}
        if self.units_path is not None:
            item["units"] = crop_units(self._units(row), n=n, start=start, num=num,
                                       samples_per_unit=self.samples_per_unit, source=self.units_path)
        x = load_audio(self.manifest.root / self.manifest.paths[row], start=start, num=num, expected=n)
        if self.normalize:  # wav2vec 2.0 large / data2vec: zero mean, unit variance per utterance
            x = torch.nn.functional.layer_norm(x, x.shape)
        item["audio"] = x
        if self.manifest.labels is not None and self.classes is not None:
            item["label"] = int(self._label_ids[i])
        return item

    def _units(self, row: int) -> np.ndarray:
        lo, hi = int(self._offsets[row]), int(self._offsets[row + 1])
        with open(self.units_path, "rb") as f:
            f.seek(lo)
            text = f.read(hi - lo).decode("ascii", errors="replace")
        try:
            return np.array(text.split(), dtype=np.int64)
        except ValueError:
            raise AudioDataError(f"{self.units_path}:{row + 1}: units must be space-separated integers") from None



@dataclass
class DropFailed:
    """collate_fn: drops items that failed to load (on_error="skip") -> (Batch | None, [failed items])."""

    collate: Collate

    def __call__(self, items: Sequence[dict]):
        good = [it for it in items if "error" not in it]
        return (self.collate(good) if good else None), [it for it in items if "error" in it]


@dataclass
class AudioShardDecoder:
    """`ShardItems` decode of an audio shard item: the same crop, units, labels and bad-item handling as
    `AudioDataset`, from the item's FLAC bytes (crops are functions of (seed, epoch, id)). An item under
    `min_samples` becomes {"id", "short": True} (dropped by the loader); an undecodable one raises
    `AudioDataError` naming the shard set, the item and its source file, or with on_error="skip" becomes
    {"id", "error", "file"}."""

    source: str
    max_samples: int | None
    min_samples: int
    crop: str
    seed: int
    normalize: bool
    on_error: str
    samples_per_unit: int | None = None  # set: the items' units are HuBERT targets at this hop
    classes: Sequence[str] | None = None

    def __call__(self, raw: dict, epoch: int) -> dict:
        i, n = int(raw["id"]), int(raw["n"])
        if n < self.min_samples:
            return {"id": i, "short": True}
        num = n if self.max_samples is None else min(n, self.max_samples)
        spu = self.samples_per_unit
        start = crop_start(n, num, step=spu or 1, crop=self.crop, seed=self.seed, epoch=epoch, i=i) if num < n else 0
        item: dict = {"id": i}
        try:
            if spu is not None:
                item["units"] = crop_units(np.asarray(raw["units"]), n=n, start=start, num=num, samples_per_unit=spu,
                                           source="its units")
            x = shard_audio(raw["audio"], start=start, num=num, expected=n)
        except AudioDataError as e:
            msg = f"{self.source} item {i} (from {json.loads(raw['origin'])['where']}): {e}"
            if self.on_error == "raise":
                raise AudioDataError(msg) from None
            return {"id": i, "error": msg, "file": f"{self.source}#{i}"}
        item["audio"] = torch.nn.functional.layer_norm(x, x.shape) if self.normalize else x
        if self.classes is not None and raw.get("label"):
            item["label"] = list(self.classes).index(raw["label"])
        return item


def shard_audio(stored: np.ndarray, *, start: int, num: int, expected: int) -> torch.Tensor:
    """Samples [start, start + num) of a shard item's audio: int16 PCM (sliced; / 32768, as soundfile reads
    16-bit audio) or FLAC bytes (uint8, decoded by `load_audio`). Raises `AudioDataError`."""
    stored = np.asarray(stored)
    if stored.dtype == np.int16:
        if len(stored) != expected:
            raise AudioDataError(f"holds {len(stored)} samples but its header says {expected}")
        x = stored[start : start + num].astype(np.float32)
        x *= np.float32(1 / 32768)  # a power of two: exactly x / 32768, without a second array
        return torch.from_numpy(x)
    encoded = io.BytesIO(stored.astype(np.uint8, copy=False).tobytes())
    return load_audio(encoded, start=start, num=num, expected=expected)


def audio_length(item: dict) -> int:
    """Bucketing length of a decoded audio item (`ShardLoader`)."""
    return int(item["audio"].shape[-1])


class AudioLoader(ResumableLoader):
    """Resumable DataLoader (its position is in every checkpoint; omnissl/datamodules/sampler.py) over
    `DropFailed` batches: yields the `Batch`es and, at the end of each pass, logs how many
    items were skipped (`skipped` keeps the running total; `skips`, the DataModule's record, gets each file).
    A batch whose items all failed is left out (under DDP that rank then runs one step fewer; with many bad
    files, clean the manifest with `omnissl data inspect --on-error skip` instead). A pass in which every item
    failed raises `AudioDataError` naming the manifest: an epoch without a batch would otherwise repeat forever.
    """

    def __init__(self, dataset: Dataset, *, split: str = "train", skips: SkipLog | None = None, **kwargs) -> None:
        super().__init__(dataset, **kwargs)
        self.split = split
        self.skipped = 0
        self.skips = skips if skips is not None else SkipLog("audio file")

    def __iter__(self):  # type: ignore[override]
        skipped: list[str] = []
        yielded = 0
        try:
            for batch, failed in super().__iter__():
                for item in failed:
                    skipped.append(item["error"])
                    self.skips.add(item.get("file", item["error"]), item["error"], warn=False)
                if batch is not None:
                    yielded += 1
                    yield batch
        finally:
            if skipped:
                self.skipped += len(skipped)
                log.warning(
                    "%s data: skipped %d unreadable items this epoch (on_error='skip'); first: %s",
                    self.split, len(skipped), " | ".join(skipped[:3]),
                )  # fmt: skip
        if skipped and not yielded:
            source = getattr(getattr(self.dataset, "manifest", None), "source", "the manifest")
            raise AudioDataError(
                f"{self.split} data: every item of {source} failed to load this epoch ({len(skipped)} skipped with "
                f"on_error='skip'; first: {skipped[0]}): an epoch without a batch would repeat forever"
            )


# --------------------------------------------------------------------------------------------------------
# DataModule


class AudioDataModule(DataModule):
    """Raw-waveform DataModule for speech/audio pretraining and probes; see the module docstring.

    Defaults follow fairseq's wav2vec 2.0 base LibriSpeech recipe (`wav2vec2_base_librispeech.yaml`):
    crop 250 k samples, drop utterances under 32 k samples, 1.4 M samples per batch per device.

    train / valid / test: a .tsv manifest, a folder, "embedded:...", or "shards:<folder or URI>" (a shard set of
        `omnissl data shard`, streamed with litdata: omnissl/datamodules/shards.py) (None: no such split).
    max_samples: crop length (None: no crop). min_samples: shorter utterances are dropped (counted, logged).
    max_tokens: padded samples per batch (None: fixed `batch_size` batches). batch_size: items per batch
        (a cap when max_tokens is also set).
    units: extension of the HuBERT unit files beside each manifest ("km": train.tsv -> train.km), or None.
    label_rate: units per second (50 Hz: one per 320 samples).
    normalize: zero-mean unit-variance waveform per utterance (wav2vec 2.0 large, data2vec).
    on_error: "raise" (default) or "skip" bad items. seed: shuffling and crop seed.
    shard_pool: shard splits with max_tokens: items gathered per litdata batch and bucketed into batches.

    Public after `setup()` besides the `DataModule` surface: `sources()` (split -> manifest path),
    `unit_files()` ((manifest, unit file) pairs); `units` and `label_rate` are the constructor's.
    """

    def __init__(
        self, *, train: str | None = "embedded:default", valid: str | None = None, test: str | None = None,
        max_samples: int | None = 250_000, min_samples: int = 32_000, max_tokens: int | None = 1_400_000,
        batch_size: int | None = None, num_workers: int = 4, on_error: Literal["raise", "skip"] = "raise",
        units: str | None = None, label_rate: float = 50.0, normalize: bool = False, seed: int = 0,
        shard_pool: int = 64,
    ) -> None:  # fmt: skip
        super().__init__(skipping="audio file")
        self.save_hyperparameters()
        check_on_error(on_error)
        if max_tokens is None and batch_size is None:
            raise ValueError("set max_tokens, batch_size or both")
        if max_tokens is not None and max_samples is not None and max_tokens < max_samples:
            raise ValueError(f"max_tokens={max_tokens} is smaller than one max_samples={max_samples} crop")
        self.specs = {"train": train, "valid": valid, "test": test}
        for spec in self.specs.values():
            if is_embedded(spec):
                parse_embedded(spec)  # fail on a typo at construction, not after a long generation
        self.max_samples, self.min_samples = max_samples, min_samples
        self.max_tokens, self.batch_size, self.num_workers = max_tokens, batch_size, num_workers
        self.on_error, self.units, self.label_rate = on_error, units, label_rate
        self.normalize, self.seed, self.shard_pool = normalize, seed, shard_pool
        self.collate = Collate()

    # -- preparation -------------------------------------------------------------------------------------

    def prepare_data(self) -> None:
        """Generate the embedded corpora that the splits name (once, on local rank 0)."""
        self.sources()

    def source(self, split: str) -> Path | None:
        """The manifest (or folder) of `split`, generating an embedded corpus on first use; None: no such split
        or a shard set ("shards:...", read by litdata)."""
        spec = self.specs[split]
        if spec is None or is_shards(spec):
            return None
        if is_embedded(spec):
            return embedded_corpus(spec, size="default")[split]
        return Path(spec).expanduser()

    def sources(self) -> dict[str, Path]:
        """{split: manifest or folder} of the splits given."""
        return {s: p for s in self.specs if (p := self.source(s)) is not None}

    def unit_files(self) -> list[tuple[Path, Path]]:
        """(manifest, unit file) of every split set up with `units` (HuBERT checks them before training)."""
        return [(Path(ds.source), ds.units_path) for ds in self.datasets.values()
                if isinstance(ds, AudioDataset) and ds.units_path is not None]

    def setup(self, stage: str | None = None) -> None:
        wanted = {"fit": ("train", "valid"), "validate": ("valid",), "test": ("test",), "predict": ("test",)}
        splits = wanted.get(stage or "", ("train", "valid", "test"))
        manifests = {s: read_audio_manifest(self.source(s), on_error=self.on_error)
                     for s in splits if self.specs[s] is not None and s not in self.datasets
                     and not is_shards(self.specs[s])}  # fmt: skip
        shards = [s for s in splits if is_shards(self.specs[s]) and s not in self.datasets]
        if self.classes is None:
            self.classes = self._shard_classes() if is_shards(self.specs["train"]) else self._classes(manifests)
        for s, m in manifests.items():
            self.datasets[s] = self._dataset(s, m)
        for s in shards:
            self.datasets[s] = self._shard_dataset(s)
        if stage == "fit" and self.specs["train"] is None:
            raise ValueError("AudioDataModule: fitting needs a train split")

    def _classes(self, manifests: dict[str, AudioManifest]) -> list[str] | None:
        """`class_index` of the train manifest's labels (without a train split: of the first labeled one)."""
        if self.specs["train"] is not None:
            train = manifests.get("train") or read_audio_manifest(self.source("train"), on_error=self.on_error)
            return None if train.labels is None else class_index(train.labels, train.source)
        for m in manifests.values():
            if m.labels is not None:
                return class_index(m.labels, m.source)
        return None

    def _dataset(self, split: str, m: AudioManifest) -> AudioDataset:
        units = None
        if self.units is not None:
            if Path(m.source).is_dir():
                raise ValueError(f"units={self.units!r} needs a .tsv manifest for {split}, not a folder")
            units = Path(m.source).with_suffix("." + self.units.lstrip("."))
        ds = AudioDataset(
            m, max_samples=self.max_samples, min_samples=self.min_samples,
            crop="random" if split == "train" else "center", units=units, label_rate=self.label_rate,
            classes=self.classes, normalize=self.normalize, seed=self.seed, on_error=self.on_error,
        )  # fmt: skip
        if len(ds) == 0:
            longest = int(m.sizes.max()) if len(m) else 0
            raise ValueError(
                f"{split} data is empty: {m.source} lists {len(m)} utterances and all are shorter than "
                f"min_samples={self.min_samples} (the longest has {longest} samples at 16 kHz). Lower "
                "min_samples or point the manifest at more data."
            )
        if ds.num_filtered:
            rank_zero_info(f"{split} data: dropped {ds.num_filtered} of {len(m)} utterances shorter than "
                           f"min_samples={self.min_samples} ({m.source})")
        return ds

    def _shard_classes(self) -> list[str] | None:
        labels = read_meta(self.specs["train"]).get("labels")
        return class_index(labels, self.specs["train"]) if labels else None

    def _shard_dataset(self, split: str) -> ShardItems:
        spec = str(self.specs[split])
        meta = read_meta(spec)
        if meta and meta.get("kind") != "audio":
            raise ValueError(f"{split} data {spec} holds {meta.get('kind')} shards, not audio")
        spu = None
        if self.units is not None:
            if not meta.get("units"):
                raise ValueError(f"units={self.units!r}: the shards {spec} were written without units "
                                 "(omnissl data shard MANIFEST --units km)")
            rate = SAMPLE_RATE / self.label_rate
            if not rate.is_integer():
                raise ValueError(f"label_rate {self.label_rate} Hz must divide {SAMPLE_RATE} Hz")
            spu = int(rate)
        decode = AudioShardDecoder(
            source=spec, max_samples=self.max_samples, min_samples=self.min_samples,
            crop="random" if split == "train" else "center", seed=self.seed, normalize=self.normalize,
            on_error=self.on_error, samples_per_unit=spu, classes=self.classes,
        )  # fmt: skip
        return ShardItems(spec, decode=decode, shuffle=split == "train", seed=self.seed)

    # -- loaders -----------------------------------------------------------------------------------------

    def dataset(self, split: str) -> AudioDataset | ShardItems | None:
        """The Dataset of `split`, set up on first use; None when no such split was given."""
        if split not in self.datasets and self.specs.get(split) is not None:
            self.setup({"train": "fit", "valid": "validate"}.get(split, "test"))
        return self.datasets.get(split)  # type: ignore[return-value]

    def build_loader(self, ds: Dataset, split: str, shuffle: bool) -> DataLoader:
        """Length-bucketed batches under `max_tokens` (`BucketBatchSampler`); failed items dropped (`AudioLoader`)."""
        if isinstance(ds, ShardItems):
            ds.set_shuffle(shuffle)
            return ShardLoader(ds, collate=self.collate, length=audio_length, longest=self.max_samples,
                               pool=self.shard_pool,
                               max_tokens=self.max_tokens, batch_size=self.batch_size, num_workers=self.num_workers,
                               split=split, skips=self.skips, trainer=self.trainer)
        trainer = self.trainer
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (None, None)
        sampler = BucketBatchSampler(
            lengths=ds.sizes, max_tokens=self.max_tokens, batch_size=self.batch_size, shuffle=shuffle,
            seed=self.seed, num_replicas=world, rank=rank,
        )  # fmt: skip
        return AudioLoader(
            ds, split=split, skips=self.skips, batch_sampler=sampler, num_workers=self.num_workers,
            collate_fn=DropFailed(self.collate), persistent_workers=self.num_workers > 0,
        )  # fmt: skip
