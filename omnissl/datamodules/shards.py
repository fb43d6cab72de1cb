"""Streamed, sharded corpora with `litdata`: the one way omnissl writes and reads shards.

Writing (`write_shards`, the `omnissl data shard` command; labeled text: `labeled.write_labeled_text_shards`):
litdata's `optimize()` turns a manifest, folder or text file into chunk files plus litdata's `index.json`, and
omnissl adds `omnissl_shards.json` (kind, item count, label vocabulary, skipped items). One shard item per
source item:

* audio: `{"id": manifest row, "audio": 16 kHz mono 16-bit samples, "n": samples, "origin": JSON {"file",
  "where": manifest line},
  "label": str ("" when none), "units": int32 array (empty when none)}`. `audio_format="pcm"` (default): the
  samples as an int16 array in zstd-compressed chunks (about 0.77 of 16-bit WAV on the embedded speech; reading
  is a slice, faster than opening WAV files); "flac": 16-bit FLAC bytes (uint8 array) in uncompressed chunks
  (about 0.6 of WAV, for object stores where bytes cost more than CPU; decoding is ~4x slower than reading
  WAV);
* text: `{"text": one document, "origin": {"file", "where": "<file>:<first line>"}}`, chunks zstd-compressed;
  documents are one per line (`docs="line"`) or separated by blank lines (`docs="blank"`), read line by line
  (a file is never read whole into memory);
* image: `{"id": manifest row, "image": the encoded file's bytes (PNG/JPEG as stored, uint8 array), "origin",
  "label"}`.

Reading: a split argument `shards:<folder or URI>` (`shards:/data/ls960`, `shards:s3://bucket/ls960`) names a
shard set. A local folder is read as `local:<folder>`, i.e. through litdata's downloader and cache exactly as
an object-store URI (one code path; the source folder is never modified); the cache lives under
`$OMNISSL_DATA/cache/shards` (`$OMNISSL_SHARD_CACHE` if set). `ShardItems` is a litdata `StreamingDataset`
whose items are decoded by a picklable `decode(raw, epoch)` (e.g. `audio.AudioShardDecoder`: crop, units,
labels, bad-item handling), and `ShardLoader` is a `StreamingDataLoader` that gathers `pool` items per litdata
batch and cuts them into length-bucketed batches under `max_tokens` (`sampler.token_batches`, as for manifests)
or plain `batch_size` batches, in its (persistent) DataLoader workers, handed to the main process packed into
one buffer per dtype (`pack_batches`). litdata assigns chunks to ranks and workers and shuffles chunks and items
per (seed, epoch): in one process every item is read once per epoch; under DDP every rank gets the same number
of full pools (litdata's `drop_last`; fewer than ranks x pool items left out per epoch), a `max_tokens` pool is
cut into a fixed number of batches (`equal_cut`), so all ranks run the same number of steps, and chunks are
assigned globally in every epoch (`GlobalShuffle`).

Resume: `ShardLoader.state_dict()` = litdata's own loader state at the start of the pool holding the next batch
to train on + that pool's batches already trained on (Lightning fetches one batch ahead from a loader without a
length: `lookahead`); Lightning saves it in every checkpoint (as for `ResumableLoader`) and
`load_state_dict` replays litdata's position, recomputes that pool (same items, same crops: crops are
functions of (seed, epoch, id)) and skips its finished batches, so a resumed epoch sees each item once.
"""

from __future__ import annotations

import copy
import io
import json
import logging
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from litdata import StreamingDataLoader, StreamingDataset, optimize
from litdata.streaming.shuffle import FullShuffle
from torch import Tensor

from omnissl.batch import SAMPLE_RATE, Batch
from omnissl.datamodules.audio_io import EXTENSIONS, AudioDataError, load_audio, read_audio_manifest
from omnissl.datamodules.common import SkipLog, check_on_error, data_root, read_manifest, shown
from omnissl.datamodules.units import read_units, units_path_for
from omnissl.datamodules.sampler import token_batches

log = logging.getLogger(__name__)

PREFIX = "shards:"
META = "omnissl_shards.json"
KINDS = ("audio", "text", "image", "labeled_text")
AUDIO_FORMATS = ("pcm", "flac")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


