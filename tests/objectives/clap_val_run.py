"""Run by tests/objectives/test_clap_validation_ddp.py (not a test module itself): one `Trainer.validate` of a
fixed tiny CLAP on fixed captioned clips, on 1 process ("ref") or on every process of a torchrun launch ("ddp",
gloo), and each rank's epoch-end validation metrics (retrieval over every caption, zero-shot accuracy) written to
OUT/<mode>_rank<r>.json.

    python clap_val_run.py ref OUT CAPTIONS ZEROSHOT TOKENIZER
    torchrun --nproc_per_node 2 clap_val_run.py ddp OUT CAPTIONS ZEROSHOT TOKENIZER

CAPTIONS is both the train and the valid caption manifest, ZEROSHOT a labeled manifest; batches of 2 clips. With
an odd number of clips, the distributed sampler pads each rank's share with a repeated clip, which the gathered
metrics must not count twice."""

import json
import sys
from pathlib import Path

import lightning as L
import torch

from omnissl.backbones import builders
from omnissl.datamodules.audio_text import AudioTextDataModule
from omnissl.ssl.clap import CLAP


def main(mode: str, out: str, captions: str, zeroshot: str, tokenizer: str) -> None:
    dm = AudioTextDataModule(train=captions, valid=captions, zeroshot=zeroshot, tokenizer=tokenizer, batch_size=2,
                             num_workers=0, max_samples=32000)
    torch.manual_seed(0)
    model = CLAP(builders.tiny("audio", dim=32, depth=1),
                 builders.tiny("text", dim=32, depth=1, vocab_size=dm.vocab_size), dim=16)
    world = 2 if mode == "ddp" else 1
    trainer = L.Trainer(accelerator="cpu", devices=world, strategy="ddp" if world > 1 else "auto", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.validate(model, datamodule=dm)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    metrics["world"] = trainer.world_size
    Path(out, f"{mode}_rank{trainer.global_rank}.json").write_text(json.dumps(metrics, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:6])
