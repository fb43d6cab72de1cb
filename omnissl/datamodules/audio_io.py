"""Audio files and manifests: the one manifest reader (`read_audio_manifest`), folder scan, and the one
decoder (`load_audio`: soundfile, mono, resampled to 16 kHz, only the requested span read) with its windowed
variant `load_clip`. Used by `AudioDataModule`, `AudioTextDataModule` and the data commands.

Manifests are fairseq style: first line the root folder (absolute, or relative to the manifest's folder), then
`relative_path<TAB>num_samples[<TAB>label]` per utterance. `num_samples` is the length at 16 kHz (for 16 kHz
files: the frame count); fairseq's count at a file's native rate is accepted too. Bad input raises
`AudioDataError`, whose message names the manifest line and the file.
"""

from __future__ import annotations

import functools
import io
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from torch import Tensor

from omnissl.batch import SAMPLE_RATE
from omnissl.datamodules.common import read_lines, shown
from omnissl.progress import progress

log = logging.getLogger(__name__)

EXTENSIONS = (".wav", ".flac", ".ogg", ".opus", ".mp3")


class AudioDataError(RuntimeError):
    """A manifest line or an audio file that cannot be used; the message names both."""


# --------------------------------------------------------------------------------------------------------
# manifests


@dataclass
class AudioManifest:
    """A parsed manifest. sizes: (n,) int64 lengths at 16 kHz; lines: (n,) 1-based manifest line numbers
    (0 for scanned folders); labels: n strings, or None for an unlabeled manifest; skipped: what was left out
    under on_error="skip" while reading it ('<manifest>:<line>: <reason>' or '<file>: <reason>')."""

    source: str
    root: Path
    paths: list[str]
    sizes: np.ndarray
    lines: np.ndarray
    labels: list[str] | None = None
    skipped: list[str] = field(default_factory=list)

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
    skipped: list[str] = []
    lines = read_lines(path, on_error=on_error, skipped=skipped, error=AudioDataError)
    if not lines or lines[0][0] != 1 or not lines[0][1].strip():
        raise AudioDataError(f"{path}:1: the first line must be the root folder of the listed files")
    root = Path(lines[0][1].strip())
    root = root if root.is_absolute() else path.parent / root
    paths, sizes, numbers, labels = [], [], [], []
    for number, line in lines[1:]:
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
    if skipped:
        log.warning("%s: skipped %d line(s) that are not valid UTF-8 (on_error='skip'), e.g. %s", path,
                    len(skipped), "; ".join(skipped[:3]))
    return AudioManifest(
        str(path), root, paths, np.asarray(sizes, np.int64), np.asarray(numbers, np.int64),
        labels if paths and all(labeled) else None, skipped,
    )  # fmt: skip


def _utf8_name(p: Path) -> bool:
    try:
        str(p).encode("utf-8")
    except UnicodeEncodeError:  # os.fsdecode keeps undecodable bytes as lone surrogates
        return False
    return True


