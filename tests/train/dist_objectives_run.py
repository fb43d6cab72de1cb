"""Run by tests/train/test_distributed.py (not a test module itself): every objective a few steps under one
training set-up, with its per-step losses written for the test to compare.

    python dist_objectives_run.py ref OUT [name...]    # 1 process, 2 accumulated micro-batches per update
    torchrun --nproc_per_node 2 dist_objectives_run.py ddp,fsdp2,fsdp2_blocks=data2vec2 OUT [name...]
                                                   # 2 processes (gloo), 1 micro-batch each

fsdp2_blocks: FSDP2 over blocks compiled by omnissl.train.blocks.TrunkBlocks (backend aot_eager: traced by
dynamo and AOTAutograd, no code generation, so it takes seconds) with activation checkpointing.

The 2-process runs and the 1-process reference see the same global batch (4 items per update): rank r of the
2-process run takes the batches the DataModule's sampler gives rank r of 2, and the reference takes the same two
batches as its two micro-batches. Masks, distractors and dropout are keyed by the *slot* of a micro-batch in
the update (rank + micro-batch; patched below, since the objectives key them by rank and micro-batch apart),
so both set-ups draw the same masks and, with the global loss normalization right, compute the same updates.

Per objective, in one launch: fit 4 steps with a checkpoint at step 2 (a folder of shards under FSDP2) and at
step 4, then a new Trainer resumes from the step-2 checkpoint and trains to step 4. Every rank writes
OUT/<mode>_<name>_<run>_rank<r>.json: {"rows": [[update, loss_sum, count], ...] (one row per micro-batch),
"param": the type of a trunk parameter after the fit (DTensor when FSDP2 sharded it), "world"}; the test adds
the rows up per update. Checkpoints: OUT/<mode>_<name>_<run>/epoch=E-step=S.ckpt. SGD with momentum (optimizer state that must resume) and a large learning rate, so
that a wrong gradient scale shows in the next step's loss (Adam would hide a pure scale error).

To add an objective: one entry in OBJECTIVES below (a model factory and a DataModule factory). A contrastive
objective (CLAP) takes its negatives from the whole global batch, so its reference is not 2 accumulated
micro-batches (each would only see its own negatives) but one batch of the same 4 items (JOINED below).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from omnissl.backbones.builders import tiny
from omnissl.batch import Batch
from omnissl.datamodules.sampler import make_loader
from omnissl.datamodules.synthetic import SyntheticDataModule
from omnissl.datamodules.collate import pad_right
from omnissl.ssl.base import SSLModule
from omnissl.ssl.clap import CLAP
from omnissl.ssl.data2vec import Data2Vec
from omnissl.ssl.data2vec2 import Data2Vec2
from omnissl.ssl.frames import encoder_frames
from omnissl.ssl.heads import ConvDecoder1d
from omnissl.ssl.hubert import HuBERT
from omnissl.ssl.mae import MAE
from omnissl.ssl.mlm import MaskedLM
from omnissl.ssl.wav2vec2 import Wav2Vec2
from omnissl.train.blocks import TrunkBlocks
from omnissl.train.checkpoint_io import AtomicCheckpointIO
from omnissl.train.strategies import FSDP2Strategy

STEPS, SAVE_AT, PER_RANK, WORLD = 4, 2, 2, 2
TRAIN_SIZE = 12  # 6 items per rank, 3 updates per epoch: the step-2 checkpoint is mid-epoch


def sgd(lr: float = 0.5):
    return lambda params: torch.optim.SGD(params, lr=lr, momentum=0.9)


def audio_data(encoder=None):
    """Synthetic audio; with `encoder`, items carry frame-level units (HuBERT) for that encoder's frames."""
    frames = None if encoder is None else (lambda n: int(encoder_frames(encoder, torch.tensor([n]))[0]))
    return SyntheticDataModule(modality="audio", train_size=TRAIN_SIZE, valid_size=0, batch_size=PER_RANK,
                               min_samples=6000, max_samples=12000, unit_frames=frames)


def wav2vec2():
    model = Wav2Vec2(tiny("audio", dim=32, depth=2), final_dim=16, codebook_entries=16, num_distractors=5,
                     mask_prob=0.5, mask_length=4, optimizer=sgd())
    return model, audio_data()


