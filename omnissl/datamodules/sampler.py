"""Samplers and loaders whose position is part of the checkpoint, so a resumed run continues mid-epoch exactly.

* `BucketBatchSampler`: length-bucketed batches under a token budget, deterministic per (seed, epoch) and
  DDP-aware. Generic (any dataset with per-item lengths); `AudioDataModule` batches with it.
* `ItemSampler`: a `DistributedSampler` (order a function of (seed, epoch, rank)) yielding (index, epoch) pairs.
* `SeededItems`: `dataset[(i, epoch)]` = `dataset[i]` drawn with torch's CPU generator seeded by (seed, epoch, i),
  so random augmentation (image crops, audio windows) depends on neither the worker nor what ran before it.
* `ResumableLoader`: a DataLoader with `state_dict()` = {"epoch", "batches"} (batches handed out this epoch) and
  `load_state_dict()`; Lightning saves it in every checkpoint (`loops.fit_loop.combined_loader`, any loader with
  both methods) and restores it before the epoch resumes: the next pass skips the batches already trained on,
  at the sampler (nothing is loaded for them). `make_loader` builds one for the plain `batch_size` DataModules.

Together with the masks and dropout being seeded per optimizer step (omnissl/ssl/base.py), a run killed
mid-epoch and resumed from its last checkpoint sees the same batches and the same losses as one never stopped
(tests/train/test_resume.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, DistributedSampler

from omnissl.datamodules.common import stable_hash


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
        self.sampler = sampler if sampler is not None else EpochHolder()
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
        self.start = 0  # batches of this rank to skip on the next pass only (a resumed epoch; ResumableLoader)

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
            batches = token_batches(order, self.lengths, max_tokens=self.max_tokens, batch_size=self.batch_size)
            if self.shuffle:
                batches = [batches[k] for k in rng.permutation(len(batches))]
        if batches and len(batches) % self.num_replicas:
            batches += batches[: self.num_replicas - len(batches) % self.num_replicas]
        self._cache = (self.epoch, batches)
        return batches

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch, start, self.start = self.epoch, self.start, 0
        for batch in self._global_batches()[self.rank :: self.num_replicas][start:]:
            yield [(i, epoch) for i in batch]

    def __len__(self) -> int:
        return len(self._global_batches()) // self.num_replicas


def token_batches(order: np.ndarray, lengths: np.ndarray, *, max_tokens: int,
                  batch_size: int | None = None) -> list[list[int]]:
    """Items `order` (indices into `lengths`) sorted by length (stable: ties keep `order`'s order) and cut
    greedily into batches with `len(batch) * longest <= max_tokens` and `len(batch) <= batch_size`: the one
    length bucketing (`BucketBatchSampler` over a whole split, `ShardLoader` over a streamed pool)."""
    order = np.asarray(order, dtype=np.int64)
    lengths = np.asarray(lengths, dtype=np.int64)
    order = order[np.argsort(lengths[order], kind="stable")]
    cap = batch_size or len(order) + 1
    batches: list[list[int]] = []
    cur: list[int] = []
    longest = 0
    for i, size in zip(order.tolist(), lengths[order].tolist()):
        longest_new = max(longest, size)
        if cur and ((len(cur) + 1) * longest_new > max_tokens or len(cur) == cap):
            batches.append(cur)
            cur, longest_new = [], size
        cur.append(i)
        longest = longest_new
    if cur:
        batches.append(cur)
    return batches


class EpochHolder:
    """The `sampler` of a `BucketBatchSampler` outside DDP: where Lightning's `set_epoch` lands."""

    def __init__(self) -> None:
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)


class ItemSampler(DistributedSampler):
    """`DistributedSampler` (world size 1 outside DDP; Lightning leaves it alone and calls its `set_epoch`) that
    yields (index, epoch) pairs for `SeededItems`; `start` items of this rank are skipped on the next pass only."""

    def __init__(self, dataset: Dataset, **kwargs: Any) -> None:
        super().__init__(dataset, **kwargs)
        self.start = 0

    def __iter__(self) -> Iterator[tuple[int, int]]:  # type: ignore[override]
        epoch, start, self.start = self.epoch, self.start, 0
        for k, i in enumerate(super().__iter__()):
            if k >= start:
                yield (i, epoch)


@contextlib.contextmanager
def item_rng(seed: int, epoch: int, i: int) -> Iterator[None]:
    """Within: torch's CPU generator seeded by (seed, epoch, i); restored after (`SeededItems`, shard decoders)."""
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(stable_hash("item", seed, epoch, i))
        yield


class SeededItems(Dataset):
    """`dataset[(i, epoch)]`: `dataset[i]` with torch's CPU generator seeded by (seed, epoch, i) for the call and
    restored after, so the random transforms of an item are a function of (seed, epoch, i) only (the same in
    any worker, and after a resume). Other attributes are the wrapped dataset's."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int] | int) -> Any:
        i, epoch = key if isinstance(key, tuple) else (key, 0)
        with item_rng(self.seed, epoch, i):
            return self.dataset[i]

    def __getattr__(self, name: str) -> Any:
        if name in ("dataset", "seed") or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.dataset, name)


class ResumableLoader(DataLoader):
    """A DataLoader whose position Lightning checkpoints (module docstring). Its batch sampler is a
    `BucketBatchSampler`, or a `BatchSampler` over an `ItemSampler` (`make_loader`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.batches_done = 0  # batches handed out in the current pass
        self._resume: dict | None = None

    def _holder(self) -> tuple[Any, int]:
        """(the sampler that knows the epoch and takes `start`, sampler units per batch)."""
        bs = self.batch_sampler
        if hasattr(bs, "start"):
            return bs, 1
        if bs is not None and hasattr(getattr(bs, "sampler", None), "start"):
            return bs.sampler, int(bs.batch_size)
        raise TypeError(f"{type(self).__name__} needs a BucketBatchSampler or a BatchSampler over an ItemSampler, "
                        f"got {type(bs).__name__}")

    @property
    def epoch(self) -> int:
        return int(getattr(self._holder()[0], "epoch", 0))

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batches": self.batches_done}

    def load_state_dict(self, state: dict) -> None:
        if not {"epoch", "batches"} <= set(state):
            raise ValueError(f"a data loader state needs 'epoch' and 'batches', got {sorted(state)}")
        self._resume = {"epoch": int(state["epoch"]), "batches": int(state["batches"])}

    def __iter__(self):  # type: ignore[override]
        # a generator: runs at the first next(), after Lightning has set the epoch of the pass
        holder, per_batch = self._holder()
        skip = 0
        if self._resume is not None:
            if self._resume["epoch"] == self.epoch and self._resume["batches"] < len(self):
                skip = self._resume["batches"]
            self._resume = None
        holder.start = skip * per_batch
        self.batches_done = skip
        for batch in super().__iter__():
            self.batches_done += 1
            yield batch


def make_loader(dataset: Dataset, *, trainer: Any, batch_size: int, shuffle: bool, seed: int, num_workers: int,
                collate_fn: Callable, drop_last: bool = False) -> ResumableLoader:
    """A `ResumableLoader` of `batch_size` batches whose order is a function of (seed, epoch, rank) and whose
    items' random transforms are functions of (seed, epoch, index) (`SeededItems`)."""
    world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
    sampler = ItemSampler(dataset, num_replicas=world, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last)
    return ResumableLoader(SeededItems(dataset, seed), batch_size=batch_size, sampler=sampler,
                           num_workers=num_workers, collate_fn=collate_fn, drop_last=drop_last,
                           persistent_workers=num_workers > 0)
