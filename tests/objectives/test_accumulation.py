"""Loss normalization under gradient accumulation (fairseq: the gradient of the loss summed over the whole
update, divided by the update's total count): one Trainer update of two micro-batches with very different
counts gives the gradient of (loss_sum_1 + loss_sum_2) / (count_1 + count_2), for every objective."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch

from omnissl.backbones.builders import tiny
from omnissl.batch import IGNORE_INDEX, Batch
from omnissl.ssl.data2vec import Data2Vec
from omnissl.ssl.data2vec2 import Data2Vec2
from omnissl.ssl.frames import encoder_frames
from omnissl.ssl.heads import ConvDecoder1d
from omnissl.ssl.hubert import HuBERT
from omnissl.ssl.mae import MAE
from omnissl.ssl.mlm import MaskedLM
from omnissl.ssl.wav2vec2 import Wav2Vec2


class RecordGrads(torch.optim.SGD):
    """SGD with lr 0 that keeps a copy of the gradients it is asked to apply (after every hook)."""

    def __init__(self, params) -> None:
        super().__init__(params, lr=0.0)
        self.seen: list[torch.Tensor] = []

    def step(self, closure=None):
        loss = None if closure is None else closure()
        self.seen = [p.grad.clone() for g in self.param_groups for p in g["params"] if p.grad is not None]
        return loss


def summing_copy(model):
    """(a deep copy of `model` in train mode, sums, counts): the copy's `normalize` keeps every micro-batch's
    loss_sum and count in `sums` and `counts` and returns the loss sum as it is, for a reference that divides the
    summed losses by the summed counts once."""
    reference = copy.deepcopy(model)
    sums, counts = [], []
    reference.normalize = lambda loss_sum, count: (sums.append(loss_sum), counts.append(count), loss_sum)[-1]
    reference.train()
    return reference, sums, counts


def grads(model) -> list[torch.Tensor]:
    """The model's gradients in its optimizer's parameter order (the order RecordGrads keeps them in)."""
    return [p.grad for g in model.configure_optimizers().param_groups for p in g["params"] if p.grad is not None]


def audio(lengths, seed, units=False, encoder=None) -> Batch:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(lengths), max(lengths), generator=g) * 0.1
    lens = torch.tensor(lengths)
    x = x.masked_fill(torch.arange(x.shape[1])[None] >= lens[:, None], 0.0)
    targets = {}
    if units:
        frames = encoder_frames(encoder, lens)
        u = torch.full((len(lengths), int(frames.max())), IGNORE_INDEX)
        for i, f in enumerate(frames.tolist()):
            u[i, :f] = torch.randint(0, 10, (f,), generator=g)
        targets["units"] = u
    return Batch({"audio": x}, {"audio": lens}, targets, torch.arange(len(lengths)) + 10 * seed)


def images(n, seed) -> Batch:
    g = torch.Generator().manual_seed(seed)
    return Batch({"image": torch.randn(n, 3, 32, 32, generator=g)}, {}, {}, torch.arange(n) + 10 * seed)


def text(lengths, seed) -> Batch:
    g = torch.Generator().manual_seed(seed)
    lens = torch.tensor(lengths)
    ids = torch.randint(5, 64, (len(lengths), max(lengths)), generator=g)
    ids = ids.masked_fill(torch.arange(ids.shape[1])[None] >= lens[:, None], 1)  # pad id 1
    return Batch({"text": ids}, {"text": lens}, {}, torch.arange(len(lengths)) + 10 * seed)


def case(name):
    """(model, two micro-batches whose counts differ several-fold)"""
    short, long = [4800], [16000, 12000, 9000]  # 14 frames: span masks need 13
    if name == "wav2vec2":
        model = Wav2Vec2(tiny("audio"), final_dim=32, num_distractors=5, dropout_features=0.0,
                         codebook_entries=16)
        return model, [audio(short, 1), audio(long, 2)]
    if name == "hubert":
        model = HuBERT(tiny("audio"), num_classes=10, final_dim=32)
        return model, [audio(short, 1, True, model.encoder), audio(long, 2, True, model.encoder)]
    if name == "data2vec":
        return Data2Vec(tiny("audio"), top_k=2), [audio(short, 1), audio(long, 2)]
    if name == "data2vec2":
        enc = tiny("audio")
        model = Data2Vec2(enc, top_k=2, clone_batch=2, decoder_input_dropout=0.0,
                          decoder=ConvDecoder1d(in_dim=enc.dim, dim=32, layers=2, groups=4))
        return model, [audio(short, 1), audio(long, 2)]
    if name == "mlm":
        model = MaskedLM(tiny("text", vocab_size=64), mask_id=4, special_ids=[0, 1, 2, 3, 4], num_tokens=64)
        return model, [text([12], 1), text([48, 40, 33], 2)]
    model = MAE(tiny("image"), decoder_dim=32, decoder_depth=1, decoder_heads=4)
    return model, [images(1, 1), images(5, 2)]


def fit_one_update(model, micro: list[Batch]) -> list[torch.Tensor]:
    """One Trainer update of `model` (optimizer RecordGrads) accumulating the micro-batches `micro`; the gradients
    its optimizer was asked to apply."""
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, max_steps=1,
                        accumulate_grad_batches=len(micro), limit_val_batches=0)
    loader = torch.utils.data.DataLoader(micro, batch_size=None, collate_fn=lambda b: b)
    trainer.fit(model, train_dataloaders=loader)
    return trainer.optimizers[0].seen


def assert_same_grads(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    assert len(got) == len(want) > 0
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["wav2vec2", "hubert", "data2vec", "data2vec2", "mae", "mlm"])
def test_one_update_of_two_micro_batches_has_the_gradient_of_their_union(name, monkeypatch):
    torch.manual_seed(0)
    model, micro = case(name)
    model.optimizer_factory = RecordGrads

    # the reference: the same steps (same masks: generators are keyed by update and micro-batch), their summed
    # losses divided by the summed counts, one backward
    reference, sums, counts = summing_copy(model)
    for i, batch in enumerate(micro):
        reference._micro = i
        reference.step(batch)
    assert max(counts) >= 2 * min(counts), counts  # the test means something only with uneven counts
    (sum(sums) / sum(float(c) for c in counts)).backward()

    assert_same_grads(fit_one_update(model, micro), grads(reference))


DDP_SCRIPT = r'''
import json, sys
import lightning as L
import torch
from omnissl.backbones.builders import tiny
from omnissl.ssl.base import SSLModule
from omnissl.ssl.hubert import HuBERT
sys.path.insert(0, sys.argv[2])
from test_accumulation import RecordGrads, audio, grads, summing_copy

# masks the same whatever the rank and micro-batch, so that one process can compute the reference
SSLModule.generator = lambda self, device=None: torch.Generator().manual_seed(0)
torch.manual_seed(0)
model = HuBERT(tiny("audio"), num_classes=10, final_dim=32)
model.optimizer_factory = RecordGrads
lengths = [[4800], [16000, 12000, 9000], [6000, 5000], [16000, 16000, 15000, 14000]]  # rank 0: 0, 1; rank 1: 2, 3
batches = [audio(n, i, True, model.encoder) for i, n in enumerate(lengths)]
reference, sums, counts = summing_copy(model)


class Data(L.LightningDataModule):
    def train_dataloader(self):
        rank = self.trainer.global_rank
        return torch.utils.data.DataLoader(batches[2 * rank:2 * rank + 2], batch_size=None, collate_fn=lambda b: b)


trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, max_steps=1, accumulate_grad_batches=2,
                    limit_val_batches=0, use_distributed_sampler=False)
trainer.fit(model, datamodule=Data())
if trainer.global_rank == 0:
    for b in batches:
        reference.step(b)
    counts = [float(c) for c in counts]
    (sum(sums) / sum(counts)).backward()
    want = grads(reference)
    got = trainer.optimizers[0].seen
    err = max(float((a - b).abs().max()) for a, b in zip(got, want))
    scale = max(float(b.abs().max()) for b in want)
    json.dump({"err": err, "scale": scale, "n": [len(got), len(want)], "counts": counts}, open(sys.argv[1], "w"))
'''


@pytest.mark.slow
def test_two_ranks_with_accumulation_divide_by_the_global_count_of_the_update(tmp_path):
    """A real 2-process DDP run (gloo): 2 ranks x 2 micro-batches with counts far apart; the gradient the
    optimizer applies is that of the summed losses of all four micro-batches over their summed counts."""
    import json
    import os
    import subprocess
    import sys

    script, out = tmp_path / "ddp_accumulation.py", tmp_path / "result.json"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(script), str(out), os.path.dirname(__file__)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["n"][0] == result["n"][1] > 0
    assert max(result["counts"]) >= 3 * min(result["counts"]), result["counts"]
    assert result["err"] <= 1e-6 + 1e-5 * result["scale"], result


@pytest.mark.parametrize("bad_first", [False, True])
def test_a_skipped_micro_batch_leaves_the_update_count(bad_first):
    """on_nonfinite: skip under accumulation: the skipped micro-batch adds no gradient, and its masked positions
    must not join the update's count either; the update's gradient is that of the finite micro-batch alone over
    its own count (before the fix it was divided by both micro-batches' counts)."""
    torch.manual_seed(0)
    model, (good, other) = case("hubert")
    model.on_nonfinite = "skip"
    model.optimizer_factory = RecordGrads
    bad = Batch({"audio": torch.full_like(other.inputs["audio"], float("nan"))}, other.lengths, other.targets,
                other.ids)
    micro = [bad, good] if bad_first else [good, bad]
    reference, sums, counts = summing_copy(model)
    reference._micro = int(bad_first)  # the micro-batch index the good batch has in the update (its masks)
    reference.step(good)
    (sums[0] / float(counts[0])).backward()

    got = fit_one_update(model, micro)
    assert model.skipped_nonfinite == 1
    assert_same_grads(got, grads(reference))
