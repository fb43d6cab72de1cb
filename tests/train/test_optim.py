import torch

from omnissl.backbones import builders
from omnissl.optim import global_normalize, param_groups


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


def test_global_normalize_matches_global_mean_with_uneven_ranks():
    # two "ranks" with 3 and 7 predicted positions; DDP averages gradients over ranks
    torch.manual_seed(0)
    w = torch.randn(4, requires_grad=True)
    xs = [torch.randn(3, 4), torch.randn(7, 4)]
    counts = torch.tensor([3.0, 7.0])
    grads = []
    for x, c in zip(xs, counts):
        loss = global_normalize((x @ w).pow(2).sum(), c, counts, world_size=2)
        grads.append(torch.autograd.grad(loss, w)[0])
    ddp_grad = (grads[0] + grads[1]) / 2
    ref = torch.autograd.grad((torch.cat(xs) @ w).pow(2).mean(), w)[0]
    torch.testing.assert_close(ddp_grad, ref)