def hubert():
    model = HuBERT(tiny("audio", dim=32, depth=2), num_classes=10, final_dim=16, mask_length=4, optimizer=sgd())
    return model, audio_data(model.encoder)


def data2vec():
    model = Data2Vec(tiny("audio", dim=32, depth=2), top_k=2, mask_length=4, ema_decay=0.9, ema_end_decay=0.99,
                     ema_anneal_steps=10, optimizer=sgd(0.05))
    return model, audio_data()


def data2vec2():
    enc = tiny("audio", dim=32, depth=2)
    model = Data2Vec2(enc, top_k=2, clone_batch=2, mask_length=3, ema_decay=0.9, ema_end_decay=0.99,
                      ema_anneal_steps=10, decoder=ConvDecoder1d(in_dim=enc.dim, dim=16, layers=2, groups=4),
                      optimizer=sgd())
    return model, audio_data()


def mae():
    model = MAE(tiny("image", dim=32, depth=2), decoder_dim=16, decoder_depth=1, decoder_heads=2, optimizer=sgd())
    return model, SyntheticDataModule(modality="image", train_size=TRAIN_SIZE, valid_size=0, batch_size=PER_RANK)


def mlm():
    # SyntheticDataModule's text: ids 0-3 are specials, the tiny text encoder pads with 1
    model = MaskedLM(tiny("text", dim=32, depth=2, vocab_size=128), mask_id=3, special_ids=[0, 1, 2, 3],
                     mask_prob=0.3, optimizer=sgd())
    return model, SyntheticDataModule(modality="text", train_size=TRAIN_SIZE, valid_size=0, batch_size=PER_RANK,
                                       vocab_size=128, seq_len=24)


def clap():
    model = CLAP(tiny("audio", dim=32, depth=2), tiny("text", dim=32, depth=2, vocab_size=128), dim=16,
                 optimizer=sgd())
    return model, SyntheticDataModule(modality="audio_text", train_size=TRAIN_SIZE, valid_size=0,
                                       batch_size=PER_RANK, min_samples=6000, max_samples=12000, vocab_size=128,
                                       seq_len=24)


OBJECTIVES = {"wav2vec2": wav2vec2, "hubert": hubert, "data2vec": data2vec, "data2vec2": data2vec2, "mae": mae,
              "mlm": mlm, "clap": clap}
JOINED = {"clap"}  # the reference trains on the two ranks' batches as one batch (negatives from all 4 items)


# --- the same masks for the same slot of an update, whatever the world size ----------------------------------

_step_key = SSLModule._step_key


def slot_key(self, step: int, rank: int, salt: int = 0) -> int:
    micro, self._micro = self._micro, 0
    try:
        return _step_key(self, step, rank + micro, salt)
    finally:
        self._micro = micro


SSLModule._step_key = slot_key


def join(batches: list[Batch], text_pad_id: int) -> Batch:
    """The ranks' batches of one update as one batch (the same items in rank order; padding redone)."""
    inputs, lengths = {}, {}
    for key in batches[0].inputs:  # audio and text (CLAP), each with its lengths
        rows = [b.inputs[key][i, : int(b.lengths[key][i])] for b in batches for i in range(b.batch_size)]
        inputs[key], lengths[key] = pad_right(rows, text_pad_id if key == "text" else 0.0)
    targets = {k: torch.cat([b.targets[k] for b in batches]) for k in batches[0].targets}
    return Batch(inputs, lengths, targets, torch.cat([b.ids for b in batches]))


class Interleaved:
    """The reference's loader: per update, rank 0's batch then rank 1's, as `make_loader` gives them to 2 ranks
    (joined: both as one batch)."""

    def __init__(self, dm: SyntheticDataModule, joined: bool = False) -> None:
        self.joined, self.text_pad_id = joined, dm.collate.text_pad_id
        ds = dm.dataset("train")
        self.loaders = [make_loader(ds, trainer=SimpleNamespace(world_size=WORLD, global_rank=r),
                                    batch_size=dm.batch_size, shuffle=True, seed=dm.seed, num_workers=0,
                                    collate_fn=dm.collate) for r in range(WORLD)]
        self.sampler = self  # Lightning sets the epoch through `sampler.set_epoch`

    def set_epoch(self, epoch: int) -> None:
        for loader in self.loaders:
            loader.batch_sampler.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return (1 if self.joined else WORLD) * len(self.loaders[0])

    def __iter__(self):
        for batches in zip(*self.loaders):
            if self.joined:
                yield join(list(batches), self.text_pad_id)
            else:
                yield from batches


