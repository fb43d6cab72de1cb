"""`AudioDataModule`: raw 16 kHz waveforms (wav2vec 2.0, HuBERT, data2vec pretraining; labeled probes),
emitted as `Batch` through `Collate`.

Inputs
------
* **Manifests**, fairseq style: first line the root folder (absolute, or relative to the manifest's folder),
  then `relative_path<TAB>num_samples[<TAB>label]` per utterance. `num_samples` is the length at 16 kHz
  (for 16 kHz files: the frame count); fairseq's count at a file's native rate is accepted too.
* **Folders**: any `manifest` argument that is a directory is scanned recursively for wav/flac/ogg (and
  opus/mp3 where libsndfile decodes them); `omnissl data manifest FOLDER --out FILE` writes the manifest once.
* **Embedded corpora** (generated on first use under `$OMNISSL_DATA`, default `~/.cache/omnissl`, in
  `prepare_data`; see `omnissl.datamodules.corpora.speech` / `.labeled_speech`):
  `"embedded:small"`, `"embedded:default"`, `"embedded:tiny"` (= `"embedded:speech:<size>"`): espeak-ng speech
  (with `.wrd`/`.ltr` transcripts beside each split's manifest, for the CTC probe);
  `"embedded:keywords:<size>"`, `"embedded:speakers:<size>"`: labeled sets. The split is taken from the
  argument: `train_manifest` -> train.tsv, `valid_manifest` -> valid.tsv, `test_manifest` -> test.tsv.
* **Frame-level units** (HuBERT targets): with `units="km"`, `train.tsv` is paired with `train.km` beside it,
  one line of space-separated ints per manifest line, at `label_rate` Hz (50 Hz = 320 samples per unit).
* **Labels**: a third manifest column; `item["label"]` is the index in the sorted label vocabulary
  (`AudioDataModule.classes`), taken from the first labeled split among train, valid, test.

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
        train_manifest: /data/librispeech/train.tsv    # or a folder, or "embedded:default"
        valid_manifest: /data/librispeech/valid.tsv
        max_tokens: 1400000
        units: km                                      # HuBERT: train.km / valid.km beside the manifests

Bad input (corrupt, empty, zero-length, truncated or unreadable file; a manifest line naming a missing file;
units that do not match the audio): by default an `AudioDataError` naming the manifest line and the file;
with `on_error="skip"` the item is dropped and the count is logged at the end of each epoch.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import lightning as L
import numpy as np
import soundfile as sf
import torch
from torch import Tensor
from torch.utils.data import BatchSampler, DataLoader, Dataset, DistributedSampler

from omnissl.datamodules.collate import Collate

log = logging.getLogger(__name__)

SAMPLE_RATE = 16_000
EXTENSIONS = (".wav", ".flac", ".ogg", ".opus", ".mp3")


class AudioDataError(RuntimeError):
    """A manifest line or an audio file that cannot be used; the message names both."""


# --------------------------------------------------------------------------------------------------------
# manifests


@dataclass
class AudioManifest:
    """A parsed manifest. sizes: (n,) int64 lengths at 16 kHz; lines: (n,) 1-based manifest line numbers
    (0 for scanned folders); labels: n strings, or None for an unlabeled manifest."""

    source: str
    root: Path
    paths: list[str]
    sizes: np.ndarray
    lines: np.ndarray
    labels: list[str] | None = None

    def __len__(self) -> int:
        return len(self.paths)

    def where(self, i: int) -> str:
        """'<manifest>:<line>: <file>' for messages."""
        line = int(self.lines[i])
        return f"{self.source}:{line}: {self.root / self.paths[i]}" if line else str(self.root / self.paths[i])


def read_audio_manifest(path: str | os.PathLike, *, on_error: str = "raise") -> AudioManifest:
    """Parse a TSV manifest, or scan a folder (see `scan_folder`)."""
    path = Path(path).expanduser()
    if path.is_dir():
        return scan_folder(path, on_error=on_error)
    if not path.is_file():
        raise FileNotFoundError(f"manifest {path} does not exist")
    lines = path.read_text(encoding="utf-8").splitlines()
    if not lines or not lines[0].strip():
        raise AudioDataError(f"{path}:1: the first line must be the root folder of the listed files")
    root = Path(lines[0].strip())
    root = root if root.is_absolute() else path.parent / root
    paths, sizes, numbers, labels = [], [], [], []
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        cells = line.rstrip("\r\n").split("\t")
        if len(cells) not in (2, 3):
            raise AudioDataError(f"{path}:{number}: expected 'path<TAB>num_samples[<TAB>label]', got {line!r}")
        try:
            size = int(cells[1])
        except ValueError:
            raise AudioDataError(f"{path}:{number}: num_samples {cells[1]!r} is not an integer") from None
        if size < 0:
            raise AudioDataError(f"{path}:{number}: negative num_samples {size}")
        paths.append(cells[0])
        sizes.append(size)
        numbers.append(number)
        labels.append(cells[2] if len(cells) == 3 else None)
    labeled = [lab is not None for lab in labels]
    if any(labeled) and not all(labeled):
        first = numbers[labeled.index(False)] if all(labeled[:1]) else numbers[labeled.index(True)]
        raise AudioDataError(f"{path}:{first}: some lines have a label column and some do not")
    return AudioManifest(
        str(path), root, paths, np.asarray(sizes, np.int64), np.asarray(numbers, np.int64),
        labels if paths and all(labeled) else None,
    )  # fmt: skip


def scan_folder(folder: str | os.PathLike, *, on_error: str = "raise") -> AudioManifest:
    """Every audio file under `folder` (recursively, sorted), with its length at 16 kHz from its header.
    Unreadable files raise `AudioDataError`, or are skipped (counted, logged) with on_error="skip"."""
    folder = Path(folder).expanduser().resolve()
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in EXTENSIONS and not p.is_dir())
    paths, sizes, bad = [], [], []
    for p in files:
        try:
            info = sf.info(str(p))
            if info.frames <= 0:
                raise AudioDataError("empty audio (0 samples)")
            n = round(info.frames * SAMPLE_RATE / info.samplerate)
        except (AudioDataError, sf.LibsndfileError, RuntimeError, OSError) as e:
            if on_error == "raise":
                raise AudioDataError(f"{p}: unreadable audio file ({e})") from e
            bad.append(f"{p} ({e})")
            continue
        paths.append(p.relative_to(folder).as_posix())
        sizes.append(n)
    if bad:
        log.warning("scan of %s: skipped %d unreadable files, e.g. %s", folder, len(bad), "; ".join(bad[:3]))
    return AudioManifest(str(folder), folder, paths, np.asarray(sizes, np.int64), np.zeros(len(paths), np.int64))


def write_audio_manifest(folder: str | os.PathLike, out: str | os.PathLike, *, on_error: str = "raise") -> int:
    """Scan `folder` and write its manifest to `out` (root = the folder). Returns the number of items."""
    m = scan_folder(folder, on_error=on_error)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        f.write(f"{m.root}\n")
        for rel, n in zip(m.paths, m.sizes.tolist()):
            if "\t" in rel or "\n" in rel:
                raise AudioDataError(f"{m.root / rel}: a file name with a tab or newline cannot be listed")
            f.write(f"{rel}\t{n}\n")
    return len(m)


# --------------------------------------------------------------------------------------------------------
# decoding


@functools.lru_cache(maxsize=16)
def _resampler(sr: int) -> torch.nn.Module:
    """torchaudio's windowed-sinc resampler sr -> 16 kHz, with its kernel computed once per rate (per process)."""
    import torchaudio

    return torchaudio.transforms.Resample(sr, SAMPLE_RATE)


