"""`DataModule`: the one surface every omnissl DataModule shows, whatever its modality.

    dm = AudioDataModule(train=..., valid=..., test=...)   # split arguments are always train / valid / test
    dm.prepare_data(); dm.setup()
    dm.dataset("train")      # the split's Dataset; None when the DataModule has no such split
    dm.loader("valid")       # its DataLoader (shuffled for "train" unless shuffle=False); [] for an absent split
    dm.classes               # label vocabulary (the train split's labels, `common.class_index`); None: unlabeled
    dm.num_classes           # len(classes) or None
    dm.skipped               # {file: reason} of the items skipped under on_error="skip" (in this process)

Lightning's hooks are these loaders: train -> "train", val -> "valid", test and predict -> "test". A subclass
fills `self.datasets` (and `self.classes`) in `setup()` and sets `collate`, `batch_size`, `seed`,
`num_workers`; one whose batches are not plain `batch_size` batches overrides `build_loader`.
"""

from __future__ import annotations

from collections.abc import Callable

import lightning as L
from torch.utils.data import DataLoader, Dataset

from omnissl.datamodules.collate import Collate
from omnissl.datamodules.common import SkipLog, holdout, is_embedded
from omnissl.datamodules.corpora import CORPORA, embedded_corpus, parse_embedded
from omnissl.datamodules.sampler import make_loader
from omnissl.datamodules.shards import ShardItems, ShardLoader


class DataModule(L.LightningDataModule):
    """Datasets per split, their loaders, classes and skipped items (see the module docstring)."""

    collate: Collate
    batch_size: int | None
    seed: int
    num_workers: int

    def __init__(self, *, skipping: str = "file") -> None:
        super().__init__()
        self.datasets: dict[str, Dataset] = {}
        self.classes: list[str] | None = None
        self.skips = SkipLog(skipping)

    def dataset(self, split: str) -> Dataset | None:
        """The Dataset of `split` ("train", "valid", "test") after `setup()`; None when there is none."""
        return self.datasets.get(split)

    def loader(self, split: str, *, shuffle: bool | None = None) -> DataLoader | list:
        """The DataLoader of `split` (shuffle: default only for "train"); [] when the split is absent."""
        ds = self.dataset(split)
        if ds is None:
            if split == "train":
                raise RuntimeError(f"{type(self).__name__} has no train data: call setup() before asking for a "
                                   "loader")
            return []
        return self.build_loader(ds, split, split == "train" if shuffle is None else shuffle)

    def build_loader(self, ds: Dataset, split: str, shuffle: bool) -> DataLoader:
        """Plain `batch_size` batches in an order that is a function of (seed, epoch, rank) (`make_loader`); a
        shard set's: litdata's order of (seed, epoch) (`ShardLoader`)."""
        if isinstance(ds, ShardItems):
            ds.set_shuffle(shuffle)
            return ShardLoader(ds, collate=self.collate, pool=int(self.batch_size), max_tokens=None,
                               batch_size=self.batch_size, num_workers=self.num_workers, split=split,
                               skips=self.skips, trainer=self.trainer)
        return make_loader(ds, trainer=self.trainer, batch_size=self.batch_size, shuffle=shuffle, seed=self.seed,
                           num_workers=self.num_workers, collate_fn=self.collate)

    @property
    def num_classes(self) -> int | None:
        return None if self.classes is None else len(self.classes)

    @property
    def skipped(self) -> dict[str, str]:
        """Items skipped under on_error="skip" in this process: {file: reason} (each DataLoader worker process
        counts its own; the audio loaders report their workers' skips here too)."""
        return self.skips.skipped

    def train_dataloader(self) -> DataLoader:
        return self.loader("train")

    def val_dataloader(self) -> DataLoader | list:
        return self.loader("valid")

    def test_dataloader(self) -> DataLoader | list:
        return self.loader("test")

    def predict_dataloader(self) -> DataLoader | list:
        return self.loader("test")


def pretraining_splits(train: str, valid: str | None, test: str | None, *, corpus: str, size: str,
                       valid_fraction: float, read: Callable[[object], list]) -> dict[str, list]:
    """{"train", "valid"[, "test"]: items} of an unlabeled DataModule, `read(source)` listing a source's items.

    An embedded `train` ("embedded:<corpus>[:<size>]") brings its own valid split unless `valid` is given;
    otherwise, without `valid`, a fixed `valid_fraction` of train is held out (always with seed 0: the
    DataModule's seed orders and augments, it does not change the split)."""
    if is_embedded(train):
        name = parse_embedded(train)[0]  # its own corpus, or another of the same modality (e.g. shapes)
        if name != corpus and CORPORA[name].modality != CORPORA[corpus].modality:
            raise ValueError(f"this DataModule reads 'embedded:{corpus}', not {train!r}")
        found = embedded_corpus(train, size=size)
        out = {"train": read(found["train"]), "valid": read(valid or found["valid"])}
    elif valid is not None:
        out = {"train": read(train), "valid": read(valid)}
    else:
        items = read(train)
        keep, held = holdout(len(items), valid_fraction, 0)
        out = {"train": [items[i] for i in keep], "valid": [items[i] for i in held]}
    if test is not None:
        out["test"] = read(test)
    return out
