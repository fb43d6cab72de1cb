"""`BucketBatchSampler`: length-bucketed batches under a token budget, deterministic per (seed, epoch) and
DDP-aware. Generic (any dataset with per-item lengths); `AudioDataModule` batches with it."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import BatchSampler, DistributedSampler


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


class EpochHolder:
    """The `sampler` of a `BucketBatchSampler` outside DDP: where Lightning's `set_epoch` lands."""

    def __init__(self) -> None:
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