def _truncated_wav(f: sf.SoundFile) -> str | None:
    """libsndfile silently shortens a WAV whose data chunk runs past the end of the file; its log says so."""
    if f.format not in ("WAV", "WAVEX", "RF64"):
        return None
    for line in f.extra_info.splitlines():
        if line.startswith("data") and "should be" in line:
            return line.strip()
    return None


def load_audio(
    path: str | os.PathLike, *, start: int = 0, num: int | None = None, expected: int | None = None
) -> Tensor:
    """Decode samples [start, start + num) of `path`, counted at 16 kHz -> float32 (num,) mono at 16 kHz.

    Only the needed span is read. Stereo is averaged, other rates are resampled (torchaudio's windowed
    sinc). `expected` (the manifest's count) is checked against the file's header. Raises `AudioDataError`
    (missing, empty, corrupt, truncated or unreadable file; a length that disagrees with the manifest)."""
    path = str(path)
    try:
        with sf.SoundFile(path) as f:
            sr, frames = f.samplerate, f.frames
            if frames <= 0:
                raise AudioDataError("empty audio (0 samples)")
            if (why := _truncated_wav(f)) is not None:
                raise AudioDataError(f"truncated WAV file ({why})")
            n16 = round(frames * SAMPLE_RATE / sr)
            if expected is not None and abs(expected - n16) > 1 and abs(expected - frames) > 1:
                raise AudioDataError(
                    f"has {n16} samples at 16 kHz ({frames} at {sr} Hz) but the manifest says {expected}: "
                    "truncated or replaced since the manifest was written?"
                )
            if expected is not None and sr != SAMPLE_RATE and abs(expected - n16) > 1:
                # the manifest counts native-rate frames (fairseq's convention): map the crop to 16 kHz
                if num is None or num >= expected:  # the whole file
                    start, num = 0, None
                else:
                    num = min(num, n16)
                    start = min(round(start * n16 / expected), n16 - num)
            num = n16 - start if num is None else num
            if start < 0 or num <= 0 or start + num > n16:
                raise AudioDataError(f"crop [{start}, {start + num}) outside its {n16} samples")
            if sr == SAMPLE_RATE:
                first, count = start, num
            else:
                first = math.floor(start * sr / SAMPLE_RATE)
                count = min(frames - first, math.ceil(num * sr / SAMPLE_RATE) + 1)
            if first:
                f.seek(first)
            data = f.read(count, dtype="float32", always_2d=True)
            floats = f.subtype in ("FLOAT", "DOUBLE")
    except AudioDataError:
        raise
    except (sf.LibsndfileError, RuntimeError, OSError, ValueError) as e:
        # diagnose only on failure: these stat calls would cost more than decoding a short file
        if not os.path.exists(path):
            raise AudioDataError("file not found" + (" (dangling symlink)" if os.path.islink(path) else "")) from None
        if os.path.isdir(path):
            raise AudioDataError("is a directory, not an audio file") from None
        raise AudioDataError(f"unreadable audio file ({e})") from e
    if len(data) < count:
        raise AudioDataError(f"truncated file: read {len(data)} of {count} samples at offset {first}")
    if floats and not np.isfinite(data).all():  # integer and compressed formats are finite by construction
        raise AudioDataError("audio contains NaN or infinite values")
    x = torch.from_numpy(data.mean(axis=1) if data.shape[1] > 1 else data[:, 0])
    if sr != SAMPLE_RATE:
        x = _resampler(sr)(x)
        x = x[:num] if len(x) >= num else torch.nn.functional.pad(x, (0, num - len(x)))
    return x.contiguous()


