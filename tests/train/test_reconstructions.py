"""Reconstructions: a short MAE / AudioMAE fit on the embedded corpora writes reconstruction PNGs."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from PIL import Image

from omnissl.backbones import builders
from omnissl.datamodules.audio import AudioDataModule
from omnissl.datamodules.image import ImageDataModule
from omnissl.ssl.mae import MAE
from omnissl.train.reconstructions import Reconstructions


def _fit(tmp_path, model, dm, every=2, steps=4):
    cb = Reconstructions(every_n_steps=every, num_samples=2)
    L.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              limit_val_batches=1, val_check_interval=steps, check_val_every_n_epoch=None,
              num_sanity_val_steps=0, default_root_dir=str(tmp_path), callbacks=[cb]).fit(model, dm)
    return cb, sorted((tmp_path / "figures").glob("*.png"))


def test_short_image_fit_writes_reconstruction_pngs(tmp_path):
    L.seed_everything(0)
    model = MAE(builders.tiny("image", dim=32, depth=1), decoder_dim=16, decoder_depth=1, decoder_heads=2)
    dm = ImageDataModule(train="embedded:images", embedded_size="tiny", image_size=32,
                         batch_size=4, num_workers=0)
    cb, pngs = _fit(tmp_path, model, dm)
    assert [p.name for p in pngs] == ["reconstructions-step2.png", "reconstructions-step4.png"]
    assert cb.split == "valid" and cb.samples.inputs["image"].shape == (2, 3, 32, 32)
    im = Image.open(pngs[0])
    assert im.format == "PNG" and im.size[0] > 150 and im.size[1] > 150
    assert len(set(im.convert("L").getdata())) > 20  # a picture, not a blank canvas


def test_short_audiomae_fit_writes_spectrogram_pngs(tmp_path):
    L.seed_everything(0)
    model = MAE(builders.tiny("spectrogram", dim=32, depth=1), modality="audio", mask_ratio=0.8,
                decoder_dim=16, decoder_depth=1, decoder_heads=2)
    dm = AudioDataModule(train="embedded:tiny", valid="embedded:tiny", max_samples=32_000, min_samples=16_000,
                         max_tokens=None, batch_size=2, num_workers=0)
    _, pngs = _fit(tmp_path, model, dm, every=3, steps=3)
    assert [p.name for p in pngs] == ["reconstructions-step3.png"]
    assert Image.open(pngs[0]).format == "PNG"


def test_needs_an_objective_that_reconstructs():
    with pytest.raises(TypeError, match="reconstruct"):
        Reconstructions().on_fit_start(None, torch.nn.Linear(1, 1))
    with pytest.raises(ValueError, match="every_n_steps"):
        Reconstructions(every_n_steps=0)
