"""Shared plumbing of the file-backed DataModules and of the embedded corpora.

Conventions used by every DataModule here:

* **Cache root.** Generated corpora and caches (trained tokenizers, pre-tokenized memmaps) live under
  `$OMNISSL_DATA` (default `~/.cache/omnissl`): `corpora/<name>-<size>-seed<seed>/` and `cache/...`.
* **Embedded corpora.** A data argument spelled `"embedded:<name>[:<size>]"` names a corpus of the one
  registry `omnissl.datamodules.corpora.CORPORA` (speech, keywords, speakers, captions, text, images,
  labeled_text, labeled_images; `"embedded:<size>"` is speech), written on first use (in `prepare_data`)
  from what the Python standard library and installed wheels ship; nothing is downloaded. DataModules always
  use the corpus of seed 0 (their own `seed` orders and augments the data, it does not change the data set),
  so runs with different seeds see the same splits; `omnissl data generate ... --seed N` writes others.
* **Labels.** `class_index` (the train split's labels, numeric-aware order) and `encode_labels` are the one
  label policy of every labeled DataModule; `classes` is None when a DataModule has no labels.
* **Manifests.** Tab-separated, fairseq style: the first line is a root folder (absolute, or relative to the
  manifest's own folder), every further line is `relpath<TAB>size[<TAB>third column]`, where size is the
  item's length in its natural unit (audio samples, text UTF-8 bytes, image pixels) and the third column is
  a caption (captioned audio) or a `label` (a labeled manifest is the unlabeled one plus this column).
* **Shuffling.** Loaders always use a `DistributedSampler` (world size 1 outside distributed runs) seeded by
  the DataModule's `seed`; Lightning calls its `set_epoch`, so the order is a function of (seed, epoch) and a
  resumed run sees the same order. Lightning leaves a `DistributedSampler` alone, so this also holds under DDP.
  Loaders are `ResumableLoader`s (omnissl/datamodules/sampler.py): their position is in every checkpoint and a
  run resumed mid-epoch continues with the next batch.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

EMBEDDED_PREFIX = "embedded:"
SPLITS = ("train", "valid", "test")
SIZES = ("tiny", "small", "default")
MARKER = ".complete.json"


def data_root() -> Path:
    """The cache root: `$OMNISSL_DATA`, default `~/.cache/omnissl`."""
    return Path(os.environ.get("OMNISSL_DATA") or "~/.cache/omnissl").expanduser()


def is_embedded(spec: str | os.PathLike | None) -> bool:
    return isinstance(spec, str) and spec.startswith(EMBEDDED_PREFIX)


def check_size(size: str) -> None:
    if size not in SIZES:
        raise ValueError(f"unknown corpus size {size!r}; expected one of {SIZES}")


# ----------------------------------------------------------------------------------------------- generation


def cached_generation(out: Path, config: dict[str, Any],
                      build: Callable[[Path, Path], dict[str, str]]) -> dict[str, Path]:
    """Run `build(tmp_dir, out) -> {split: manifest file name}` once per `config`; return {split: manifest path}.

    Idempotent: a marker file (`.complete.json`, holding `config`) is written last; a folder with a matching
    marker is returned as is, one with a different or missing marker is rebuilt. The corpus is built in a
    sibling temporary folder and renamed into place (`atomic_dir`, `publish`), so concurrent generators
    (several nodes on one file system) never see a half-written corpus. `build` must write manifests whose
    root line is `out`.
    """
    out = Path(out).absolute()
    found = _read_marker(out, config)
    if found is not None:
        return found
    if out.is_dir() and not (out / MARKER).exists() and any(out.iterdir()):
        raise FileExistsError(
            f"{out} exists, is not empty and holds no omnissl corpus ({MARKER} missing): refusing to replace it; "
            "choose a new or empty --out folder"
        )
    tmp = atomic_dir(out)
    try:
        manifests = build(tmp, out)
        (tmp / MARKER).write_text(json.dumps({"config": config, "manifests": manifests}, indent=1, sort_keys=True))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    publish(tmp, out, done=lambda p: _read_marker(p, config) is not None)
    found = _read_marker(out, config)
    assert found is not None
    return found


def _read_marker(out: Path, config: dict[str, Any]) -> dict[str, Path] | None:
    try:
        marker = json.loads((out / MARKER).read_text())
    except (OSError, ValueError):
        return None
    if marker.get("config") != json.loads(json.dumps(config)):
        return None
    return {split: out / name for split, name in marker["manifests"].items()}


def write_manifest(path: Path, root: Path, rows: Iterable[Sequence[object]]) -> int:
    """Write a manifest: `root` on the first line, then one tab-joined row per item. Returns the row count."""
    n = 0
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write(f"{root}\n")
        for row in rows:
            cells = [str(c) for c in row]
            if any(("\t" in c or "\n" in c or "\r" in c) for c in cells):
                raise ValueError(f"manifest cell contains a tab or newline: {cells!r}")
            f.write("\t".join(cells) + "\n")
            n += 1
    return n


def stable_hash(*parts: object) -> int:
    """A 63-bit hash of `parts` that, unlike `hash()`, is the same in every process."""
    digest = hashlib.sha1(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


# ------------------------------------------------------------------------------------------- atomic writes


def atomic_dir(final: Path) -> Path:
    """A fresh empty sibling folder of `final` to build into; `publish` renames it into place."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def publish(tmp: Path, final: Path, *, done: Callable[[Path], bool] = Path.exists) -> None:
    """Rename the folder `tmp` to `final` atomically. When `done(final)` (a concurrent writer finished the
    same content first) `tmp` is discarded; a stale `final` (exists, not done) is replaced."""
    try:
        if final.exists():
            if done(final):
                shutil.rmtree(tmp, ignore_errors=True)
                return
            shutil.rmtree(final)
        os.replace(tmp, final)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not done(final):
            raise


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """`with atomic_file(path) as tmp:` write `tmp` (same suffix, same folder); it replaces `path` on success."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------------- reading


def shown(path: object) -> str:
    """`path` for a message: bytes of a file name that are not UTF-8 (kept by os.fsdecode as lone surrogates,
    which no UTF-8 stream can print) appear as \\xNN escapes."""
    return os.fsencode(str(path)).decode("utf-8", "backslashreplace")


def read_lines(path: str | os.PathLike, *, on_error: str = "raise", skipped: list[str] | None = None,
               error: type[Exception] = ValueError) -> list[tuple[int, str]]:
    """(1-based line number, text) of every line of a UTF-8 text file (a BOM and CRLF line ends accepted; lines
    are split at \\n only). A line that is not valid UTF-8 raises `error` naming '<file>:<line>', or with
    on_error="skip" is left out and recorded in `skipped`."""
    check_on_error(on_error)
    data = Path(path).read_bytes()
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    out = []
    for number, raw in enumerate(data.split(b"\n"), start=1):
        try:
            out.append((number, raw.decode("utf-8").rstrip("\r")))
        except UnicodeDecodeError as e:
            why = f"{shown(path)}:{number}: not valid UTF-8 ({e.reason} at byte {e.start} of the line)"
            if on_error == "raise":
                raise error(f"{why}; re-encode the file as UTF-8, or pass on_error='skip' to leave such lines "
                            "out") from None
            if skipped is not None:
                skipped.append(why)
    if out and out[-1][1] == "" and data.endswith(b"\n"):
        out.pop()  # the empty piece after a final newline is no line
    return out


def read_manifest(path: str | os.PathLike, *, require_root: bool = True, on_error: str = "raise",
                  skips: SkipLog | None = None) -> tuple[Path, list[list[str]]]:
    """Read a manifest -> (root folder, rows of tab-separated cells).

    With `require_root=False` (plain file lists) the first line is taken as the root only when it names an
    existing folder; otherwise every line is an item and paths are relative to the list's own folder.
    Blank lines are ignored. A line that is not valid UTF-8 raises ValueError naming the file and line, or with
    on_error="skip" is left out and counted in `skips` (as '<file>:<line>').
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest {path} does not exist")
    bad: list[str] = []
    lines = [ln for _, ln in read_lines(path, on_error=on_error, skipped=bad) if ln.strip()]
    log = skips if skips is not None else SkipLog("manifest line")
    for why in bad:
        where, _, reason = why.rpartition(": not valid")
        log.add(where, "not valid" + reason)
    root = path.parent
    if lines:
        first = Path(lines[0]) if Path(lines[0]).is_absolute() else path.parent / lines[0]
        if require_root or ("\t" not in lines[0] and first.is_dir()):
            root, lines = first, lines[1:]
    if require_root and not root.is_dir():
        raise ValueError(f"{path}: the first line must be the root folder of the listed files; "
                         f"{str(root)!r} is not a folder")
    return root, [ln.split("\t") for ln in lines]