def _line_offsets(path: Path) -> np.ndarray:
    """Byte offsets of every line start of `path`, plus the file size: (lines + 1,) int64."""
    data = np.fromfile(path, dtype=np.uint8)
    ends = np.flatnonzero(data == ord("\n")) + 1
    if len(data) and data[-1] != ord("\n"):
        ends = np.append(ends, len(data))
    return np.concatenate([[0], ends]).astype(np.int64)


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
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
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
            self._offsets = _line_offsets(self.units_path)
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
            return {"id": i, "error": msg}

    def _crop_start(self, i: int, n: int, num: int, epoch: int) -> int:
        step = self.samples_per_unit if self.units_path is not None else 1
        slots = (n - num) // step  # crop starts on multiples of `step`
        if self.crop == "center":
            k = slots // 2
        else:
            k = int(np.random.default_rng((self.seed, epoch, i)).integers(0, slots + 1))
        return k * step

    def _load(self, i: int, epoch: int) -> dict:
        # NOTE(ref): fairseq's RawAudioDataset (wav2vec 2.0 base, pad=False) crops every item of a batch to the
        # batch's shortest; we crop each item to max_samples alone and pad (Batch.lengths carries the valid
        # lengths), since length bucketing keeps padding small and no audio is thrown away.
        row = int(self.rows[i])
        n = int(self.manifest.sizes[row])
        num = n if self.max_samples is None else min(n, self.max_samples)
        start = self._crop_start(i, n, num, epoch) if num < n else 0
        item: dict = {"id": i}
        if self.units_path is not None:
            units = self._units(row)
            spu = self.samples_per_unit
            tol = max(2, round(0.1 * SAMPLE_RATE / spu))  # fairseq's 0.1 s label-length tolerance
            if abs(len(units) - n / spu) > tol:
                raise AudioDataError(
                    f"{len(units)} units at {SAMPLE_RATE // spu} Hz for {n} samples (expected about {n / spu:.0f}): "
                    f"{self.units_path} does not match this audio"
                )
            first = start // spu
            item["units"] = torch.from_numpy(units[first : first + math.ceil(num / spu)])
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


