"""Progress bars of the long jobs outside training (probe feature extraction and head training, the manifest
scan of `omnissl data manifest`, the k-means fit of `omnissl hubert-units`, export): one look, Lightning's.

    for batch in progress(loader, desc="features train", unit="batch"):
        ...
    with progress(total=3, desc="export", unit="step") as bar:
        bar.update()

A tqdm bar on stderr in the format of Lightning's TQDMProgressBar (`{l_bar}{bar}| n/total [elapsed<remaining,
rate]`, resized with the terminal). It draws only when its stream is a terminal: in a log file, a pipe or CI
it is silent, and so is every bar of a process with OMNISSL_QUIET=1 (the commands' --quiet sets it, so worker
processes inherit it). Errors and results are printed as before; only the bars go.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import IO, Any

from tqdm import tqdm

QUIET_ENV = "OMNISSL_QUIET"
BAR_FORMAT = "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"  # Lightning's


def set_quiet(quiet: bool = True) -> None:
    """With quiet (a command's --quiet): no progress bars in this process and the processes it starts. Without,
    nothing changes (OMNISSL_QUIET=1 set by the user stays)."""
    if quiet:
        os.environ[QUIET_ENV] = "1"


def is_quiet() -> bool:
    return os.environ.get(QUIET_ENV, "").lower() in ("1", "true", "yes")


def shows_progress(file: IO | None = None) -> bool:
    """Whether a bar on `file` (default stderr) would draw: a terminal, and not quiet."""
    file = sys.stderr if file is None else file
    isatty = getattr(file, "isatty", None)
    return not is_quiet() and bool(isatty and isatty())


def progress(iterable: Iterable | None = None, *, desc: str, total: int | None = None, unit: str = "it",
             file: IO | None = None, leave: bool = True, **kwargs: Any) -> tqdm:
    """A tqdm bar over `iterable` (or a manual one with `total`), drawn only where `shows_progress(file)`."""
    file = sys.stderr if file is None else file
    return tqdm(iterable, desc=desc, total=total, unit=unit, file=file, leave=leave,
                disable=not shows_progress(file), dynamic_ncols=True, smoothing=0, bar_format=BAR_FORMAT,
                mininterval=0.2, **kwargs)


class StepLines:
    """A text stream for `contextlib.redirect_stdout` that turns a library's verbose lines into one bar: a line
    matching `pattern` (two groups: step, total) moves the bar, any other line becomes its postfix (e.g.
    sklearn's MiniBatchKMeans(verbose=1): "Init 3/20 ...", "Minibatch step 120/5000: ...")."""

    def __init__(self, pattern: str, *, desc: str, unit: str = "step", file: IO | None = None) -> None:
        import re

        self.pattern = re.compile(pattern)
        self.bar = progress(desc=desc, total=None, unit=unit, file=file)
        self.pending = ""

    def write(self, text: str) -> int:
        self.pending += text
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            if m := self.pattern.search(line):
                self.bar.total = int(m.group(2))
                self.bar.update(int(m.group(1)) - self.bar.n)
            elif line.strip():
                self.bar.set_postfix_str(line.strip()[:40], refresh=False)
        return len(text)

    def flush(self) -> None:
        pass

    def __enter__(self) -> "StepLines":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.bar.close()
