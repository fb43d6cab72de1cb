"""bf16: what runs in bf16 and what stays fp32 in a whole training step of every objective.

Lightning's `bf16-mixed` (recipes/trainer/bf16.yaml, fsdp.yaml) runs `training_step` under
`torch.autocast(dtype=torch.bfloat16)`; here the step runs under the same autocast on the CPU while a
TorchDispatchMode records every aten op with the dtypes it actually computed in (autocast has cast the inputs by
then) and where it ran (the module stack, and the named fp32 functions). docs/DESIGN.md's fp32 islands:
Gumbel softmax (the whole quantizer), cosine logits and cross-entropy (every loss), the conv extractor's
GroupNorm, target normalization (data2vec's top-K targets), EMA master weights. The check that autocast was on
at all: the blocks' matrix products ran in bf16.

To add an objective (CLAP): one entry in `build` (and its fp32 functions in ISLAND_FUNCTIONS).
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import omnissl.backbones.frontends as frontends
import omnissl.ssl.data2vec as data2vec_mod
import omnissl.ssl.data2vec2 as data2vec2_mod
import omnissl.ssl.hubert as hubert_mod
import omnissl.ssl.mae as mae_mod
import omnissl.ssl.teacher as teacher_mod
import omnissl.ssl.wav2vec2 as wav2vec2_mod
from omnissl.backbones.builders import tiny
from omnissl.datamodules.synthetic import SyntheticDataModule
from omnissl.ssl.data2vec import Data2Vec
from omnissl.ssl.data2vec2 import Data2Vec2
from omnissl.ssl.frames import encoder_frames
from omnissl.ssl.heads import ConvDecoder1d
from omnissl.ssl.hubert import HuBERT
from omnissl.ssl.mae import MAE
from omnissl.ssl.mlm import MaskedLM
from omnissl.ssl.teacher import EMATeacher
from omnissl.ssl.wav2vec2 import Wav2Vec2

# functions that must compute in fp32 whatever the autocast: (module whose global name the objective calls, name)
ISLAND_FUNCTIONS = [
    (frontends, "masked_instance_norm"),  # the conv extractor's GroupNorm (one group per channel)
    (teacher_mod, "top_k_targets"),  # data2vec target normalization and averaging
    (wav2vec2_mod, "contrastive_with_distractors"),  # cosine logits + cross-entropy
    (wav2vec2_mod, "feature_penalty"),
    (hubert_mod, "cosine_cross_entropy"),
    (hubert_mod, "feature_penalty"),
    (data2vec_mod, "regression_loss"),
    (data2vec2_mod, "regression_loss"),
    (mae_mod, "masked_mse"),
]
ISLAND_MODULES = {"GumbelQuantizer"}
# ops that may show a bf16 output inside an island: casts into it, views, and exact (non-arithmetic) ones
NOT_ARITHMETIC = {"_to_copy", "to", "clone", "view", "_unsafe_view", "reshape", "expand", "detach", "alias", "t",
                  "transpose", "permute", "slice", "select", "index", "unsqueeze", "squeeze", "_unique2",
                  "unique_dim", "unbind", "split", "split_with_sizes", "lift_fresh", "masked_select", "gather",
                  "cat", "stack", "contiguous", "as_strided", "copy_", "empty_like", "zeros_like"}
# outside Attention (SDPA's own softmax), these ops may only ever compute in fp32
FP32_ONLY = {"_softmax", "_log_softmax", "nll_loss_forward", "nll_loss2d_forward", "mse_loss", "smooth_l1_loss",
             "native_group_norm", "_native_batch_norm_legit", "_native_batch_norm_legit_no_training"}
MATMULS = {"mm", "addmm", "bmm", "baddbmm", "linear"}


def floating(tree) -> list[torch.dtype]:
    return [t.dtype for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor) and t.is_floating_point()]


class OpLog(TorchDispatchMode):
    """Every aten op: (name, where (module types and island functions around it), input dtypes, output dtypes)."""

    def __init__(self, where: list[str]) -> None:
        super().__init__()
        self.where, self.ops = where, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.append((func.overloadpacket.__name__, tuple(self.where), floating((args, kwargs)), floating(out)))
        return out


def build(name: str):
    """(objective, one batch) of tiny size."""
    kw = dict(modality="audio", train_size=4, valid_size=0, min_samples=6000, max_samples=12000)
    audio = SyntheticDataModule(**kw)
    if name == "wav2vec2":
        model, dm = Wav2Vec2(tiny("audio", dim=32), final_dim=16, codebook_entries=16, num_distractors=5,
                             mask_length=4), audio
    elif name == "hubert":
        model = HuBERT(tiny("audio", dim=32), num_classes=10, final_dim=16, mask_length=4)
        dm = SyntheticDataModule(**kw, unit_frames=lambda n: int(encoder_frames(model.encoder, torch.tensor([n]))[0]))
    elif name == "data2vec":
        model, dm = Data2Vec(tiny("audio", dim=32), top_k=2, mask_length=4), audio
    elif name == "data2vec2":
        enc = tiny("audio", dim=32)
        model = Data2Vec2(enc, top_k=2, clone_batch=2, mask_length=3,
                          decoder=ConvDecoder1d(in_dim=enc.dim, dim=16, layers=2, groups=4))
        dm = audio
    elif name == "mae":
        model = MAE(tiny("image", dim=32), decoder_dim=16, decoder_depth=1, decoder_heads=2)
        dm = SyntheticDataModule(modality="image", train_size=4, valid_size=0)
    elif name == "mlm":
        model = MaskedLM(tiny("text", dim=32, vocab_size=128), mask_id=3, special_ids=[0, 1, 2, 3], mask_prob=0.3)
        dm = SyntheticDataModule(modality="text", train_size=4, valid_size=0, vocab_size=128, seq_len=24)
    else:
        raise ValueError(name)
    ds = dm.dataset("train")
    return model.train(), dm.collate([ds[i] for i in range(4)])


@pytest.mark.parametrize("name", ["wav2vec2", "hubert", "data2vec", "data2vec2", "mae", "mlm"])
def test_bf16_autocast_step_keeps_the_fp32_islands(name, monkeypatch):
    torch.manual_seed(0)
    model, batch = build(name)
    where: list[str] = []

    def region(fn, label):
        def wrapped(*args, **kwargs):
            where.append(label)
            try:
                return fn(*args, **kwargs)
            finally:
                where.pop()
        return wrapped

    for module, fn in ISLAND_FUNCTIONS:
        monkeypatch.setattr(module, fn, region(getattr(module, fn), fn))
    def enter(module, args):
        where.append(type(module).__name__)

    def leave(module, args, output):
        where.pop()  # returns None: the output is left alone

    pre = torch.nn.modules.module.register_module_forward_pre_hook(enter)
    post = torch.nn.modules.module.register_module_forward_hook(leave)
    log = OpLog(where)
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16), log:
            out = model.step(batch)
    finally:
        pre.remove()
        post.remove()
    assert not where
    ops = log.ops
    islands = ISLAND_MODULES | {fn for _, fn in ISLAND_FUNCTIONS}

    # autocast was on: the transformer blocks multiplied in bf16
    assert any(op in MATMULS and "Block" in w and torch.bfloat16 in ins for op, w, ins, _ in ops)
    # the fp32 islands computed in fp32: no arithmetic op inside them produced a bf16 tensor
    inside = [(op, w) for op, w, _, outs in ops if islands & set(w) and op not in NOT_ARITHMETIC
              and torch.bfloat16 in outs]
    assert not inside, inside[:10]
    entered = {name for _, w, _, _ in ops for name in islands & set(w)}
    want = {"wav2vec2": {"GumbelQuantizer", "contrastive_with_distractors", "masked_instance_norm"},
            "hubert": {"cosine_cross_entropy", "masked_instance_norm", "feature_penalty"},
            "data2vec": {"top_k_targets", "regression_loss", "masked_instance_norm"},
            "data2vec2": {"top_k_targets", "regression_loss", "masked_instance_norm"},
            "mae": {"masked_mse"}, "mlm": set()}[name]
    assert want <= entered, (want, entered)  # the check looked where it should
    # softmaxes, cross-entropies and norms outside attention: fp32 only (MLM's cross-entropy is inline)
    wrong = [(op, w, ins) for op, w, ins, _ in ops if op in FP32_ONLY and "Attention" not in w
             and any(d != torch.float32 for d in ins)]
    assert not wrong, wrong[:10]
    assert any(op in ("nll_loss_forward", "mse_loss", "_log_softmax") or op == "sum" and islands & set(w)
               for op, w, _, _ in ops)
    assert out.loss.dtype == torch.float32
    # EMA master weights: the teacher's parameters are fp32 under bf16-mixed (autocast casts, never stores)
    teacher = getattr(model, "teacher", None)
    if teacher is not None:
        assert {p.dtype for p in teacher.parameters()} == {torch.float32}


def test_ema_update_of_a_bf16_teacher_accumulates_in_fp32():
    """Under bf16-true the teacher itself is bf16; a step of (1 - decay) = 1e-3 toward the student is below
    bf16's resolution at 1.0 (2**-7), so an EMA in bf16 never moves. The fp32 master copy accumulates it."""
    student = torch.nn.Linear(4, 4)
    teacher = EMATeacher(student, decay_start=0.999, decay_end=0.999, anneal_steps=0)
    with torch.no_grad():
        teacher.module.weight.fill_(1.0)
        student.weight.fill_(2.0)
    teacher.to(torch.bfloat16)
    naive = torch.ones(4, 4, dtype=torch.bfloat16)
    for _ in range(100):
        teacher.update(student)
        naive = naive * 0.999 + student.weight.detach().bfloat16() * (1 - 0.999)
    want = 2.0 - 0.999**100  # 1.0952: the fp32 EMA, stored to bf16 as 1.09375
    assert torch.equal(naive, torch.ones(4, 4, dtype=torch.bfloat16))  # what an EMA in bf16 would give
    assert teacher.module.weight.dtype == torch.bfloat16
    torch.testing.assert_close(teacher.module.weight.float(), torch.full((4, 4), want), atol=2**-7, rtol=0)
