import pytest
import torch

from omnissl.backbones import builders
from omnissl.datamodules.synthetic import SyntheticDataModule
from omnissl.eval.probe import linear_probe_accuracy, pooled_features, probe_layers


def test_pooled_features_ignore_padding_and_need_no_grad():
    enc = builders.tiny("audio")
    dm = SyntheticDataModule(modality="audio", train_size=8, batch_size=4)
    feats, labels = pooled_features(enc, dm.train_dataloader(), "audio")
    assert feats.shape == (8, 3, 64) and labels.shape == (8,)
    assert all(p.grad is None for p in enc.parameters()) and enc.training
    # one padded utterance pooled alone equals its pooling inside the padded batch
    batch = next(iter(dm.train_dataloader()))
    i = int(batch.lengths["audio"].argmin())
    n = int(batch.lengths["audio"][i])
    from omnissl.batch import Batch

    alone = Batch({"audio": batch.inputs["audio"][i:i + 1, :n]}, targets={"label": batch.targets["label"][i:i + 1]})
    f_alone, _ = pooled_features(enc, [alone], "audio")
    f_batch, _ = pooled_features(enc, [batch], "audio")
    torch.testing.assert_close(f_alone[0], f_batch[i], atol=1e-4, rtol=1e-4)


def test_probe_separates_synthetic_classes_and_rejects_unseen_labels():
    dm = SyntheticDataModule(modality="audio", train_size=48, val_size=24, batch_size=8)
    acc = probe_layers(builders.tiny("audio"), dm.train_dataloader(), dm.val_dataloader(), "audio", layers=[0])
    assert acc[0] > 0.9  # pitch classes are linearly separable even from random features
    with pytest.raises(ValueError, match=r"test labels \[7\] never occur"):
        linear_probe_accuracy(torch.randn(4, 2), torch.tensor([0, 1, 0, 1]), torch.randn(2, 2), torch.tensor([7, 0]))
