import lightning as L
import torch

from omnissl.backbones import builders
from omnissl.batch import Batch
from omnissl.datamodules.synthetic import SyntheticDataModule
from omnissl.ssl.mae import MAE


def _mae(modality="image", **kw):
    enc = builders.tiny("image" if modality == "image" else "spectrogram")
    return MAE(enc, modality=modality, decoder_dim=32, decoder_depth=1, decoder_heads=4, **kw)


def test_mae_loss_only_on_removed_patches():
    torch.manual_seed(0)
    model = _mae(mask_ratio=0.75)
    x = torch.randn(2, 3, 32, 32)
    out = model.step(Batch({"image": x}))
    assert out.metrics["masked_frac"] == 0.75  # 48 of 64 patches removed in each row
    # changing pixels only in kept patches changes the loss target nowhere: recompute with the same masks
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    model.generator = lambda device=None: g1
    a = model.step(Batch({"image": x})).loss
    model.generator = lambda device=None: g2
    b = model.step(Batch({"image": x})).loss
    assert torch.equal(a, b)


def test_mae_learns_on_synthetic_images():
    L.seed_everything(0)
    # smooth random fields: without per-patch normalization the content is predictable from neighbours
    model = _mae(mask_ratio=0.75, norm_pix_loss=False, optimizer=lambda p: torch.optim.AdamW(p, lr=2e-3))
    dm = SyntheticDataModule(modality="image", train_size=64, batch_size=16)
    losses = []

    class Rec(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    L.Trainer(max_steps=60, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              limit_val_batches=0, callbacks=[Rec()]).fit(model, dm)
    first, last = sum(losses[:8]) / 8, sum(losses[-8:]) / 8
    assert last < 0.8 * first, (first, last)