# --------------------------------------------------------------------------------------------------------
# batching


class BucketBatchSampler(BatchSampler):
    """Length-bucketed batches of (index, epoch) pairs.

    Items are sorted by length (ties broken by a per-epoch permutation, so equal-length items mix), then cut
    greedily into batches with `len(batch) * max(lengths in batch) <= max_tokens` (fairseq's token budget;
    padding counts) and `len(batch) <= batch_size`; with `max_tokens=None`, plain `batch_size` batches of a
    shuffled order. The batch order is shuffled per epoch from (seed, epoch). Under DDP the global batch list
    is padded (by repeating its head) to a multiple of the world size and rank r takes batches r, r + W, ...,
    so every rank runs the same number of steps.

    `sampler` exists for Lightning, which sets the epoch through `batch_sampler.sampler.set_epoch` (never on
    the batch sampler itself) and, under DDP, injects a `DistributedSampler` there: its `num_replicas`,
    `rank` and `epoch` are used, not its order (bucketing needs the global list).
    """

    def __init__(
        self, sampler: object = None, *, lengths: Sequence[int] | np.ndarray, max_tokens: int | None = None,
        batch_size: int | None = None, shuffle: bool = True, seed: int = 0, drop_last: bool = False,
        num_replicas: int | None = None, rank: int | None = None,
    ) -> None:  # fmt: skip
        self.sampler = sampler if sampler is not None else _EpochHolder()
        self.lengths = np.asarray(lengths, dtype=np.int64)
        if max_tokens is None and batch_size is None:
            raise ValueError("set max_tokens, batch_size or both")
        if batch_size is not None and batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if max_tokens is not None and len(self.lengths) and self.lengths.max() > max_tokens:
            raise ValueError(
                f"an item of {int(self.lengths.max())} samples exceeds max_tokens={max_tokens}: "
                "raise max_tokens or lower max_samples"
            )
        self.max_tokens, self.batch_size, self.shuffle, self.seed = max_tokens, batch_size, shuffle, seed
        self.drop_last = drop_last  # kept for Lightning's interface; batches are never dropped
        if isinstance(sampler, DistributedSampler):
            num_replicas, rank = sampler.num_replicas, sampler.rank
        if num_replicas is None or rank is None:
            dist = torch.distributed.is_available() and torch.distributed.is_initialized()
            num_replicas = torch.distributed.get_world_size() if dist else 1
            rank = torch.distributed.get_rank() if dist else 0
        self.num_replicas, self.rank = int(num_replicas), int(rank)
        self._cache: tuple[int, list[list[int]]] | None = None

    @property
    def epoch(self) -> int:
        return int(getattr(self.sampler, "epoch", 0))

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)  # type: ignore[union-attr]

    def _global_batches(self) -> list[list[int]]:
        if self._cache is not None and self._cache[0] == self.epoch:
            return self._cache[1]
        n = len(self.lengths)
        rng = np.random.default_rng((self.seed, self.epoch))
        order = rng.permutation(n) if self.shuffle else np.arange(n)
        batches: list[list[int]] = []
        if self.max_tokens is None:
            bs = int(self.batch_size)  # type: ignore[arg-type]
            batches = [order[k : k + bs].tolist() for k in range(0, n, bs)]
        else:
            order = order[np.argsort(self.lengths[order], kind="stable")]
            cur: list[int] = []
            longest = 0
            for i, size in zip(order.tolist(), self.lengths[order].tolist()):
                longest_new = max(longest, size)
                if cur and ((len(cur) + 1) * longest_new > self.max_tokens or len(cur) == (self.batch_size or n + 1)):
                    batches.append(cur)
                    cur, longest_new = [], size
                cur.append(i)
                longest = longest_new
            if cur:
                batches.append(cur)
            if self.shuffle:
                batches = [batches[k] for k in rng.permutation(len(batches))]
        if batches and len(batches) % self.num_replicas:
            batches += batches[: self.num_replicas - len(batches) % self.num_replicas]
        self._cache = (self.epoch, batches)
        return batches

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch = self.epoch
        for batch in self._global_batches()[self.rank :: self.num_replicas]:
            yield [(i, epoch) for i in batch]

    def __len__(self) -> int:
        return len(self._global_batches()) // self.num_replicas