class ShardDataError(RuntimeError):
    """A shard set that cannot be read, or a shard item that cannot be decoded (the message names both)."""


def is_shards(spec: object) -> bool:
    return isinstance(spec, str) and spec.startswith(PREFIX)


def shard_location(spec: str | os.PathLike) -> str:
    """The litdata input of `spec` ("shards:<folder or URI>", or the bare folder / URI): an object-store URI as
    is, a local folder as "local:<absolute folder>" (read through litdata's downloader and cache like a URI)."""
    where = str(spec)[len(PREFIX):] if is_shards(spec) else str(spec)
    if "://" in where or where.startswith("local:"):
        return where
    return "local:" + str(Path(where).expanduser().absolute())


def cache_dir() -> Path:
    """Where litdata keeps the chunks it streams: `$OMNISSL_SHARD_CACHE`, default `$OMNISSL_DATA/cache/shards`."""
    return Path(os.environ.get("OMNISSL_SHARD_CACHE") or data_root() / "cache" / "shards")


def read_meta(spec: str | os.PathLike) -> dict:
    """`omnissl_shards.json` of a shard set (kind, count, labels, skipped); {} for a litdata set without one."""
    where = shard_location(spec)
    if where.startswith("local:"):
        path = Path(where[len("local:"):]) / META
        if not (path.parent / "index.json").is_file():
            raise ShardDataError(f"{spec}: no litdata shard set here (index.json missing); write one with "
                                 "`omnissl data shard`")
        return json.loads(path.read_text()) if path.is_file() else {}
    try:
        with remote_file(f"{where.rstrip('/')}/{META}", "r") as f:
            return json.load(f)
    except FileNotFoundError:
        return {}


def remote_file(uri: str, mode: str) -> Any:
    """An object-store file through fsspec (its backend for the scheme, e.g. s3fs or gcsfs, must be installed;
    litdata itself streams the chunks with its own clients)."""
    import fsspec

    try:
        return fsspec.open(uri, mode)
    except ImportError as e:
        raise ShardDataError(f"{uri}: omnissl reads and writes {META} of an object store through fsspec, whose "
                             f"backend for this scheme is missing ({e})") from None


# ------------------------------------------------------------------------------------------------- writing


def encode_flac(x: np.ndarray, sample_rate: int) -> bytes:
    """16-bit FLAC of float samples in [-1, 1) (`pcm16`: a 16-bit source decodes to exactly the samples it had)."""
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, pcm16(x), sample_rate, format="FLAC", subtype="PCM_16")
    return buf.getvalue()


def as_bytes_array(data: bytes) -> np.ndarray:
    """Encoded bytes as a uint8 array: litdata then stores them as they are (given plain `bytes` that look like
    audio or an image, its serializers would re-encode them, as WAV or decoded pixels)."""
    return np.frombuffer(data, dtype=np.uint8)


def origin(path: object, where: str) -> str:
    """Where a shard item came from, as JSON {"file", "where"} (a bare file name ending in .wav or .png would be
    taken by litdata's serializers for a file to read in)."""
    return json.dumps({"file": shown(path), "where": where})


