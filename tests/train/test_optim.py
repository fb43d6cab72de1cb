import torch

from omnissl.backbones import builders
from omnissl.optim import param_groups, sum_gradient, update_grad_scale


def test_weight_decay_groups_by_name():
    enc = builders.tiny("text")
    decay, keep = param_groups(enc, 0.01)
    assert decay["weight_decay"] == 0.01 and keep["weight_decay"] == 0.0
    names = {id(p): n for n, p in enc.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    kept = {names[id(p)] for p in keep["params"]}
    assert "trunk.blocks.0.attn.qkv.weight" in decayed and "frontend.embed.weight" in decayed
    for name in ("positions.weight", "mask_emb", "trunk.blocks.0.norm1.weight", "trunk.blocks.0.fc1.bias",
                 "trunk.norm.bias"):
        assert name in kept and name not in decayed
    assert len(decayed) + len(kept) == len(names)


def test_frozen_params_are_left_out():
    enc = builders.tiny("text")
    enc.frontend.requires_grad_(False)
    params = [p for g in param_groups(enc, 0.1) for p in g["params"]]
    assert all(p.requires_grad for p in params)
    assert all(p is not enc.frontend.embed.weight for p in params)


def test_update_grad_scale_gives_the_update_mean_with_uneven_ranks_and_micro_batches():
    # 2 "ranks" x 2 accumulated micro-batches with 3, 7, 1 and 9 predicted positions: Lightning divides each
    # micro-batch's loss by 2, DDP averages over ranks; the result must be the gradient of the global mean
    torch.manual_seed(0)
    w = torch.randn(4, requires_grad=True)
    xs = [[torch.randn(3, 4), torch.randn(7, 4)], [torch.randn(1, 4), torch.randn(9, 4)]]
    per_rank = []
    for rank in xs:
        grad, total = torch.zeros(4), torch.zeros(())
        for x in rank:
            loss = sum_gradient((x @ w).pow(2).sum(), torch.tensor(float(len(x))))
            torch.testing.assert_close(loss, (x @ w).pow(2).mean().detach())  # the value is the micro-batch mean
            grad += torch.autograd.grad(loss / 2, w)[0]
            total += len(x)
        per_rank.append((grad, total))
    global_total = sum(t for _, t in per_rank)
    ddp_grad = (per_rank[0][0] + per_rank[1][0]) / 2 * update_grad_scale(global_total, accumulate=2, world_size=2)
    ref = torch.autograd.grad((torch.cat([x for r in xs for x in r]) @ w).pow(2).mean(), w)[0]
    torch.testing.assert_close(ddp_grad, ref)
