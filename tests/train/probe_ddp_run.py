"""Run by tests/train/test_online_probe.py: a 2-step wav2vec 2.0 fit on 2 CPU processes (gloo) with the
OnlineProbe on the tiny embedded keywords, whose loader shards the probe data across the ranks. Rank 0 writes
a JSON summary: the merged probe features against per-clip features of the same encoder, the probe state on
both ranks, and the shard sizes. Not a test module itself."""

import json
import sys

import lightning as L
import torch

from omnissl.backbones import builders
from omnissl.datamodules.audio import AudioDataModule
from omnissl.ops import mean_pool
from omnissl.ssl.wav2vec2 import Wav2Vec2
from omnissl.eval.online_probe import OnlineProbe

KW = "embedded:keywords:tiny"


def main(strategy_name: str, out: str) -> None:
    L.seed_everything(0)
    if strategy_name == "fsdp2":
        from lightning.pytorch.strategies import ModelParallelStrategy

        strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    else:
        strategy = "ddp"
    model = Wav2Vec2(builders.tiny("audio", dim=32, depth=1), final_dim=16, codebook_entries=8, num_distractors=4,
                     optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3))
    data = AudioDataModule(train=KW, max_samples=8000, min_samples=0, max_tokens=None, batch_size=4,
                           num_workers=0)
    probe_data = AudioDataModule(train=KW, valid=KW, max_samples=None, min_samples=0,
                                 max_tokens=None, batch_size=8, num_workers=0)
    probe = OnlineProbe(probe_data, every_n_steps=2, knn_k=5, epochs=3)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=2, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, limit_val_batches=0,
                        callbacks=[probe])
    trainer.fit(model, data)

    enc = model.encoder
    loader = probe_data.train_dataloader()
    feats, labels = probe.features(trainer, enc, loader, torch.device("cpu"))
    ds = probe_data.dataset("train")
    enc.eval()
    with torch.no_grad():  # every rank runs the same forwards (FSDP2 gathers parameters collectively)
        ref = torch.cat([mean_pool(enc.encode(enc.embed(ds[i]["audio"][None])).last, None) for i in range(len(ds))])
    ref_labels = torch.tensor([ds[i]["label"] for i in range(len(ds))])
    weights = trainer.strategy.all_gather(probe.classifier.weight.detach())
    shard = trainer.strategy.all_gather(torch.tensor(sum(b.batch_size for b in loader)))
    if trainer.global_rank == 0:
        summary = {
            "items": int(feats.shape[0]), "dataset": len(ds), "shard_items": shard.tolist(),
            "max_feature_diff": float((feats - ref).abs().max()), "labels_equal": bool(torch.equal(labels, ref_labels)),
            "ranks_equal": bool(torch.equal(weights[0], weights[1])), "num_probes": probe.num_probes,
            "metrics": probe.metrics,
        }
        with open(out, "w") as f:
            json.dump(summary, f)
    # a clean shutdown: every rank leaves the process group before the interpreter exits (a gloo thread torn down
    # at exit aborted a rank once on a loaded machine: "terminate called without an active exception")
    trainer.strategy.barrier()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