def scan_folder(folder: str | os.PathLike, *, on_error: str = "raise") -> AudioManifest:
    """Every audio file under `folder` (recursively, sorted), with its length at 16 kHz from its header.
    Unreadable files raise `AudioDataError`, or are skipped (counted, logged) with on_error="skip"."""
    folder = Path(folder).expanduser().resolve()
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in EXTENSIONS and not p.is_dir())
    paths, sizes, bad = [], [], []
    for p in progress(files, desc=f"scanning {folder.name}", unit="file"):
        try:
            if not _utf8_name(p):  # soundfile cannot even open it, and no UTF-8 manifest could list it
                raise AudioDataError("its name is not valid UTF-8: rename the file")
            info = sf.info(str(p))
            if info.frames <= 0:
                raise AudioDataError("empty audio (0 samples)")
            n = round(info.frames * SAMPLE_RATE / info.samplerate)
        except (AudioDataError, sf.LibsndfileError, RuntimeError, OSError) as e:
            if on_error == "raise":
                raise AudioDataError(f"{shown(p)}: unreadable audio file ({e})") from e
            bad.append(f"{shown(p)} ({e})")
            continue
        paths.append(p.relative_to(folder).as_posix())
        sizes.append(n)
    if bad:
        log.warning("scan of %s: skipped %d unreadable files, e.g. %s", folder, len(bad), "; ".join(bad[:3]))
    return AudioManifest(str(folder), folder, paths, np.asarray(sizes, np.int64), np.zeros(len(paths), np.int64),
                         None, [f"{b}: skipped by the folder scan" for b in bad])


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
    path: str | os.PathLike | io.BytesIO, *, start: int = 0, num: int | None = None, expected: int | None = None
) -> Tensor:
    """Decode samples [start, start + num) of `path` (a file, or an encoded file in memory: `io.BytesIO`, as
    shards hold them), counted at 16 kHz -> float32 (num,) mono at 16 kHz.

    Only the needed span is read. Stereo is averaged, other rates are resampled (torchaudio's windowed
    sinc). `expected` (the manifest's count) is checked against the file's header. Raises `AudioDataError`
    (missing, empty, corrupt, truncated or unreadable file; a length that disagrees with the manifest)."""
    in_memory = isinstance(path, io.BytesIO)
    path = path if in_memory else str(path)
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
    except UnicodeEncodeError:
        raise AudioDataError("its name is not valid UTF-8: rename the file") from None
    except (sf.LibsndfileError, RuntimeError, OSError, ValueError) as e:
        # diagnose only on failure: these stat calls would cost more than decoding a short file
        if in_memory:
            raise AudioDataError(f"undecodable encoded audio ({str(e).rsplit('>: ', 1)[-1]})") from e
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


def crop_units(units: np.ndarray, *, n: int, start: int, num: int, samples_per_unit: int, source: object) -> Tensor:
    """The units of the crop [start, start + num) of an `n`-sample item: those whose frame starts inside it.
    Raises `AudioDataError` naming `source` when the unit count does not match the audio (fairseq's 0.1 s
    tolerance)."""
    spu = samples_per_unit
    tol = max(2, round(0.1 * SAMPLE_RATE / spu))
    if abs(len(units) - n / spu) > tol:
        raise AudioDataError(
            f"{len(units)} units at {SAMPLE_RATE // spu} Hz for {n} samples (expected about {n / spu:.0f}): "
            f"{source} does not match this audio"
        )
    first = start // spu
    return torch.from_numpy(np.ascontiguousarray(units[first : first + math.ceil(num / spu)], dtype=np.int64))


def line_offsets(path: Path) -> np.ndarray:
    """Byte offsets of every line start of `path`, plus the file size: (lines + 1,) int64."""
    data = np.fromfile(path, dtype=np.uint8)
    ends = np.flatnonzero(data == ord("\n")) + 1
    if len(data) and data[-1] != ord("\n"):
        ends = np.append(ends, len(data))
    return np.concatenate([[0], ends]).astype(np.int64)


def load_clip(path: str | os.PathLike, max_samples: int, *, random: bool) -> Tensor:
    """Decode a window of at most `max_samples` of `path` -> mono float32 (T,) at 16 kHz.

    The window is uniformly placed if `random` (from torch's global generator), else centred (as
    `AudioDataModule` does for evaluation); only that span is read (`load_audio`). Raises `AudioDataError`
    naming the file.
    """
    try:
        info = sf.info(str(path))
        total = round(info.frames * SAMPLE_RATE / info.samplerate)
    except Exception as e:  # soundfile raises LibsndfileError / RuntimeError depending on the failure
        raise AudioDataError(f"{path}: unreadable audio file ({e})") from None
    start, num = 0, None
    if 0 < max_samples < total:
        num = max_samples
        start = int(torch.randint(0, total - max_samples + 1, ())) if random else (total - max_samples) // 2
    try:
        return load_audio(path, start=start, num=num)
    except AudioDataError as e:
        raise AudioDataError(f"{path}: {e}") from None
