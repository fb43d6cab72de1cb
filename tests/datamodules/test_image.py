"""ImageDataModule: decoding, 3-channel conversion, MAE transforms with the configured normalization."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from omnissl.batch import Batch
from omnissl.datamodules.image import (IMAGENET_MEAN, IMAGENET_STD, ImageDataModule, ImageDataset, eval_transform,
                                       list_images, load_rgb, train_transform)

pytestmark = pytest.mark.usefixtures("data_root")  # tests/datamodules/conftest.py


def write(path: Path, array: np.ndarray, mode: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(array)
    if mode:
        im = im.convert(mode)
    im.save(path)
    return path


@pytest.fixture()
def folder(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    for i in range(6):
        write(root / f"img{i}.png", rng.integers(0, 256, (20 + i, 30, 3), dtype=np.uint8))
    write(root / "gray.png", rng.integers(0, 256, (17, 23), dtype=np.uint8))
    write(root / "palette.gif", rng.integers(0, 256, (12, 12, 3), dtype=np.uint8), mode="P")
    return root


@pytest.mark.parametrize("image_size", [8, 24, 37])
def test_constant_image_maps_to_the_normalized_value(tmp_path, image_size):
    color = (10, 128, 250)
    path = write(tmp_path / "c.png", np.broadcast_to(np.array(color, np.uint8), (40, 50, 3)).copy())
    mean, std = (0.5, 0.25, 0.75), (0.5, 0.2, 0.1)
    expected = torch.tensor([(c / 255 - m) / s for c, m, s in zip(color, mean, std)]).view(3, 1, 1)
    for transform in (train_transform(image_size, mean, std), eval_transform(image_size, mean, std)):
        out = transform(load_rgb(path))
        assert out.shape == (3, image_size, image_size) and out.dtype == torch.float32
        assert torch.allclose(out, expected.expand_as(out), atol=1e-3)


def test_grayscale_becomes_three_equal_channels(tmp_path):
    path = write(tmp_path / "g.png", np.arange(64, dtype=np.uint8).reshape(8, 8) * 3)
    x = load_rgb(path)
    assert x.shape == (3, 8, 8) and x.dtype == torch.uint8
    assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])
    assert x[0, 2, 5].item() == (2 * 8 + 5) * 3
    # 16-bit grayscale and RGBA convert too
    assert load_rgb(write(tmp_path / "rgba.png", np.zeros((5, 6, 4), np.uint8))).shape == (3, 5, 6)


def test_eval_transform_is_resize_then_center_crop(tmp_path):
    # left half black, right half white: the center crop of a 2:1 image keeps the middle, half and half
    arr = np.zeros((32, 64, 3), np.uint8)
    arr[:, 32:] = 255
    out = eval_transform(16, (0, 0, 0), (1, 1, 1), crop_pct=1.0)(load_rgb(write(tmp_path / "h.png", arr)))
    assert out.shape == (3, 16, 16)
    assert out[:, :, :6].max() < 0.05 and out[:, :, -6:].min() > 0.95


def test_datamodule_yields_batches_of_any_size(folder):
    dm = ImageDataModule(train=str(folder), valid=str(folder), image_size=20, batch_size=4, num_workers=0)
    dm.prepare_data()
    dm.setup("fit")
    assert len(dm.dataset("train")) == 8
    batch = next(iter(dm.train_dataloader()))
    assert isinstance(batch, Batch) and batch.inputs["image"].shape == (4, 3, 20, 20)
    val = next(iter(dm.val_dataloader()))
    # the mean of a uniform-noise image, normalized with ImageNet statistics, is near (0.5 - mean) / std
    expected = (0.5 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert torch.allclose(val.inputs["image"][:3].mean(dim=(0, 2, 3)), expected, atol=0.15)


def test_folder_layouts_and_file_lists(tmp_path, folder):
    for cls in ("cat", "dog"):
        write(tmp_path / "classes" / cls / "a.png", np.zeros((4, 4, 3), np.uint8))
    assert [(p.parent.name, lab) for p, lab in list_images(tmp_path / "classes")] == [("cat", "cat"), ("dog", "dog")]
    assert all(lab is None for _, lab in list_images(folder))
    with_root = tmp_path / "with_root.tsv"
    with_root.write_text(f"{folder}\nimg0.png\t600\nimg1.png\t630\tcat\n")
    assert list_images(with_root) == [(folder / "img0.png", None), (folder / "img1.png", "cat")]
    plain = folder / "list.txt"
    plain.write_text("img2.png\ngray.png\n")
    assert list_images(plain) == [(folder / "img2.png", None), (folder / "gray.png", None)]


@pytest.mark.parametrize("content", [b"", b"\x89PNG\r\n\x1a\n" + b"\x00" * 10, "truncated"],
                         ids=["empty", "bad-header", "truncated"])
def test_undecodable_image_is_named_or_skipped(tmp_path, folder, content):
    bad = folder / "bad.png"
    if content == "truncated":
        good = (folder / "img0.png").read_bytes()
        content = good[: len(good) // 2]
    bad.write_bytes(content)
    files = sorted(folder.glob("*.png"))
    index = files.index(bad)
    ds = ImageDataset(files, eval_transform(8, IMAGENET_MEAN, IMAGENET_STD))
    with pytest.raises(ValueError, match=r"bad\.png: cannot decode image"):
        ds[index]
    ds = ImageDataset(files, eval_transform(8, IMAGENET_MEAN, IMAGENET_STD), on_error="skip")
    with pytest.warns(UserWarning, match=r"skipping image .*bad\.png"):
        item = ds[index]
    assert item["id"] == (index + 1) % len(files) and item["image"].shape == (3, 8, 8)
    assert list(ds.skipped) == [str(bad)]
    # through the DataModule: every other image still comes out, the skip is counted
    dm = ImageDataModule(train=str(folder), valid_fraction=0.0, image_size=8, batch_size=3, num_workers=0,
                         on_error="skip")
    dm.setup("fit")
    with pytest.warns(UserWarning):
        ids = [int(i) for b in dm.train_dataloader() for i in b.ids]
    assert len(ids) == len(dm.dataset("train")) and len(dm.skipped) == 1


def test_empty_folder_fails_in_setup(tmp_path):
    (tmp_path / "empty").mkdir()
    dm = ImageDataModule(train=str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="no images found"):
        dm.setup("fit")


def test_shuffling_is_deterministic_per_epoch(folder):
    def order(epoch):
        dm = ImageDataModule(train=str(folder), valid_fraction=0.0, image_size=8, batch_size=2, num_workers=0,
                             seed=3)
        dm.setup("fit")
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(epoch)
        return [int(i) for b in loader for i in b.ids]

    assert order(0) == order(0) and order(0) != order(1)


def test_embedded_images():
    dm = ImageDataModule(embedded_size="tiny", image_size=16, batch_size=8, num_workers=0)
    dm.prepare_data()
    dm.setup("fit")
    assert len(dm.dataset("train")) + len(dm.dataset("valid")) == 32
    batch = next(iter(dm.train_dataloader()))
    assert batch.inputs["image"].shape == (8, 3, 16, 16) and torch.isfinite(batch.inputs["image"]).all()
