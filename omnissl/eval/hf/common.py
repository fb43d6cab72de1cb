"""What every family of omnissl.eval.hf shares: the tensor pairs of one transformer block, the copy along
pairs in either direction, and the checks of our trunk against what an HF config can express.

A family pairs every one of our tensors with the HF tensor it equals (`Pairs`, built by its `*_pairs`
function); `import_pairs` and `export_pairs` copy along the same pairs in opposite directions.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from omnissl.backbones.encoder import Encoder
from omnissl.backbones.transformer import Transformer

Pairs = list[tuple[Tensor, Tensor]]  # (ours, theirs): equal tensors after conversion


def require(config, option: str, value, expected) -> None:
    if value != expected:
        raise ValueError(
            f"{type(config).__name__}.{option}={value!r} is not supported by our Encoder (needs {expected!r})"
        )


def refuse(option: str, value, target: str, why: str) -> ValueError:
    return ValueError(f"{option}={value!r} has no {target} equivalent: {why}")


def copy_weight(dst: Tensor, src: Tensor) -> None:
    if dst.shape != src.shape:
        raise ValueError(f"shape mismatch copying weights: {tuple(src.shape)} into {tuple(dst.shape)}")
    dst.copy_(src)


def linear_pairs(ours: nn.Linear, theirs: nn.Linear) -> Pairs:
    return [(ours.weight, theirs.weight), (ours.bias, theirs.bias)]


def norm_pairs(ours: nn.LayerNorm | nn.GroupNorm, theirs: nn.LayerNorm | nn.GroupNorm) -> Pairs:
    return [(ours.weight, theirs.weight), (ours.bias, theirs.bias)]


def qkv_pairs(block, q: nn.Linear, k: nn.Linear, v: nn.Linear) -> Pairs:
    """Our fused projection is [q; k; v] along the output axis (Attention.forward's rearrange): pair each
    third (a view, so copying into it writes the fused weight) with HF's separate projection."""
    w, b, d = block.attn.qkv.weight, block.attn.qkv.bias, q.weight.shape[0]
    return [(w[i * d : (i + 1) * d], m.weight) for i, m in enumerate((q, k, v))] + [
        (b[i * d : (i + 1) * d], m.bias) for i, m in enumerate((q, k, v))
    ]


def block_pairs(block, *, q, k, v, out, norm1, fc1, fc2, norm2) -> Pairs:
    return (qkv_pairs(block, q, k, v) + linear_pairs(block.attn.out, out) + norm_pairs(block.norm1, norm1)
            + linear_pairs(block.fc1, fc1) + linear_pairs(block.fc2, fc2) + norm_pairs(block.norm2, norm2))


@torch.no_grad()
def import_pairs(pairs: Pairs) -> None:
    for ours, theirs in pairs:
        copy_weight(ours, theirs)


@torch.no_grad()
def export_pairs(pairs: Pairs) -> None:
    for ours, theirs in pairs:
        copy_weight(theirs, ours)


def trunk_config(encoder: Encoder, target: str, *, training_options: bool) -> dict:
    """Our trunk's hyper-parameters as read from the modules, checked against what `target` can express.
    training_options: the HF family has activation dropout and layerdrop (wav2vec 2.0 / HuBERT)."""
    trunk: Transformer = encoder.trunk
    block = trunk.blocks[0]
    eps = {m.eps for m in trunk.modules() if isinstance(m, nn.LayerNorm)}
    if len(eps) != 1:
        raise refuse("trunk LayerNorm eps", sorted(eps), target, "HF has one layer_norm_eps for all of them")
    act_dropout, layerdrop = block.act_drop.p, trunk.layerdrop
    if not training_options:
        if act_dropout:
            raise refuse("trunk act_dropout", act_dropout, target, "no dropout between the FFN layers")
        if layerdrop:
            raise refuse("trunk layerdrop", layerdrop, target, "no layerdrop")
    if block.attn.qkv.bias is None:
        raise refuse("attention bias", False, target, "HF projections have biases")
    return dict(dim=trunk.dim, depth=trunk.depth, heads=block.attn.heads, ffn_dim=block.fc1.out_features,
                dropout=trunk.drop.p, attn_dropout=block.attn.dropout, act_dropout=act_dropout,
                layerdrop=layerdrop, eps=eps.pop(), pre_norm=trunk.pre_norm)


def absolute_table(encoder: Encoder, target: str, n: int, grid: tuple[int, int] | None) -> Tensor:
    """(N, D) values our absolute positions add for a fixed input size (zeros when there are none)."""
    pos = encoder.positions
    if pos is None:
        return torch.zeros(n, encoder.dim)
    if getattr(pos, "relative", False):
        raise refuse("positions", type(pos).__name__, target, "HF uses an absolute position table here")
    with torch.no_grad():
        return pos(torch.zeros(1, n, encoder.dim, dtype=torch.float32), None, grid)[0].float()