class _EpochHolder:
    """The `sampler` of a `BucketBatchSampler` outside DDP: where Lightning's `set_epoch` lands."""

    def __init__(self) -> None:
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)


@dataclass
class DropFailed:
    """collate_fn: drops items that failed to load (on_error="skip") -> (Batch | None, [error messages])."""

    collate: Collate

    def __call__(self, items: Sequence[dict]):
        good = [it for it in items if "error" not in it]
        return (self.collate(good) if good else None), [it["error"] for it in items if "error" in it]


class AudioLoader(DataLoader):
    """DataLoader over `DropFailed` batches: yields the `Batch`es and, at the end of each pass, logs how many
    items were skipped (`skipped` keeps the running total). A batch whose items all failed is left out (under
    DDP that rank then runs one step fewer; with many bad files, clean the manifest with `omnissl data inspect
    --on-error skip` instead)."""

    def __init__(self, dataset: Dataset, *, split: str = "train", **kwargs) -> None:
        super().__init__(dataset, **kwargs)
        self.split = split
        self.skipped = 0

    def __iter__(self):  # type: ignore[override]
        skipped: list[str] = []
        try:
            for batch, errors in super().__iter__():
                skipped += errors
                if batch is not None:
                    yield batch
        finally:
            if skipped:
                self.skipped += len(skipped)
                log.warning(
                    "%s data: skipped %d unreadable items this epoch (on_error='skip'); first: %s",
                    self.split, len(skipped), " | ".join(skipped[:3]),
                )  # fmt: skip


# --------------------------------------------------------------------------------------------------------
# DataModule

EMBEDDED = "embedded:"