@dataclass
class SkipRecorder:
    """Appends (item, reason) lines to a file in `folder` (one per writing process; collected after)."""

    folder: str

    def __call__(self, where: str, reason: str) -> None:
        with open(Path(self.folder) / f"skips-{os.getpid()}.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps([where, reason]) + "\n")


def pcm16(x: np.ndarray) -> np.ndarray:
    """Float samples in [-1, 1) -> int16, quantized as soundfile reads 16-bit audio back (k / 32768), so a 16-bit
    source round-trips exactly (libsndfile's own float writer scales by 32767)."""
    return np.clip(np.round(np.asarray(x, dtype=np.float64) * 32768.0), -32768, 32767).astype(np.int16)


@dataclass
class AudioItems:
    """optimize() fn: (row, path, samples, where, label, units) -> one shard item (nothing for a skipped bad item).
    audio_format "pcm": the samples as int16 (chunks zstd-compressed); "flac": 16-bit FLAC bytes (uint8)."""

    on_error: str
    skip: SkipRecorder
    audio_format: str = "pcm"

    def __call__(self, row: tuple) -> Iterator[dict]:
        i, path, size, where, label, units = row
        try:
            x = load_audio(path, expected=size).numpy()
        except AudioDataError as e:
            if self.on_error == "raise":
                raise AudioDataError(f"{where}: {e}") from None
            self.skip(where, str(e))
            return
        audio = pcm16(x) if self.audio_format == "pcm" else as_bytes_array(encode_flac(x, SAMPLE_RATE))
        yield {"id": int(i), "audio": audio, "n": int(len(x)),
               "origin": origin(path, where), "label": label or "",
               "units": np.asarray(units if units is not None else [], dtype=np.int32)}


@dataclass
class TextItems:
    """optimize() fn: a text file -> its documents, read line by line (never the whole file)."""

    docs: str
    on_error: str
    skip: SkipRecorder

    def __call__(self, path: str) -> Iterator[dict]:
        doc: list[str] = []
        first = 0
        with open(path, "rb") as f:
            for number, raw in enumerate(f, start=1):
                try:
                    line = raw.decode("utf-8").rstrip("\r\n")
                except UnicodeDecodeError as e:
                    why = f"not valid UTF-8 ({e.reason} at byte {e.start} of the line)"
                    if self.on_error == "raise":
                        raise ValueError(f"{shown(path)}:{number}: {why}; re-encode the file as UTF-8, or pass "
                                         "--on-error skip") from None
                    self.skip(f"{shown(path)}:{number}", why)
                    continue
                if number == 1:
                    line = line.lstrip("\ufeff")
                if self.docs == "line":
                    if line.strip():
                        yield {"text": line, "origin": origin(path, f"{shown(path)}:{number}")}
                    continue
                if line.strip():
                    first = first or number
                    doc.append(line)
                elif doc:
                    yield {"text": "\n".join(doc), "origin": origin(path, f"{shown(path)}:{first}")}
                    doc, first = [], 0
        if doc:
            yield {"text": "\n".join(doc), "origin": origin(path, f"{shown(path)}:{first}")}


@dataclass
class ImageItems:
    """optimize() fn: (row, path, label) -> the image file's bytes, checked decodable."""

    on_error: str
    skip: SkipRecorder

    def __call__(self, row: tuple) -> Iterator[dict]:
        from PIL import Image

        i, path, where, label = row
        try:
            data = Path(path).read_bytes()
            with Image.open(io.BytesIO(data)) as im:
                im.verify()
        except Exception as e:  # PIL raises many types for a bad file
            if self.on_error == "raise":
                raise ShardDataError(f"{where}: unreadable image ({e})") from None
            self.skip(where, f"unreadable image ({e})")
            return
        yield {"id": int(i), "image": as_bytes_array(data), "origin": origin(path, where), "label": label or ""}


def guess_kind(source: Path) -> str:
    """audio / image / text from the source's files (a manifest's first listed file, a folder's files)."""

    if source.is_file() and source.suffix == ".jsonl":
        return "labeled_text"
    if source.is_file() and source.suffix != ".tsv":
        return "text"
    names = ([p.name for p in source.rglob("*") if p.is_file()] if source.is_dir()
             else [line.split("\t")[0] for line in source.read_text(encoding="utf-8").splitlines()[1:3]])
    suffixes = {Path(n).suffix.lower() for n in names}
    if suffixes & set(EXTENSIONS):
        return "audio"
    if suffixes & set(IMAGE_EXTENSIONS):
        return "image"
    if ".txt" in suffixes:
        labeled = source.is_file() and any(len(r) > 2 and r[2] for r in read_manifest(source, require_root=False)[1])
        return "labeled_text" if labeled else "text"
    raise ValueError(f"{source}: cannot tell audio, text or images apart from its files {sorted(suffixes)[:5]}; "
                     "pass --kind")


def audio_rows(source: Path, *, units: str | None, on_error: str) -> tuple[list[tuple], list[str] | None]:

    m = read_audio_manifest(source, on_error=on_error)
    unit_rows = None
    if units is not None:
        path = units_path_for(source, units)
        unit_rows = read_units(path)
        if len(unit_rows) != len(m):
            raise ValueError(f"{path} has {len(unit_rows)} lines but {source} lists {len(m)} utterances")
    rows = [(i, str(m.root / m.paths[i]), int(m.sizes[i]), m.where(i), None if m.labels is None else m.labels[i],
             None if unit_rows is None else unit_rows[i]) for i in range(len(m))]
    return rows, m.labels


def image_rows(source: Path) -> list[tuple]:

    if source.is_dir():
        files = sorted(p for p in source.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        return [(i, str(p), str(p), p.parent.name if p.parent != source else None) for i, p in enumerate(files)]
    root, rows = read_manifest(source, require_root=False)
    return [(i, str(root / r[0]), f"{source}:{i + 2}", r[2] if len(r) > 2 else None) for i, r in enumerate(rows)]


def write_shards(source: str | os.PathLike, out: str, *, kind: str | None = None, docs: str = "line",
                 units: str | None = None, on_error: str = "raise", chunk_bytes: str = "64MB",
                 num_workers: int = 1, audio_format: str = "pcm") -> dict:
    """Shard `source` (audio/image manifest or folder; a text file, a folder of .txt or a manifest of them) into
    `out` (folder or object-store URI) with litdata's `optimize()`; returns the metadata written beside them
    (`omnissl_shards.json`). Bad items raise naming the file (on_error="raise") or are counted and left out."""
    check_on_error(on_error)
    if audio_format not in AUDIO_FORMATS:
        raise ValueError(f"audio_format must be one of {AUDIO_FORMATS}, got {audio_format!r}")
    if docs not in ("line", "blank"):
        raise ValueError(f"docs must be 'line' or 'blank', got {docs!r}")
    source = Path(source).expanduser()
    if not source.exists():
        raise FileNotFoundError(f"{source} does not exist")
    kind = kind or guess_kind(source)
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if kind == "labeled_text":
        raise ValueError(f"{source}: labeled text (a .jsonl, or a manifest of text files with a label column) is "
                         "sharded by omnissl.datamodules.labeled.write_labeled_text_shards (`omnissl data shard`)")
    if units is not None and kind != "audio":
        raise ValueError("units go with audio shards only")
    check_out(out)
    labels: list[str] | None = None
    with tempfile.TemporaryDirectory(prefix="omnissl-shard-skips-") as tmp:
        skip = SkipRecorder(tmp)
        compression = None
        if kind == "audio":
            inputs, labels = audio_rows(source, units=units, on_error=on_error)
            fn: Callable = AudioItems(on_error, skip, audio_format)
            compression = "zstd" if audio_format == "pcm" else None
        elif kind == "image":
            inputs = image_rows(source)
            found = [r[3] for r in inputs]
            labels = None if any(lab is None for lab in found) else found  # type: ignore[assignment]
            fn = ImageItems(on_error, skip)
        else:
            if source.is_dir():
                inputs = [str(p) for p in sorted(source.rglob("*.txt"))]
            elif source.suffix == ".tsv":
                root, rows = read_manifest(source, require_root=False)
                inputs = [str(root / r[0]) for r in rows]
            else:
                inputs = [str(source)]
            fn = TextItems(docs, on_error, skip)
            compression = "zstd"
        if not inputs:
            raise ValueError(f"{source}: no {kind} items to shard")
        optimize_items(fn, inputs, out, compression=compression, chunk_bytes=chunk_bytes, num_workers=num_workers)
        skipped: dict[str, str] = {}
        for f in sorted(Path(tmp).glob("skips-*.jsonl")):
            for line in f.read_text(encoding="utf-8").splitlines():
                where, why = json.loads(line)
                skipped[where] = why
    return finish_shards(out, kind=kind, source=source, skipped=skipped, labels=labels,
                         docs=docs if kind == "text" else None, units=units,
                         audio_format=audio_format if kind == "audio" else None)


def check_out(out: str) -> None:
    """A local output folder must be new or empty."""
    if "://" not in out and Path(out).exists() and any(Path(out).iterdir()):
        raise FileExistsError(f"{out} exists and is not empty: choose a new or empty --out folder")


def optimize_items(fn: Callable, inputs: list, out: str, *, compression: str | None, chunk_bytes: str,
                   num_workers: int) -> None:
    """litdata's `optimize()` of `fn` over `inputs` into `out`; a worker's error (litdata re-raises it as text)
    becomes `ShardDataError` naming the bad item, and a local partial output is removed."""
    try:
        optimize(fn=fn, inputs=inputs, output_dir=out, chunk_bytes=chunk_bytes, num_workers=max(1, num_workers),
                 compression=compression, compression_level="chunk" if compression else None,
                 reorder_files=False, mode="overwrite", start_method="fork")
    except RuntimeError as e:
        if "://" not in out:
            shutil.rmtree(out, ignore_errors=True)
        found = re.findall(r"(?:AudioDataError|ShardDataError|ValueError): (.+)", str(e))
        raise ShardDataError(f"{found[0]} (nothing written; --on-error skip leaves such items out)"
                             if found else str(e)) from None


def finish_shards(out: str, *, kind: str, source: object, skipped: dict[str, str], labels: Sequence[str] | None,
                  docs: str | None = None, units: str | None = None, audio_format: str | None = None) -> dict:
    """Write `omnissl_shards.json` beside litdata's index and return it."""
    count = sum(c["chunk_size"] for c in _index(out)["chunks"])
    meta = {"kind": kind, "source": str(source), "count": count, "skipped": skipped, "docs": docs,
            "units": units, "labels": sorted(set(labels)) if labels else None, "audio_format": audio_format}
    _write_text(out, META, json.dumps(meta, indent=1, sort_keys=True))
    return meta


def _index(out: str) -> dict:
    if "://" not in out:
        return json.loads((Path(out) / "index.json").read_text())
    with remote_file(f"{out.rstrip('/')}/index.json", "r") as f:
        return json.load(f)


def _write_text(out: str, name: str, text: str) -> None:
    if "://" not in out:
        (Path(out) / name).write_text(text)
        return
    with remote_file(f"{out.rstrip('/')}/{name}", "w") as f:
        f.write(text)


# ------------------------------------------------------------------------------------------------- reading


class ShardItems(StreamingDataset):
    """A litdata `StreamingDataset` over `spec` ("shards:<folder or URI>") whose items are `decode(raw, epoch)`.

    One process: every item is seen once per epoch across DataLoader workers. Under DDP (a process group of
    several ranks when the set is opened): litdata's `drop_last`, so every rank and worker gets the same number
    of full `pool`s and the ranks run the same number of steps (`ShardLoader`); fewer than world size x pool
    items are left out of an epoch, and each of the others is seen once. Chunk and item order are litdata's
    shuffle of (seed, epoch). `meta` is the set's `omnissl_shards.json`."""

    def __init__(self, spec: str, *, decode: Callable[[dict, int], dict], shuffle: bool, seed: int) -> None:
        self.meta = read_meta(spec)
        cache = cache_dir()
        cache.mkdir(parents=True, exist_ok=True)
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        super().__init__(shard_location(spec), cache_dir=str(cache), shuffle=shuffle, seed=seed,
                         drop_last=world > 1)
        self.spec, self.decode = spec, decode
        self.world = world  # processes in the run (litdata reads its own `distributed_env`)
        # the main process's pass, for persistent DataLoader workers (their copies of this dataset live on from
        # pass to pass): [epoch, 1 when the pass replays a loaded state]
        self.pass_info = torch.zeros(2, dtype=torch.int64).share_memory_()

    def set_epoch(self, current_epoch: int) -> None:
        super().set_epoch(current_epoch)
        self.pass_info[0] = int(self.current_epoch)
        self.pass_info[1] = int(self._state_dict is not None)

    def __iter__(self) -> Any:
        if torch.utils.data.get_worker_info() is not None:  # a persistent worker: take up the main process's pass
            self.current_epoch = int(self.pass_info[0])
            if not int(self.pass_info[1]):  # an earlier pass in this worker may have stopped early
                self.reset_state_dict()
        return super().__iter__()

    @property
    def source(self) -> str:
        return self.spec

    def _create_shuffler(self, cache: Any) -> Any:  # litdata's hook (overridden, not called from omnissl)
        shuffler = super()._create_shuffler(cache)
        if isinstance(shuffler, FullShuffle):
            return GlobalShuffle(shuffler.cache, shuffler.seed, shuffler.drop_last, item_window=shuffler.item_window)
        return shuffler


    def __getitem__(self, index: Any) -> Any:
        raw = super().__getitem__(index)
        if "id" not in raw:  # text documents: their place in the set
            raw = {**raw, "id": int(getattr(index, "index", index))}
        # litdata counts epochs from 1; omnissl's samplers and Lightning from 0 (so crops match the manifest's)
        return self.decode(raw, int(self.current_epoch) - 1)


class GlobalShuffle(FullShuffle):
    """litdata's `FullShuffle` that assigns chunks to all ranks as on one node in every epoch.

    NOTE(ref): litdata 0.2.76 re-assigns later epochs within each node (`_associate_within_nodes`, when a node's
    chunks fit its cache): a chunk split between two nodes is then read whole by both, and each node applies
    drop_last to its own count, so with several nodes (litdata's `NNODES`, or world size / GPUs per node)
    ranks saw items twice and got unequal item counts (2 nodes x 1 rank x 2 workers, 45 items, pools of 3:
    24 and 27 items, 42 distinct of 51). The global assignment of epoch 1, re-drawn per epoch, keeps every item
    once and equal counts; what it gives up is a node keeping its chunks in its cache from epoch to epoch."""

    def get_chunks_and_intervals_per_workers(self, distributed_env: Any, num_workers: int, batch_size: int,
                                             current_epoch: int) -> Any:
        one_node = copy.copy(distributed_env)
        one_node.num_nodes = 1
        return super().get_chunks_and_intervals_per_workers(one_node, num_workers, batch_size, current_epoch)


@dataclass
class PoolBatches:
    """collate_fn of `ShardLoader`, run in the DataLoader worker: a pool of decoded items -> {"batches": collated
    batches, "failed": [(name, error)]}. Items with "error" (on_error="skip") are reported, items with "short"
    (under min_samples) dropped; the rest are cut by length under `max_tokens` (`token_batches`, capped at
    `batch_size` items; `length(item)` is an item's size) or are one `batch_size` batch. Collating here, in the
    worker, sends a few batch tensors to the main process instead of every item's."""

    collate: Callable
    max_tokens: int | None
    batch_size: int | None
    length: Callable[[dict], int] | None = None
    per_pool: int | None = None  # set (DDP): every pool is cut into this many batches (`equal_cut`)

    def cut(self, items: list[dict]) -> list[list[dict]]:
        if self.max_tokens is None:
            return [items] if items else []
        assert self.length is not None
        sizes = np.array([self.length(it) for it in items], dtype=np.int64)
        if len(sizes) and sizes.max() > self.max_tokens:
            raise ValueError(f"an item of {int(sizes.max())} exceeds max_tokens={self.max_tokens}: raise "
                             "max_tokens or lower max_samples")
        if self.per_pool is not None:
            groups = equal_cut(sizes, self.per_pool)
        else:
            groups = token_batches(np.arange(len(items)), sizes, max_tokens=self.max_tokens,
                                   batch_size=self.batch_size)
        return [[items[i] for i in g] for g in groups]

    def __call__(self, pool: Sequence[dict]) -> dict:
        failed = [(it.get("file", it["error"]), it["error"]) for it in pool if "error" in it]
        good = [it for it in pool if "error" not in it and not it.get("short")]
        return {"batches": pack_batches([self.collate(g) for g in self.cut(good)]), "failed": failed}


def batches_per_pool(pool: int, *, max_tokens: int, longest: int, batch_size: int | None) -> int:
    """How many batches `equal_cut` makes of a pool under DDP: as many as a pool of `pool` items of the longest
    length (`longest`, the crop) needs under `max_tokens` and `batch_size`, so every cut fits the budget."""
    per_batch = max_tokens // longest
    if per_batch < 1:
        raise ValueError(f"max_tokens={max_tokens} holds no item of {longest} (max_samples): raise max_tokens")
    if batch_size is not None:
        per_batch = min(per_batch, batch_size)
    return -(-pool // per_batch)


def equal_cut(sizes: np.ndarray, parts: int) -> list[list[int]]:
    """Items (their `sizes`) sorted by length and cut into `parts` contiguous batches of sizes differing by at
    most one (the larger ones on the short side): a batch count that is the same on every rank, whatever the
    lengths. Fewer items than `parts`: one batch each."""
    order = np.argsort(np.asarray(sizes, dtype=np.int64), kind="stable").tolist()
    parts = min(parts, len(order))
    if parts == 0:
        return []
    small, extra = divmod(len(order), parts)
    out, at = [], 0
    for k in range(parts):
        n = small + (k < extra)
        out.append(order[at : at + n])
        at += n
    return out


BATCH_FIELDS = ("inputs", "lengths", "targets", "segments")


def pack_batches(batches: list[Batch]) -> dict:
    """A pool's collated batches with all their tensors in one flat buffer per dtype (`unpack_batches` gives
    them back as views). A DataLoader worker hands each tensor storage to the main process through its own
    file descriptor, a socket connection with a handshake each (torch's `file_descriptor` sharing strategy):
    ~30 tensors per pool cost more than decoding the pool; one buffer per dtype costs one handshake each. The
    buffers are put in shared memory here, where sending a tensor would copy it anyway, so packing adds no copy.
    In the main process (no workers) there is nothing to send: the batches stay as they are."""
    if torch.utils.data.get_worker_info() is None:
        return {"batches": batches}
    parts: dict[torch.dtype, list[Tensor]] = {}
    sizes: dict[torch.dtype, int] = {}
    layout = []

    def place(t: Tensor) -> tuple:
        spec = (t.dtype, sizes.get(t.dtype, 0), tuple(t.shape))
        parts.setdefault(t.dtype, []).append(t.reshape(-1))
        sizes[t.dtype] = spec[1] + int(t.numel())
        return spec

    for b in batches:
        fields = {field: {name: place(t) for name, t in getattr(b, field).items()} for field in BATCH_FIELDS}
        if b.ids is not None:
            fields["ids"] = {"": place(b.ids)}
        layout.append(fields)
    buffers = {d: torch.cat(ts, out=torch.empty(sizes[d], dtype=d).share_memory_()) for d, ts in parts.items()}
    return {"buffers": buffers, "layout": layout}


def unpack_batches(packed: dict) -> list[Batch]:
    """The batches of `pack_batches`, their tensors views of the pool's buffers."""
    if "batches" in packed:
        return packed["batches"]
    buffers = packed["buffers"]

    def view(spec: tuple) -> Tensor:
        dtype, start, shape = spec
        return buffers[dtype][start : start + math.prod(shape)].view(shape)

    out = []
    for fields in packed["layout"]:
        parts = {f: {name: view(spec) for name, spec in fields[f].items()} for f in BATCH_FIELDS}
        ids = view(fields["ids"][""]) if "ids" in fields else None
        out.append(Batch(parts["inputs"], parts["lengths"], parts["targets"], ids, parts["segments"]))
    return out


class ShardLoader(StreamingDataLoader):
    """litdata's `StreamingDataLoader` over a `ShardItems`, yielding collated batches (module docstring).

    Each litdata batch is a pool of `pool` decoded items, cut into collated batches in the worker
    (`PoolBatches`); items that failed (on_error="skip") are counted in `skips`. A pass in which every item
    failed raises `ShardDataError`.
    Without `max_tokens` the loader has a length (pools); with it the batch count is unknown in advance and
    `len()` raises TypeError (Lightning then runs the epoch to its end)."""

    def __init__(self, dataset: ShardItems, *, collate: Callable, pool: int,
                 length: Callable[[dict], int] | None = None, longest: int | None = None,
                 max_tokens: int | None, batch_size: int | None, num_workers: int, split: str = "train",
                 skips: SkipLog | None = None, trainer: Any = None) -> None:
        if max_tokens is None and batch_size is None:
            raise ValueError("set max_tokens, batch_size or both")
        if max_tokens is not None and length is None:
            raise ValueError("max_tokens batches need the items' `length`")
        pool = int(batch_size if max_tokens is None else pool)
        if pool <= 0:
            raise ValueError(f"the shard pool must hold at least one item, got {pool}")
        per_pool = None
        if dataset.world > 1 and max_tokens is not None:  # equal steps on every rank (ShardItems)
            if longest is None:
                raise ValueError(f"{split} data {dataset.source}: under DDP, streamed max_tokens batches need "
                                 "max_samples (every rank cuts each pool into the batches its longest items would "
                                 "need, so that all ranks run the same number of steps)")
            per_pool = batches_per_pool(pool, max_tokens=max_tokens, longest=longest, batch_size=batch_size)
        super().__init__(dataset, batch_size=pool, num_workers=num_workers, persistent_workers=num_workers > 0,
                         collate_fn=PoolBatches(collate, max_tokens, batch_size, length, per_pool))
        self.max_tokens = max_tokens
        self.split = split
        self.skips = skips if skips is not None else SkipLog("shard item")
        # batches the consumer fetches ahead of training: Lightning's fit loop prefetches one batch from a loader
        # without a length (lightning/pytorch/loops/fetchers.py, _PrefetchDataFetcher), none from one with a length
        self.lookahead = 1 if trainer is not None and max_tokens is not None else 0
        self.produced = 0  # batches handed out in this pass
        self.marks: list[tuple[int, dict]] = []  # (batches handed out before a pool, litdata state at its start)
        self.alive = False  # a pass is under way
        self.skip_next = 0  # batches of the first pool to skip (a resumed pool)
        self.skipped = 0

    def __len__(self) -> int:
        if self.max_tokens is not None:
            raise TypeError("a max_tokens ShardLoader has no length: its batch count depends on the items")
        return super().__len__()

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        skip, self.skip_next = self.skip_next, 0
        failed: list[str] = []
        yielded = 0
        self.produced, self.marks, self.alive = 0, [], True
        try:
            for pool in super().__iter__():
                self.marks = [*self.marks[-3:], (self.produced - skip, self.pool_start_state())]
                for name, error in pool["failed"]:
                    failed.append(error)
                    self.skips.add(name, error, warn=False)
                for k, batch in enumerate(unpack_batches(pool["batches"])):
                    if k < skip:  # a resumed pool: its first batches were trained on before
                        continue
                    self.produced += 1
                    yielded += 1
                    yield batch
                skip = 0
        finally:
            self.alive = False
            if failed:
                self.skipped += len(failed)
                log.warning("%s data: skipped %d undecodable shard items this epoch (on_error='skip'); first: %s",
                            self.split, len(failed), " | ".join(failed[:3]))
        if failed and not yielded:
            raise ShardDataError(f"{self.split} data: every item of {self.dataset.source} failed to decode this "
                                 f"epoch ({len(failed)} skipped; first: {failed[0]}): an epoch without a batch "
                                 "would repeat forever")

    def pool_start_state(self) -> dict[str, Any]:
        """litdata's loader state just before the pool it has just handed out (it counts `batch_size` items per
        pool and takes pools from its workers in turn)."""
        kept = self._num_samples_yielded_streaming, self._latest_worker_idx
        self._num_samples_yielded_streaming -= int(self.batch_size)
        self._latest_worker_idx = (self._latest_worker_idx - 1) % max(1, self.num_workers)
        try:
            return copy.deepcopy(super().state_dict())
        finally:
            self._num_samples_yielded_streaming, self._latest_worker_idx = kept

    def state_dict(self) -> dict[str, Any]:
        """{"litdata": litdata's state at the start of the pool holding the next batch to train on, "pool_done":
        that pool's batches already trained on, "epoch"}. Batches handed out but not trained on (`lookahead`: the
        consumer fetches that many ahead while the pass runs) are handed out again after a resume."""
        if not self.alive or not self.marks:
            return {"litdata": copy.deepcopy(super().state_dict()), "pool_done": 0, "epoch": self.current_epoch}
        consumed = max(0, self.produced - self.lookahead)
        before, state = next((b, st) for b, st in reversed(self.marks) if b <= consumed)
        return {"litdata": state, "pool_done": consumed - before, "epoch": self.current_epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not {"litdata", "pool_done", "epoch"} <= set(state):
            raise ValueError(f"a shard loader state needs 'litdata', 'pool_done' and 'epoch', got {sorted(state)}")
        super().load_state_dict(copy.deepcopy(state["litdata"]))
        if self._iterator is not None:  # persistent workers of an earlier pass: fork new ones that replay the state
            self._iterator._shutdown_workers()
            self._iterator = None
        self.skip_next = int(state["pool_done"])
        if not self.restore and int(state["litdata"]["num_samples_yielded"]) == 0:
            self.current_epoch = int(state["epoch"]) - 1  # the pass restarts that epoch (__iter__ adds one)
