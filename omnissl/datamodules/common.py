"""Shared plumbing of the file-backed DataModules and of the embedded corpora.

Conventions used by every DataModule here:

* **Cache root.** Generated corpora and caches (trained tokenizers, pre-tokenized memmaps) live under
  `$OMNISSL_DATA` (default `~/.cache/omnissl`): `corpora/<name>-<size>-seed<seed>/` and `cache/...`.
* **Embedded corpora.** A data argument spelled `"embedded:<name>"` (`embedded:text`, `embedded:images`,
  `embedded:captions`, `embedded:labeled_text`, `embedded:labeled_images`) names a default corpus that
  `omnissl.datamodules.corpora.<name>.generate()` writes on first use (in `prepare_data`), from what the
  Python standard library and installed wheels ship; nothing is downloaded. DataModules always use the
  corpus of seed 0 (their own `seed` orders and augments the data, it does not change the data set), so runs
  with different seeds see the same train/valid split; `omnissl data generate ... --seed N` writes others.
* **Manifests.** Tab-separated, fairseq style: the first line is a root folder (absolute, or relative to the
  manifest's own folder), every further line is `relpath<TAB>size[<TAB>third column]`, where size is the
  item's length in its natural unit (audio samples, text UTF-8 bytes, image pixels) and the third column is
  a caption (captioned audio) or a `label` (a labeled manifest is the unlabeled one plus this column).
* **Shuffling.** Loaders always use a `DistributedSampler` (world size 1 outside distributed runs) seeded by
  the DataModule's `seed`; Lightning calls its `set_epoch`, so the order is a function of (seed, epoch) and a
  resumed run sees the same order. Lightning leaves a `DistributedSampler` alone, so this also holds under DDP.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported lazily: corpus generators run in light worker processes
    from torch.utils.data import DataLoader, Dataset

EMBEDDED_PREFIX = "embedded:"
EMBEDDED_NAMES = ("text", "images", "captions", "labeled_text", "labeled_images")
SIZES = ("tiny", "small", "default")
MARKER = ".complete.json"


def data_root() -> Path:
    """The cache root: `$OMNISSL_DATA`, default `~/.cache/omnissl`."""
    return Path(os.environ.get("OMNISSL_DATA") or "~/.cache/omnissl").expanduser()


def is_embedded(spec: str | os.PathLike | None) -> bool:
    return isinstance(spec, str) and spec.startswith(EMBEDDED_PREFIX)


def embedded_corpus(spec: str, *, size: str = "small", seed: int = 0) -> dict[str, Path]:
    """Generate (once) the embedded corpus named by `spec` ("embedded:<name>") -> {split: manifest path}."""
    import importlib

    name = spec[len(EMBEDDED_PREFIX):]
    if name not in EMBEDDED_NAMES:
        raise ValueError(f"unknown embedded corpus {spec!r}; expected one of "
                         + ", ".join(EMBEDDED_PREFIX + n for n in EMBEDDED_NAMES))
    module = importlib.import_module(f"omnissl.datamodules.corpora.{name}")
    return module.generate(data_root() / "corpora" / f"{name}-{size}-seed{seed}", size=size, seed=seed)


def check_size(size: str) -> None:
    if size not in SIZES:
        raise ValueError(f"unknown corpus size {size!r}; expected one of {SIZES}")


# ----------------------------------------------------------------------------------------------- generation


def cached_generation(out: Path, config: dict[str, Any],
                      build: Callable[[Path, Path], dict[str, str]]) -> dict[str, Path]:
    """Run `build(tmp_dir, out) -> {split: manifest file name}` once per `config`; return {split: manifest path}.

    Idempotent: a marker file (`.complete.json`, holding `config`) is written last; a folder with a matching
    marker is returned as is, one with a different or missing marker is rebuilt. The corpus is built in a
    sibling temporary folder and renamed into place, so concurrent generators (several nodes on one file
    system) never see a half-written corpus. `build` must write manifests whose root line is `out`.
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
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        manifests = build(tmp, out)
        (tmp / MARKER).write_text(json.dumps({"config": config, "manifests": manifests}, indent=1, sort_keys=True))
        if out.exists():
            found = _read_marker(out, config)
            if found is not None:  # another process finished first
                return found
            shutil.rmtree(out)
        try:
            os.replace(tmp, out)
        except OSError:
            found = _read_marker(out, config)
            if found is None:
                raise
            return found
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
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


# ------------------------------------------------------------------------------------------------- reading


def read_manifest(path: str | os.PathLike, *, require_root: bool = True) -> tuple[Path, list[list[str]]]:
    """Read a manifest -> (root folder, rows of tab-separated cells).

    With `require_root=False` (plain file lists) the first line is taken as the root only when it names an
    existing folder; otherwise every line is an item and paths are relative to the list's own folder.
    Blank lines are ignored.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest {path} does not exist")
    lines = [ln.rstrip("\r\n") for ln in path.read_text(encoding="utf-8").splitlines()]
    lines = [ln for ln in lines if ln.strip()]
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


def split_loader(dm: Any, ds: "Dataset | None", train: bool, collate_fn: Callable) -> "DataLoader | list":
    """The loader of one split of DataModule `dm` (batch_size, seed, num_workers, trainer); no valid split -> []."""
    if ds is None:
        if train:
            raise RuntimeError("call setup() before asking for a dataloader")
        return []
    return make_loader(ds, trainer=dm.trainer, batch_size=dm.batch_size, shuffle=train, seed=dm.seed,
                       num_workers=dm.num_workers, collate_fn=collate_fn)


def make_loader(dataset: "Dataset", *, trainer: Any, batch_size: int, shuffle: bool, seed: int, num_workers: int,
                collate_fn: Callable, drop_last: bool = False) -> "DataLoader":
    """A DataLoader whose order is a function of (seed, epoch, rank): see the module docstring."""
    from torch.utils.data import DataLoader, DistributedSampler

    world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=shuffle, seed=seed,
                                 drop_last=drop_last)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      collate_fn=collate_fn, drop_last=drop_last, persistent_workers=num_workers > 0)


class SkipLog:
    """Counts items skipped under `on_error="skip"` and warns about the first few, naming each file."""

    def __init__(self, what: str, max_warnings: int = 5) -> None:
        self.what, self.max_warnings = what, max_warnings
        self.skipped: dict[str, str] = {}

    def add(self, path: object, reason: str) -> None:
        import warnings

        self.skipped[str(path)] = reason
        if len(self.skipped) <= self.max_warnings:
            warnings.warn(f"skipping {self.what} {path}: {reason} (on_error='skip'; "
                          f"{len(self.skipped)} skipped so far)", stacklevel=3)

    def __len__(self) -> int:
        return len(self.skipped)


def check_on_error(on_error: str) -> None:
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
