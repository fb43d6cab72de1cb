"""Pictures of a run (omnissl/train/pictures.py): drawn from real tiny fits of the objectives (the codebook of
wav2vec 2.0 through a hook on its quantizer, data2vec's logged variances, the run summary), and unit usage /
purity from HuBERT-style batches."""

from types import SimpleNamespace

import lightning as L
import pytest
import torch
from PIL import Image

from omnissl.backbones.builders import tiny
from omnissl.batch import Batch
from omnissl.datamodules.synthetic import SyntheticDataModule
from omnissl.ssl.data2vec import Data2Vec
from omnissl.ssl.wav2vec2 import Wav2Vec2
from omnissl.train.pictures import Pictures, purity


def fit(model, tmp_path, pictures):
    data = SyntheticDataModule(modality="audio", batch_size=4, min_samples=8000, max_samples=16000, train_size=16,
                               valid_size=4)
    trainer = L.Trainer(accelerator="cpu", max_steps=4, limit_val_batches=1, val_check_interval=2,
                        check_val_every_n_epoch=None, log_every_n_steps=1, default_root_dir=str(tmp_path),
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[pictures])
    trainer.fit(model, data)
    return sorted(p.name for p in (tmp_path / "figures").glob("*.png"))


def test_wav2vec2_codebook_usage_and_run_summary(tmp_path):
    torch.manual_seed(0)
    model = Wav2Vec2(tiny("audio"), final_dim=32, codebook_groups=2, codebook_entries=16, num_distractors=5,
                     mask_length=5)
    pictures = Pictures(every_n_steps=2)
    names = fit(model, tmp_path, pictures)
    assert names == ["pictures-codebook_usage-step2.png", "pictures-codebook_usage-step4.png",
                     "pictures-run_summary-step4.png"]
    # every chosen code of the 4 steps' masked frames was counted, per group, by the hook on the quantizer
    assert [s for s, _ in pictures.entries_used] == [1, 2, 3, 4]  # one window per logger step
    assert all(0 < used <= 16 for _, groups in pictures.entries_used for used in groups)
    assert len(pictures.history["train/code_perplexity"]) == 4 and "val/loss" in pictures.history
    assert pictures.hook is None  # removed after fit
    width, height = Image.open(tmp_path / "figures" / names[-1]).size
    assert width > 800 and height > 300


def test_data2vec_target_variance(tmp_path):
    torch.manual_seed(0)
    model = Data2Vec(tiny("audio"), mask_prob=0.65, mask_length=5, top_k=2, min_target_var=0.01)
    pictures = Pictures(summary=False)
    assert fit(model, tmp_path, pictures) == ["pictures-target_variance-step4.png"]
    assert [s for s, _ in pictures.history["train/pred_var"]] == [1, 2, 3, 4]


def test_unit_usage_and_purity(tmp_path):
    assert purity(torch.tensor([[5, 0], [0, 5]])) == (1.0, 1.0)
    assert purity(torch.tensor([[3, 1], [1, 3], [0, 0]])) == (0.75, 0.75)
    assert purity(torch.tensor([[4, 4]])) == (0.5, 1.0)  # one unit for everything: pure labels, impure unit
    pictures = Pictures()
    # units follow the utterance label exactly (label 0 -> units 0-1, label 1 -> units 2-3), then padding
    units = torch.tensor([[0, 1, 0, -100], [2, 3, 3, 2], [1, 1, -100, -100]])
    batch = Batch(inputs={"audio": torch.zeros(3, 400)}, targets={"units": units, "label": torch.tensor([0, 1, 0])})
    trainer = SimpleNamespace(global_step=1, log_every_n_steps=1, callback_metrics={}, callbacks=[], is_global_zero=True,
                              default_root_dir=str(tmp_path), loggers=[])
    pictures.on_train_batch_end(trainer, None, None, batch, 0)
    assert pictures.unit_counts.tolist() == [2, 3, 2, 2]
    pictures.draw_usage(trainer, None)
    assert pictures.purities == [(1, 1.0, pytest.approx(5 / 9))]  # each label spreads over 2 units
    assert (tmp_path / "figures" / "pictures-unit_usage-step1.png").is_file()


def test_online_probe_points_land_at_their_steps_including_the_last(tmp_path):
    from omnissl.eval.online_probe import OnlineProbe

    probe = OnlineProbe.__new__(OnlineProbe)  # its state only: the probe itself is tested in test_online_probe.py
    probe.num_probes, probe.last_step, probe.metrics = 0, -1, {}
    pictures = Pictures()
    trainer = SimpleNamespace(global_step=0, log_every_n_steps=1000, callback_metrics={}, callbacks=[pictures, probe],
                              is_global_zero=True, default_root_dir=str(tmp_path), loggers=[])
    for step in range(1, 5):
        trainer.global_step = step
        pictures.on_train_batch_end(trainer, None, None, None, 0)  # Pictures' hook runs before the probe's
        if step % 2 == 0:
            probe.num_probes, probe.last_step = probe.num_probes + 1, step
            probe.metrics = {"probe/acc": step / 10, "probe/loss": 1.0}
    pictures.history["train/loss"] = [(1, 2.0), (4, 1.0)]
    pictures.on_fit_end(trainer, SimpleNamespace())
    assert pictures.history["probe/acc"] == [(2, 0.2), (4, 0.4)]
    assert (tmp_path / "figures" / "pictures-run_summary-step4.png").is_file()
