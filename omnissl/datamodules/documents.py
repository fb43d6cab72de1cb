"""Text documents: list a corpus's files (folder of `*.txt`, `.tsv` manifest, one file) and read them as UTF-8,
raising on an undecodable file or (on_error="skip") counting it. Shared by `TextDataModule`, the tokenizer
training and the labeled text DataModule."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from omnissl.datamodules.common import check_on_error, read_manifest


def list_documents(corpus: str | os.PathLike) -> list[Path]:
    """The document files of a corpus path: a folder (`*.txt` below it), a `.tsv` manifest, or one file."""
    path = Path(corpus)
    if path.is_dir():
        return sorted(p for p in path.rglob("*.txt") if p.is_file())
    if path.suffix == ".tsv":
        root, rows = read_manifest(path)
        return [root / row[0] for row in rows]
    if path.is_file():
        return [path]
    raise FileNotFoundError(f"text corpus {corpus} does not exist (expected a folder of .txt files, a .tsv "
                            f"manifest, a text file, or 'embedded:text')")


@dataclass
class ReadStats:
    """What reading a list of document files found."""

    files: int = 0
    empty: int = 0
    skipped: dict[str, str] = field(default_factory=dict)  # path -> reason (on_error="skip")

    def describe(self) -> str:
        return f"{self.files} files read, {self.empty} blank, {len(self.skipped)} skipped as undecodable"


def decode_utf8(path: Path, data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not valid UTF-8 ({e.reason} at byte {e.start}); re-encode it as UTF-8 or pass "
                         f"on_error='skip' to leave such files out") from None


def read_documents(files: Sequence[Path], *, on_error: str = "raise", stats: ReadStats | None = None,
                   progress: str | None = None) -> Iterator[str]:
    """Yield the text of each non-blank document file; undecodable ones raise or are counted in `stats`."""
    check_on_error(on_error)
    stats = stats if stats is not None else ReadStats()
    for path in tqdm(files, desc=progress, unit="doc", disable=progress is None, mininterval=1.0):
        stats.files += 1
        try:
            text = decode_utf8(path, Path(path).read_bytes())
        except (ValueError, OSError) as e:
            if on_error == "raise":
                raise ValueError(str(e) if isinstance(e, ValueError) else f"{path}: cannot read: {e}") from None
            stats.skipped[str(path)] = str(e)
            continue
        if not text.strip():
            stats.empty += 1
            continue
        yield text
