"""HuBERT: unit alignment, the cosine cross-entropy against a naive reference, masked-only loss,
unit-file checks before training, short utterances, loss goes down."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import soundfile as sf
import torch
import torch.nn.functional as F

from omnissl.backbones.builders import tiny
from omnissl.batch import IGNORE_INDEX, Batch
from omnissl.datamodules.collate import Collate
from omnissl.datamodules.synthetic import SyntheticDataset
from omnissl.ssl.hubert import HuBERT
from omnissl.ssl.losses import cosine_cross_entropy
from omnissl.ssl.frames import encoder_frames
from omnissl.ssl.targets import align_units


def units_for(encoder, lengths, k=10, seed=0, extra=0):
    g = torch.Generator().manual_seed(seed)
    frames = encoder_frames(encoder, torch.tensor(lengths)) + extra
    units = torch.full((len(lengths), int(frames.max())), IGNORE_INDEX)
    for i, f in enumerate(frames.tolist()):
        units[i, :f] = torch.randint(0, k, (f,), generator=g)
    return units


def hubert_batch(encoder, lengths, ids=None, k=10, extra=0):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(len(lengths), max(lengths), generator=g) * 0.1
    lens = torch.tensor(lengths)
    x = x.masked_fill(torch.arange(x.shape[1])[None] >= lens[:, None], 0.0)
    ids = torch.arange(len(lengths)) if ids is None else torch.tensor(ids)
    return Batch({"audio": x}, {"audio": lens}, {"units": units_for(encoder, lengths, k, extra=extra)}, ids)


def test_align_units_trims_and_names_mismatches():
    units = torch.tensor([[1, 2, 3, 4, 5], [6, 7, 8, -100, -100]])
    labels, keep = align_units(units, torch.tensor([4, 4]), 6)
    assert keep.tolist() == [4, 3]
    assert labels.tolist() == [[1, 2, 3, 4, -100, -100], [6, 7, 8, -100, -100, -100]]
    with pytest.raises(ValueError, match=r"samples \[42\].*\[3\] units vs \[9\] frames"):
        align_units(units, torch.tensor([5, 9]), 9, ids=torch.tensor([41, 42]))


def test_cosine_cross_entropy_matches_fairseq_compute_nce():
    g = torch.Generator().manual_seed(0)
    pred, emb = torch.randn(12, 8, generator=g), torch.randn(5, 8, generator=g)
    labels = torch.randint(0, 5, (12,), generator=g)
    loss, count, correct = cosine_cross_entropy(pred, emb, labels, temperature=0.1)
    # fairseq compute_nce: positive first, then every other class embedding as a negative
    pos = emb[labels]
    negs = torch.stack([torch.cat([emb[:c], emb[c + 1:]]) for c in labels.tolist()])  # (P, K-1, D)
    logits = torch.cat([F.cosine_similarity(pred, pos, -1)[:, None],
                        F.cosine_similarity(pred[:, None], negs, -1)], 1) / 0.1
    ref = F.cross_entropy(logits, torch.zeros(12, dtype=torch.long), reduction="sum")
    torch.testing.assert_close(loss, ref)
    hits = ((pred @ F.normalize(emb, dim=-1).t()).argmax(-1) == labels).sum()
    assert count.item() == 12 and correct.item() == int(hits)


def test_step_metrics_and_masked_only_loss():
    enc = tiny("audio")
    model = HuBERT(enc, num_classes=10).eval()  # eval: no dropout, so two steps see the same network
    batch = hubert_batch(enc, [16000, 12000, 9600])
    out = model.step(batch)
    assert {"loss_m", "loss_u", "acc_m", "acc_u", "feature_pen", "masked_frac"} <= set(out.metrics)
    assert 0.3 < float(out.metrics["masked_frac"]) < 0.8
    units = batch.targets["units"]
    mask = _mask_of(model, batch, units.shape[1])  # the objective draws the same mask from its generator
    shifted = torch.where(units >= 0, (units + 1) % 10, units)

    def step(new):
        return model.step(Batch(batch.inputs, batch.lengths, {"units": new}, batch.ids))

    # unmasked weight 0 (base): other labels at unmasked frames change loss_u, not the loss
    out_u = step(torch.where(mask, units, shifted))
    torch.testing.assert_close(out_u.loss, out.loss)
    assert not torch.allclose(out_u.metrics["loss_u"], out.metrics["loss_u"])
    out_m = step(torch.where(mask, shifted, units))
    assert not torch.allclose(out_m.loss, out.loss)
    torch.testing.assert_close(out_m.metrics["loss_u"], out.metrics["loss_u"])


def _mask_of(model, batch, n):
    """The span mask the objective draws for this batch (same generator, same padding)."""
    from omnissl.ssl.masking import span_mask

    enc = model.encoder
    tokens = enc.embed(batch.inputs["audio"], batch.lengths["audio"])
    frames = n - (tokens.padding_mask.sum(1) if tokens.padding_mask is not None else 0)
    _, keep = align_units(batch.targets["units"], frames, n)
    pad = torch.arange(n)[None] >= keep[:, None]
    return span_mask((batch.batch_size, n), padding_mask=pad if pad.any() else None, mask_prob=model.mask_prob,
                     span=model.mask_length, min_spans=model.min_spans, generator=model.generator())


def test_units_longer_or_shorter_by_a_frame_are_aligned_more_is_an_error():
    enc = tiny("audio")
    model = HuBERT(enc, num_classes=10)
    assert torch.isfinite(model.step(hubert_batch(enc, [16000, 12000], extra=1)).loss)
    with pytest.raises(ValueError, match=r"samples \[5, 6\]"):
        model.step(hubert_batch(enc, [16000, 12000], ids=[5, 6], extra=5))


def test_unit_ids_out_of_range_are_named():
    enc = tiny("audio")
    with pytest.raises(ValueError, match=r"outside \[0, 4\).*samples \[0, 1\]"):
        HuBERT(enc, num_classes=4).step(hubert_batch(enc, [16000, 12000], k=10))


def test_short_utterances_dropped_or_named():
    enc = tiny("audio")
    batch = hubert_batch(enc, [16000, 2000, 12000], ids=[3, 4, 5])
    out = HuBERT(enc, num_classes=10).step(batch)
    assert out.metrics["dropped_short"] == 1.0 and out.batch_size == 2
    with pytest.raises(ValueError, match=r"samples \[4\]"):
        HuBERT(enc, num_classes=10, short_utterances="raise").step(batch)


class _UnitData(L.LightningDataModule):
    """Synthetic tones whose frame units are the utterance's pitch class: learnable targets."""

    def __init__(self, n=48, batch_size=8):
        super().__init__()
        self.ds = SyntheticDataset(modality="audio", size=n, seed=0, min_samples=8000, max_samples=12000,
                                   vocab_size=0, seq_len=0, image_size=0, num_classes=4)
        self.batch_size = batch_size
        self.enc = tiny("audio")

    def _items(self):
        for i in range(len(self.ds)):
            it = self.ds[i]
            f = int(encoder_frames(self.enc, torch.tensor([len(it["audio"])]))[0])
            it["units"] = torch.full((f,), it["label"])
            yield it

    def train_dataloader(self):
        return torch.utils.data.DataLoader(list(self._items()), batch_size=self.batch_size, shuffle=True,
                                           collate_fn=Collate(), generator=torch.Generator().manual_seed(0))