def resolve_embedded(spec: str, split: str) -> tuple[str, str, str]:
    """'embedded:small' | 'embedded:speech:default' | 'embedded:keywords:small' ... -> (name, size, split file)
    where name is "speech", "keywords" or "speakers". The size defaults to "default"."""
    parts = spec[len(EMBEDDED) :].split(":")
    if len(parts) == 1 and parts[0] in ("tiny", "small", "default"):
        parts = ["speech", parts[0]]
    name, size = parts[0], parts[1] if len(parts) > 1 else "default"
    if len(parts) > 2 or name not in ("speech", "keywords", "speakers") or size not in ("tiny", "small", "default"):
        raise ValueError(
            f"unknown embedded audio corpus {spec!r}; expected embedded:<size> or embedded:<name>:<size> with "
            "name in speech, keywords, speakers and size in tiny, small, default"
        )
    return name, size, f"{split}.tsv"


def embedded_manifest(spec: str, split: str, *, generate: bool = True) -> Path:
    """Path of the embedded corpus's manifest for `split`, generating the corpus first if asked."""
    from omnissl.datamodules.common import data_root

    name, size, file = resolve_embedded(spec, split)
    base = "speech" if name == "speech" else f"labeled_speech-{name}"
    folder = data_root() / "corpora" / f"{base}-{size}-seed0"
    if generate:
        if name == "speech":
            from omnissl.datamodules.corpora.speech import generate as gen_speech

            gen_speech(folder, size=size, seed=0)
        else:
            from omnissl.datamodules.corpora.labeled_speech import generate as gen_labeled

            gen_labeled(folder, size=size, seed=0, task=name)
    return folder / file


