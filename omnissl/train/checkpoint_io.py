"""`AtomicCheckpointIO`: Lightning checkpoints written atomically in their own folder, and read back with errors
that name the file.

Lightning's own writer (`TorchCheckpointIO`, through fsspec) writes a temporary file in $TMPDIR and moves it into
place. When $TMPDIR is on another filesystem the move is a copy into the final name: a kill during the copy
leaves `last.ckpt` truncated (the previous good one destroyed), a full disk leaves a partial checkpoint with a
valid-looking name, and a kill at the rename leaves a checkpoint-sized file in $TMPDIR. Here a checkpoint is

1. serialized into a hidden temporary file beside its final name (`.<name>.<host>.<pid>.<random>.tmp`, so on the
   same filesystem), flushed and fsync'ed;
2. renamed over the final name (`os.replace`: atomic on POSIX; the old file stays whole until then), and the
   folder is fsync'ed so the rename itself survives a crash;
3. on any failure (a full disk, an error of the writer) the temporary file is removed and the error names the
   checkpoint; the previous file of that name is untouched.

Temporary files left by a killed process (same host, a pid no longer alive) are removed at the next save into
the same folder. Remote paths (s3://, gs://, ...) are left to Lightning's writer.

Loading (`--ckpt_path`) names the file when it cannot be read (truncated, random bytes, 0 bytes, pickled
objects), and names the newest other checkpoint in the same folder that can be read, if there is one.

In a recipe (recipes/trainer/*.yaml):

    trainer:
      plugins:
        - class_path: omnissl.train.checkpoint_io.AtomicCheckpointIO

FSDP2 (`ModelParallelStrategy`, recipes/trainer/fsdp.yaml) writes its distributed checkpoints (a folder of
shards, `save_distributed_checkpoint=True`) with torch.distributed.checkpoint, not through a CheckpointIO; the
plugin then serves only full-state checkpoints (`save_distributed_checkpoint=False`) and is otherwise unused.
"""

from __future__ import annotations

import errno
import os
import pickle
import re
import socket
import tempfile
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

__all__ = ["AtomicCheckpointIO", "CheckpointReadError", "check_readable", "read_error", "readable_checkpoint",
           "previous_good_checkpoint", "remove_stale_temporaries"]

_TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<host>[^.]+)\.(?P<pid>\d+)\.[A-Za-z0-9_]+\.tmp$")


def _local(path) -> bool:
    """A local path (not an fsspec URL such as s3://bucket/x.ckpt)."""
    text = str(path)
    return "://" not in text


class CheckpointReadError(RuntimeError):
    """A checkpoint that cannot be read; the message names it (and a readable one beside it, if any)."""


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname()) or "host"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # once, at import: os.umask can only be read by setting it


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # a platform or filesystem without directory handles
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Remove the temporary files a killed writer left in `folder` (this host's, whose pid is gone)."""
    removed = []
    host = _host()
    for p in folder.glob(".*.tmp"):
        m = _TEMP.match(p.name)
        if m and m["host"] == host and int(m["pid"]) != os.getpid() and not _alive(int(m["pid"])):
            try:
                p.unlink()
                removed.append(p)
            except FileNotFoundError:
                pass
    return removed


def readable_checkpoint(path: str | os.PathLike) -> bool:
    """Whether `path` loads with torch.load(weights_only=True) into a dict with a state_dict (mmap: cheap)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - any failure means "not readable"
        return False
    return isinstance(ckpt, dict) and "state_dict" in ckpt


def previous_good_checkpoint(path: str | os.PathLike) -> Path | None:
    """The newest other *.ckpt file in `path`'s folder that can be read, or None."""
    path = Path(path)
    try:
        others = [p for p in path.parent.glob("*.ckpt") if p.is_file() and p.resolve() != path.resolve()]
    except OSError:
        return None
    for p in sorted(others, key=lambda q: q.stat().st_mtime, reverse=True):
        if readable_checkpoint(p):
            return p
    return None


_READ_ERRORS = (pickle.UnpicklingError, EOFError, RuntimeError, KeyError, ValueError, OSError, IndexError,
                AttributeError, TypeError, UnicodeDecodeError)


def read_error(path: Path, e: BaseException) -> CheckpointReadError:
    """The error for an unreadable checkpoint `path` (torch.load raised `e`): names the file, what it seems to
    be, and the newest readable checkpoint beside it."""
    good = previous_good_checkpoint(path)
    hint = (f"; {good} beside it can be read: resume from it with --ckpt_path {good}" if good is not None
            else "; no other readable checkpoint is in its folder")
    kind = ("it holds pickled objects other than tensors and plain data (refused: never unpickled)"
            if isinstance(e, pickle.UnpicklingError) else
            "0 bytes" if path.stat().st_size == 0 else "truncated, corrupt, or not a torch checkpoint")
    first = str(e).splitlines()[0] if str(e) else repr(e)
    return CheckpointReadError(f"cannot read checkpoint {path}: {kind} ({type(e).__name__}: {first}){hint}")


def check_readable(path: str | os.PathLike) -> None:
    """Raise CheckpointReadError (naming `path` and a readable checkpoint beside it) unless `path` loads with
    torch.load(weights_only=True) into a dict (mmap: the tensors are not read)."""
    path = Path(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except _READ_ERRORS as e:
        raise read_error(path, e) from e
    if not isinstance(ckpt, dict):
        raise CheckpointReadError(f"cannot read checkpoint {path}: it holds a {type(ckpt).__name__}, not a "
                                  "Lightning checkpoint")


class AtomicCheckpointIO(TorchCheckpointIO):
    """TorchCheckpointIO whose saves are atomic in the checkpoint's own folder and whose loads name the file;
    see the module docstring."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None or not _local(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        folder = path.parent
        folder.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(folder)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.{_host()}.{os.getpid()}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes it 0600; a checkpoint gets the usual mode
            os.replace(tmp, path)
        except BaseException as e:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            if isinstance(e, OSError):
                why = "no space left on the device" if e.errno == errno.ENOSPC else (e.strerror or str(e))
                raise OSError(e.errno, f"could not write checkpoint {path} ({why}); the previous file of that name, "
                                       "if any, is unchanged") from e
            raise
        _fsync_dir(folder)

    def load_checkpoint(self, path, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        if not _local(path):
            return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"no checkpoint at {path} (--ckpt_path)")
        if path.is_dir():
            raise CheckpointReadError(f"{path} is a folder, not a checkpoint file (a distributed checkpoint is read "
                                      "by the strategy that wrote it: recipes/trainer/fsdp.yaml)")
        kwargs = {} if map_location is None else {"map_location": map_location}
        try:
            return super().load_checkpoint(path, weights_only=weights_only, **kwargs)
        except _READ_ERRORS as e:
            raise read_error(path, e) from e