class _Losses(L.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def test_loss_goes_down():
    torch.manual_seed(0)
    model = HuBERT(tiny("audio"), num_classes=4, optimizer=lambda p: torch.optim.AdamW(p, lr=2e-3))
    rec = _Losses()
    L.Trainer(max_steps=30, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, callbacks=[rec]).fit(model, _UnitData())
    first, last = sum(rec.losses[:5]) / 5, sum(rec.losses[-5:]) / 5
    assert last < first - 0.2, (first, last)


def _corpus(tmp_path, n=4):
    (tmp_path / "wav").mkdir()
    rows = []
    rng = np.random.default_rng(0)
    for i in range(n):
        num = 16000 + 3200 * i
        sf.write(tmp_path / "wav" / f"{i}.wav", (0.1 * rng.standard_normal(num)).astype(np.float32), 16000)
        rows.append(f"wav/{i}.wav\t{num}")
    (tmp_path / "train.tsv").write_text(f"{tmp_path}\n" + "\n".join(rows) + "\n")
    return tmp_path / "train.tsv", [16000 + 3200 * i for i in range(n)]


def test_fit_fails_before_training_on_units_that_do_not_match(tmp_path):
    """The data module checks every item's units against its audio as it loads it (HuBERT itself does not
    re-read the unit files): the first batch fails, naming the manifest line and the unit file."""
    from omnissl.datamodules.audio import AudioDataError, AudioDataModule

    manifest, sizes = _corpus(tmp_path)
    # right number of lines, but half the frames: only a per-line check catches it before step 1
    (tmp_path / "train.km").write_text("".join(" ".join(["1"] * (n // 640)) + "\n" for n in sizes))
    dm = AudioDataModule(train=str(manifest), max_samples=None, min_samples=0, max_tokens=None,
                         batch_size=2, num_workers=0, units="km")
    model = HuBERT(tiny("audio"), num_classes=10)
    with pytest.raises(AudioDataError, match=r"train\.tsv:\d+: .*train\.km does not match this audio"):
        L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False).fit(model, dm)
    assert model.global_step == 0


@pytest.mark.slow
def test_loss_goes_down_on_embedded_speech_with_mfcc_units(tmp_path):
    """Iteration 1 end to end on the embedded speech corpus: MFCC k-means units (omnissl.eval.units) written
    beside a copy of the manifest, AudioDataModule with units, HuBERT accuracy and loss improve."""
    from omnissl.datamodules.audio import AudioDataModule
    from omnissl.datamodules.corpora import embedded_corpus
    from omnissl.eval.units import make_units

    src = embedded_corpus("embedded:small", size="default")["train"]
    lines = src.read_text().splitlines()
    manifest = tmp_path / "train.tsv"
    manifest.write_text("\n".join([str(src.parent)] + lines[1:41]) + "\n")  # 40 utterances
    make_units(manifest, clusters=20, sample_fraction=0.5, n_init=1, out_ext="km")
    torch.manual_seed(0)
    model = HuBERT(tiny("audio"), num_classes=20, optimizer=lambda p: torch.optim.AdamW(p, lr=2e-3))
    dm = AudioDataModule(train=str(manifest), max_samples=48000, min_samples=16000, max_tokens=None,
                         batch_size=8, num_workers=0, units="km")
    rec = _Losses()
    L.Trainer(max_steps=60, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, callbacks=[rec]).fit(model, dm)
    first, last = sum(rec.losses[:10]) / 10, sum(rec.losses[-10:]) / 10
    assert last < first - 0.2, (first, last)
