"""Character CTC utilities shared by the CTC probe (eval/probe.py) and CTC fine-tuning (eval/finetune.py):
the character vocabulary, greedy best-path decoding, and the fairseq letter transcripts beside a manifest.

Legend: B batch, N frames, V vocabulary (blank included), M characters.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from omnissl.eval.upstream import Features

WORD_SEP = "|"


@dataclass
class CharVocab:
    """Characters of the training transcripts plus the CTC blank at index 0. Transcripts are fairseq letter
    lines ("H I | T H E R E |"): tokens separated by spaces, "|" ending each word."""

    symbols: list[str]
    blank: int = 0

    @classmethod
    def from_transcripts(cls, lines: Sequence[str], source: str = "?") -> "CharVocab":
        chars = sorted({c for line in lines for c in line.split()})
        if not chars:
            raise ValueError(f"{source}: the training transcripts are empty")
        return cls(["<blank>", *chars])

    def __len__(self) -> int:
        return len(self.symbols)

    def encode(self, line: str, where: str = "?") -> Tensor:
        """A letter line -> (M,) int64; a character unseen in training raises naming `where`."""
        index = {s: i for i, s in enumerate(self.symbols)}
        out = []
        for c in line.split():
            if c not in index or index[c] == self.blank:
                raise ValueError(f"{where}: character {c!r} does not occur in the training transcripts")
            out.append(index[c])
        return torch.tensor(out, dtype=torch.int64)

    def text(self, ids: Sequence[int]) -> str:
        """Label ids -> words separated by single spaces ("|" -> word boundary)."""
        return " ".join("".join(self.symbols[i] for i in ids).replace(WORD_SEP, " ").split())


def greedy_decode(log_probs: Tensor, lengths: Tensor, blank: int = 0) -> list[list[int]]:
    """Best path: argmax per frame, merge repeats, drop blanks. log_probs (B, N, V), lengths (B,)."""
    best = log_probs.argmax(-1).cpu()
    out = []
    for row, n in zip(best, lengths.tolist()):
        row = row[:n]
        keep = torch.ones_like(row, dtype=torch.bool)
        keep[1:] = row[1:] != row[:-1]
        out.append([int(t) for t in row[keep & (row != blank)]])
    return out


def read_transcripts(manifest: str | Path) -> tuple[Path, list[str]]:
    """The letter transcripts beside a manifest: `X.ltr` (fairseq letters), else `X.wrd` (words, converted).
    -> (the file read, one letter line per manifest line)."""
    manifest = Path(manifest)
    ltr, wrd = manifest.with_suffix(".ltr"), manifest.with_suffix(".wrd")
    if ltr.is_file():
        return ltr, ltr.read_text(encoding="utf-8").splitlines()
    if wrd.is_file():
        lines = wrd.read_text(encoding="utf-8").splitlines()
        return wrd, [" ".join(" ".join(w) + " " + WORD_SEP for w in line.split()) for line in lines]
    raise FileNotFoundError(f"{manifest}: no transcripts for the CTC probe (expected {ltr.name} or {wrd.name} "
                            "beside the manifest, one line per utterance)")


def attach_transcripts(feats: Features, lines: Sequence[str], source: str, *, vocab: CharVocab | None = None,
                       rows: Sequence[int] | None = None) -> Features:
    """Give frame features their transcripts: the utterance with dataset id i gets letter line `rows[i]`
    (default: line i) as `texts`, and with a `vocab` (the training split) as `targets` too. Held-out splits
    need no vocab: a character never seen in training is simply one the probe cannot produce."""
    texts, targets = [], []
    for i in feats.ids.tolist():
        row = i if rows is None else int(rows[i])
        if row >= len(lines):
            raise ValueError(f"{source} has {len(lines)} lines but the manifest lists utterance {row + 1}")
        texts.append(" ".join(lines[row].replace(" ", "").replace(WORD_SEP, " ").split()))
        if vocab is not None:
            targets.append(vocab.encode(lines[row], f"{source}:{row + 1}"))
    feats.texts, feats.targets = texts, (targets if vocab is not None else None)
    return feats