def file_fingerprint(files: Sequence[Path]) -> str:
    """sha1 over (path, size, mtime) of `files`: cheap, and changes when any file changes."""
    h = hashlib.sha1()
    for f in files:
        st = os.stat(f)
        h.update(f"{os.fspath(f)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def file_sha1(path: Path) -> str:
    return hashlib.sha1(Path(path).read_bytes()).hexdigest()


def crop_start(n: int, num: int, *, step: int, crop: str, seed: int, epoch: int, i: int) -> int:
    """Start of a `num`-sample crop of an `n`-sample item, on a multiple of `step` (the unit hop, or 1): centred
    for crop="center", else uniform from (seed, epoch, i), so it depends on neither the worker nor the order."""
    import numpy as np

    slots = (n - num) // step
    if crop == "center":
        k = slots // 2
    else:
        k = int(np.random.default_rng((seed, epoch, i)).integers(0, slots + 1))
    return k * step


def holdout(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded split of range(n) into (keep, held-out) index lists, each in ascending order."""
    import numpy as np

    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"valid_fraction must be in [0, 1), got {fraction}")
    k = int(round(n * fraction))
    perm = np.random.default_rng(seed).permutation(n)
    held = sorted(perm[:k].tolist())
    held_set = set(held)
    return [i for i in range(n) if i not in held_set], held


# ------------------------------------------------------------------------------------------------- loading


class SkipLog:
    """Counts items skipped under `on_error="skip"` and warns about the first few, naming each file."""

    def __init__(self, what: str, max_warnings: int = 5) -> None:
        self.what, self.max_warnings = what, max_warnings
        self.skipped: dict[str, str] = {}

    def add(self, path: object, reason: str, *, warn: bool = True) -> None:
        self.skipped[str(path)] = reason
        if warn and len(self.skipped) <= self.max_warnings:
            warnings.warn(f"skipping {self.what} {path}: {reason} (on_error='skip'; "
                          f"{len(self.skipped)} skipped so far)", stacklevel=3)

    def __len__(self) -> int:
        return len(self.skipped)


def check_on_error(on_error: str) -> None:
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")


def check_data_args(on_error: str, train: object, embedded_size: str) -> None:
    """The constructor checks every file-backed DataModule shares (fail before any long preparation)."""
    check_on_error(on_error)
    if is_embedded(train):
        check_size(embedded_size)


def load_or_next(i: int, n: int, load: Callable[[int], dict], *, errors: tuple[type[BaseException], ...],
                 on_error: str, skips: SkipLog, name: Callable[[int], object], source: object) -> dict:
    """`load(i)`, or under on_error="skip" the first of items i+1, i+2, ... (cyclically) that loads; each
    failure (an exception of `errors`) is counted in `skips` under `name(j)`. Every item failing raises
    ValueError naming `source`, so an epoch of bad files stops instead of looping."""
    for attempt in range(n):
        j = (i + attempt) % n
        try:
            return load(j)
        except errors as e:
            if on_error == "raise":
                raise
            skips.add(name(j), str(e))
    raise ValueError(f"{source}: no loadable {skips.what} among its {n} items (on_error='skip' skipped them all)")


# ---------------------------------------------------------------------------------------------------- labels


def class_index(labels: Iterable[str], source: object) -> list[str]:
    """The one label policy: the sorted label set of the train split, numerically when every label is an
    integer ("1" < "2" < "10"), else as strings. Raises naming `source` when there is no label."""
    found = set(labels)
    numeric = all(lab.lstrip("-").isdigit() for lab in found)
    classes = sorted(found, key=(lambda x: (int(x), x)) if numeric else None)
    if not classes:
        raise ValueError(f"{source}: the training split has no labeled items")
    return classes


def encode_labels(labels: Sequence[str | None], classes: Sequence[str], source: object) -> list[int]:
    """Label strings -> class indices; a label unseen in training (or a missing one) raises naming `source`."""
    index = {c: i for i, c in enumerate(classes)}
    out = []
    for n, lab in enumerate(labels):
        if lab is None:
            raise ValueError(f"{source}: item {n} has no label (expected a third column `label` or class "
                             f"subfolders)")
        if lab not in index:
            raise ValueError(f"{source}: label {lab!r} does not occur in the training split "
                             f"(training classes: {list(classes[:20])}{' ...' if len(classes) > 20 else ''})")
        out.append(index[lab])
    return out
