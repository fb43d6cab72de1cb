"""Every DataModule shows one surface: split arguments train / valid / test, dataset(split), loader(split),
classes / num_classes (None when unlabeled) and skipped."""

from __future__ import annotations

import inspect

import pytest

from omnissl.batch import Batch
from omnissl.datamodules.audio import AudioDataModule
from omnissl.datamodules.audio_text import AudioTextDataModule
from omnissl.datamodules.base import DataModule
from omnissl.datamodules.image import ImageDataModule
from omnissl.datamodules.labeled import LabeledImageDataModule, LabeledTextDataModule
from omnissl.datamodules.synthetic import SyntheticDataModule
from omnissl.datamodules.text import TextDataModule

FILE_BACKED = [AudioDataModule, AudioTextDataModule, ImageDataModule, LabeledImageDataModule, LabeledTextDataModule,
               TextDataModule]


@pytest.mark.parametrize("cls", FILE_BACKED, ids=lambda c: c.__name__)
def test_split_arguments_are_train_valid_test(cls):
    params = inspect.signature(cls.__init__).parameters
    assert {"train", "valid", "test"} <= set(params), cls.__name__
    assert issubclass(cls, DataModule)


def test_synthetic_shows_the_same_surface():
    dm = SyntheticDataModule(modality="text", train_size=8, valid_size=4, batch_size=4, num_classes=3)
    dm.setup("fit")
    assert dm.classes == ["0", "1", "2"] and dm.num_classes == 3 and dm.skipped == {}
    assert len(dm.dataset("train")) == 8 and dm.dataset("test") is None and dm.loader("test") == []
    batch = next(iter(dm.loader("train", shuffle=False)))
    assert isinstance(batch, Batch) and batch.ids.tolist() == [0, 1, 2, 3]
    assert len(list(dm.val_dataloader())) == 1
