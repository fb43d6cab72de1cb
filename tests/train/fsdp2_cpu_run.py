"""Run by tests/train/test_distributed.py: a short MAE fit on 2 CPU processes (gloo) with the given
strategy; rank 0 prints the type of the sharded parameters and the step. With FSDP2 the recipes' checkpoint
plugin (AtomicCheckpointIO) is installed and a distributed checkpoint is saved beside `out` (it must still be a
folder of shards). Not a test module itself."""

import sys
from pathlib import Path

import lightning as L
import torch

from omnissl.backbones import builders
from omnissl.datamodules.synthetic import SyntheticDataModule
from omnissl.ssl.mae import MAE


def main(strategy_name: str, out: str) -> None:
    L.seed_everything(0)
    if strategy_name == "fsdp2":
        from lightning.pytorch.strategies import ModelParallelStrategy

        strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    else:
        strategy = "ddp_spawn"
    model = MAE(builders.tiny("image"), decoder_dim=32, decoder_depth=1, decoder_heads=4,
                optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3))
    plugins = []
    if strategy_name == "fsdp2":
        from omnissl.train.checkpoint_io import AtomicCheckpointIO

        plugins = [AtomicCheckpointIO()]
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=3, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, limit_val_batches=0, plugins=plugins)
    trainer.fit(model, SyntheticDataModule(modality="image", train_size=32, batch_size=4))
    if strategy_name == "fsdp2":
        trainer.save_checkpoint(Path(out).with_name("dist.ckpt"))
    if trainer.global_rank == 0:
        param = next(model.encoder.trunk.blocks[0].parameters())
        with open(out, "w") as f:
            f.write(f"{type(param).__name__} {trainer.global_step}\n")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