class Reference(L.LightningDataModule):
    def __init__(self, dm: SyntheticDataModule, joined: bool) -> None:
        super().__init__()
        self.dm, self.joined = dm, joined

    def train_dataloader(self):
        return Interleaved(self.dm, self.joined)


def record(model: SSLModule, rows: list) -> None:
    """Keep (update, loss_sum, count) of every micro-batch this process trains on."""
    normalize = model.normalize

    def spy(loss_sum, count):
        if model.training:
            rows.append([model.global_step, float(loss_sum.detach()), float(count)])
        return normalize(loss_sum, count)

    model.normalize = spy


def trainer(mode: str, ckpt_dir: Path, steps: int, joined: bool) -> L.Trainer:
    callbacks: list = [ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=SAVE_AT, save_top_k=-1)]
    if mode == "fsdp2_blocks":  # FSDP2 over compiled (aot_eager: traced, no code generation) checkpointed blocks
        callbacks.append(TrunkBlocks(compile=True, backend="aot_eager", activation_checkpointing=True))
    if mode.startswith("fsdp2"):  # recipes/trainer/fsdp.yaml's strategy: data parallel over every process
        strategy, devices = FSDP2Strategy(), WORLD
    elif mode == "ddp":
        strategy, devices = "ddp", WORLD
    else:
        strategy, devices = "auto", 1
    return L.Trainer(accelerator="cpu", devices=devices, strategy=strategy, max_steps=steps, logger=False,
                     callbacks=callbacks, plugins=[AtomicCheckpointIO()], enable_progress_bar=False,
                     enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
                     accumulate_grad_batches=WORLD if mode == "ref" and not joined else 1)


def run(mode: str, out: Path, name: str) -> None:
    def fit(run_name: str, ckpt_path: str | None) -> L.Trainer:
        L.seed_everything(0, verbose=False)
        model, dm = OBJECTIVES[name]()
        rows: list = []
        record(model, rows)
        joined = name in JOINED
        t = trainer(mode, out / f"{mode}_{name}_{run_name}", STEPS, joined)
        t.fit(model, Reference(dm, joined) if mode == "ref" else dm, ckpt_path=ckpt_path)
        param = next(model.encoder.trunk.blocks[0].parameters())
        blocks = [c for c in t.callbacks if isinstance(c, TrunkBlocks)]
        result = {"rows": rows, "param": type(param).__name__, "world": t.world_size,
                  "compiled": sum(b.compiled for b in blocks), "checkpointed": sum(b.checkpointed for b in blocks),
                  "graphs": int(torch._dynamo.utils.counters["stats"]["unique_graphs"])}
        (out / f"{mode}_{name}_{run_name}_rank{t.global_rank}.json").write_text(json.dumps(result))
        return t

    start = time.perf_counter()
    t = fit("straight", None)
    if mode != "ref":
        fit("resumed", str(out / f"{mode}_{name}_straight" / f"epoch=0-step={SAVE_AT}.ckpt"))
    if t.global_rank == 0:
        print(f"{mode} {name}: {time.perf_counter() - start:.1f} s", flush=True)


def main(specs: list[str], out: str, names: list[str]) -> None:
    """specs: "mode" (every name given) or "mode=name+name" (those objectives only)."""
    torch.set_num_threads(1)
    for spec in specs:
        mode, _, only = spec.partition("=")
        for name in only.split("+") if only else names:
            run(mode, Path(out), name)
    if torch.distributed.is_initialized():  # every rank leaves the process group before the interpreter exits
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    specs = sys.argv[1].split(",")
    modes = {spec.partition("=")[0] for spec in specs}
    if not modes <= {"ref", "ddp", "fsdp2", "fsdp2_blocks"} or ("ref" in modes and len(modes) > 1):
        raise SystemExit(f"modes must be ref alone, or some of ddp, fsdp2, fsdp2_blocks (comma-separated, each "
                         f"optionally =name+name), got {sys.argv[1]!r}")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main(specs, sys.argv[2], sys.argv[3:] or list(OBJECTIVES))