class AudioDataModule(L.LightningDataModule):
    """Raw-waveform DataModule for speech/audio pretraining and probes; see the module docstring.

    Defaults follow fairseq's wav2vec 2.0 base LibriSpeech recipe (`wav2vec2_base_librispeech.yaml`):
    crop 250 k samples, drop utterances under 32 k samples, 1.4 M samples per batch per device.

    train_manifest / valid_manifest / test_manifest: a .tsv manifest, a folder, or "embedded:..." (None: no
        such split).
    max_samples: crop length (None: no crop). min_samples: shorter utterances are dropped (counted, logged).
    max_tokens: padded samples per batch (None: fixed `batch_size` batches). batch_size: items per batch
        (a cap when max_tokens is also set).
    units: extension of the HuBERT unit files beside each manifest ("km": train.tsv -> train.km), or None.
    label_rate: units per second (50 Hz: one per 320 samples).
    normalize: zero-mean unit-variance waveform per utterance (wav2vec 2.0 large, data2vec).
    on_error: "raise" (default) or "skip" bad items. seed: shuffling and crop seed.
    """

    def __init__(
        self, *, train_manifest: str | None = "embedded:default", valid_manifest: str | None = None,
        test_manifest: str | None = None, max_samples: int | None = 250_000, min_samples: int = 32_000,
        max_tokens: int | None = 1_400_000, batch_size: int | None = None, num_workers: int = 4,
        on_error: Literal["raise", "skip"] = "raise", units: str | None = None, label_rate: float = 50.0,
        normalize: bool = False, seed: int = 0,
    ) -> None:  # fmt: skip
        super().__init__()
        self.save_hyperparameters()
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        if max_tokens is None and batch_size is None:
            raise ValueError("set max_tokens, batch_size or both")
        if max_tokens is not None and max_samples is not None and max_tokens < max_samples:
            raise ValueError(f"max_tokens={max_tokens} is smaller than one max_samples={max_samples} crop")
        for name, spec in (("train", train_manifest), ("valid", valid_manifest), ("test", test_manifest)):
            if isinstance(spec, str) and spec.startswith(EMBEDDED):
                resolve_embedded(spec, name)  # fail on a typo at construction, not after a long generation
        self.manifests = {"train": train_manifest, "valid": valid_manifest, "test": test_manifest}
        self.max_samples, self.min_samples = max_samples, min_samples
        self.max_tokens, self.batch_size, self.num_workers = max_tokens, batch_size, num_workers
        self.on_error, self.units, self.label_rate = on_error, units, label_rate
        self.normalize, self.seed = normalize, seed
        self.datasets: dict[str, AudioDataset] = {}
        self.classes: list[str] | None = None
        self.collate = Collate()

    # -- preparation -------------------------------------------------------------------------------------

    def prepare_data(self) -> None:
        """Generate the embedded corpora that the manifests name (once, on local rank 0)."""
        for split, spec in self.manifests.items():
            if isinstance(spec, str) and spec.startswith(EMBEDDED):
                embedded_manifest(spec, split, generate=True)

    def _manifest_path(self, split: str) -> Path:
        spec = self.manifests[split]
        assert spec is not None
        if isinstance(spec, str) and spec.startswith(EMBEDDED):
            path = embedded_manifest(spec, split, generate=False)
            if not path.exists():  # setup() without prepare_data(), e.g. in a notebook
                path = embedded_manifest(spec, split, generate=True)
            return path
        return Path(spec).expanduser()

    def setup(self, stage: str | None = None) -> None:
        wanted = {"fit": ("train", "valid"), "validate": ("valid",), "test": ("test",), "predict": ("test",)}
        splits = wanted.get(stage or "", ("train", "valid", "test"))
        manifests = {s: read_audio_manifest(self._manifest_path(s), on_error=self.on_error)
                     for s in splits if self.manifests[s] is not None and s not in self.datasets}  # fmt: skip
        if self.classes is None:
            for s in ("train", "valid", "test"):
                if s in manifests and manifests[s].labels is not None:
                    self.classes = sorted(set(manifests[s].labels))
                    break
        for s, m in manifests.items():
            units = None
            if self.units is not None:
                if Path(m.source).is_dir():
                    raise ValueError(f"units={self.units!r} needs a .tsv manifest for {s}, not a folder")
                units = Path(m.source).with_suffix("." + self.units.lstrip("."))
            ds = AudioDataset(
                m, max_samples=self.max_samples, min_samples=self.min_samples,
                crop="random" if s == "train" else "center", units=units, label_rate=self.label_rate,
                classes=self.classes, normalize=self.normalize, seed=self.seed, on_error=self.on_error,
            )  # fmt: skip
            if len(ds) == 0:
                longest = int(m.sizes.max()) if len(m) else 0
                raise ValueError(
                    f"{s} data is empty: {m.source} lists {len(m)} utterances and all are shorter than "
                    f"min_samples={self.min_samples} (the longest has {longest} samples at 16 kHz). Lower "
                    "min_samples or point the manifest at more data."
                )
            if ds.num_filtered:
                from lightning.pytorch.utilities import rank_zero_info

                rank_zero_info(
                    f"{s} data: dropped {ds.num_filtered} of {len(m)} utterances shorter than "
                    f"min_samples={self.min_samples} ({m.source})"
                )
            self.datasets[s] = ds
        if stage == "fit" and self.manifests["train"] is None:
            raise ValueError("AudioDataModule: fitting needs a train_manifest")

    # -- loaders -----------------------------------------------------------------------------------------

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        ds = self.datasets[split]
        trainer = getattr(self, "trainer", None)
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (None, None)
        sampler = BucketBatchSampler(
            lengths=ds.sizes, max_tokens=self.max_tokens, batch_size=self.batch_size, shuffle=shuffle,
            seed=self.seed, num_replicas=world, rank=rank,
        )  # fmt: skip
        return AudioLoader(
            ds, split=split, batch_sampler=sampler, num_workers=self.num_workers,
            collate_fn=DropFailed(self.collate), persistent_workers=self.num_workers > 0,
        )  # fmt: skip

    def train_dataloader(self) -> DataLoader:
        if "train" not in self.datasets:
            self.setup("fit")
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        if self.manifests["valid"] is None:
            return []
        if "valid" not in self.datasets:
            self.setup("validate")
        return self._loader("valid", shuffle=False)

    def test_dataloader(self) -> DataLoader | list:
        if self.manifests["test"] is None:
            return []
        if "test" not in self.datasets:
            self.setup("test")
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader | list:
        return self.test_dataloader()

    @property
    def num_classes(self) -> int | None:
        return None if self.classes is None else len(self.classes)
