"""Run by tests/train/test_distributed.py: a short MAE fit on 2 CPU processes (gloo) with the given
strategy; rank 0 prints the final loss and the type of the sharded parameters. Not a test module itself."""

import sys

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
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=3, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, limit_val_batches=0)
    trainer.fit(model, SyntheticDataModule(modality="image", train_size=32, batch_size=4))
    if trainer.global_rank == 0:
        param = next(model.encoder.trunk.blocks[0].parameters())
        with open(out, "w") as f:
            f.write(f"{type(param).__name__} {trainer.global_step}\n")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
