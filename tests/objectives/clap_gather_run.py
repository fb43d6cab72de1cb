"""Run by tests/objectives/test_clap.py: one rank of a 2-process (gloo) CLAP loss on a fixed global batch, split
unevenly (rank 0: the first 3 pairs, rank 1: the other 5). Each rank embeds its pairs through shared linear
"towers", computes `contrastive_pairs` with negatives gathered from both ranks, backpropagates its local loss sum;
the parameter gradients are summed over ranks (what DDP's average times the world size gives) and rank 0 saves
the summed loss and gradients. Not a test module itself."""

import os
import sys

import torch
import torch.distributed as dist

from omnissl.ssl.losses import contrastive_pairs


def setup(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    audio, text = torch.randn(8, 12, generator=g), torch.randn(8, 10, generator=g)
    wa, wt = torch.randn(6, 12, generator=g), torch.randn(6, 10, generator=g)
    return audio, text, wa, wt


def main(rank: int, world: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    audio, text, wa, wt = setup()
    wa.requires_grad_(True)
    wt.requires_grad_(True)
    log_scale = torch.tensor(2.0, requires_grad=True)
    rows = slice(0, 3) if rank == 0 else slice(3, 8)
    loss_sum, count, right_at, right_ta = contrastive_pairs(audio[rows] @ wa.t(), text[rows] @ wt.t(), log_scale)
    loss_sum.backward()
    stats = torch.stack([loss_sum.detach(), count.float(), right_at.float(), right_ta.float()])
    for t in (stats, wa.grad, wt.grad, log_scale.grad):
        dist.all_reduce(t)
    if rank == 0:
        torch.save({"loss_sum": stats[0], "count": stats[1], "right_at": stats[2], "right_ta": stats[3],
                    "wa": wa.grad, "wt": wt.grad, "log_scale": log_scale.grad}, out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
    # Skip interpreter finalization: on a loaded machine a gloo worker thread still releasing tensors at that
    # point aborted one rank ("terminate called without an active exception", SIGABRT, after its result was
    # written; a CI rehearsal of 2026-12-08 beside two training runs; pytorch/pytorch#179291 describes the race).
    # Everything this rank owes is done: the result is saved and the process group destroyed.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
