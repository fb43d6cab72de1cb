"""Self-distillation targets (data2vec v1 / 2.0, Baevski et al. 2022 / 2023): the EMA teacher, its decay
schedule, top-K layer averaging, and the checkpoint / sharding hooks of an objective that owns a teacher.

Legend: B batch, N steps, D width, K averaged layers.
"""

from __future__ import annotations

import warnings
from copy import deepcopy

import torch
import torch.nn.functional as F
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import Tensor, nn

from omnissl.backbones.protocol import Tokens
from omnissl.ops import masked_instance_norm

# Parts of the teacher's Encoder copy it never runs when it is fed the student's projected features (fairseq
# `ema_transformer_only`), so only positions and trunk take part in the average.
FRONT_KEYS = ("frontend.", "feature_norm.", "proj.", "mask_emb")
# ...except the CLS token, which the teacher's `encode` prepends: fairseq's data2vec v1 vision model hands the
# EMA encoder the student's current `cls_emb` (data2vec_vision.py), so it is copied from the student at every
# update rather than averaged or left at its initial value.
STUDENT_KEYS = ("cls_token",)


def check_teacher_input(encoder: nn.Module) -> None:
    """Warn when the student's tokens carry input dropout: a teacher fed them (`ema_transformer_only`) sees
    noisy inputs, which fairseq's data2vec never does (its audio configs set dropout_input 0.0)."""
    p = getattr(getattr(encoder, "dropout_input", None), "p", 0.0)
    if p > 0:
        warnings.warn(f"the encoder applies dropout_input={p} to the tokens the data2vec teacher is fed; fairseq "
                      "uses 0.0 (set the builder's dropout_input: 0.0, e.g. audio_base)", stacklevel=3)


def annealed_decay(start: float, end: float, step: int, anneal_steps: int) -> float:
    """Linear EMA decay schedule: `start` at step 0, `end` from `anneal_steps` on (fairseq
    `get_annealed_rate`, data2vec_audio.py)."""
    if anneal_steps <= 0 or step >= anneal_steps:
        return end
    return start + (end - start) * step / anneal_steps


class EMATeacher(nn.Module):
    """An exponential moving average of a student module (data2vec v1 / 2.0, Baevski et al. 2022 / 2023).

    Holds a deep copy of the student with `requires_grad=False` (so it never enters an optimizer's groups)
    kept in eval mode whatever the parent's mode. Per optimizer step, `set_num_updates(n)` (called by
    SSLModule once per micro-batch with the optimizer-step count) anneals the decay linearly from
    `decay_start` to `decay_end` over `anneal_steps` and, the first time it sees a new n, applies one update
    `teacher = decay·teacher + (1 - decay)·student` from the bound student; accumulated micro-batches see the
    same n and do not update again. `num_updates` is a persistent buffer, so the schedule resumes from a
    checkpoint (the teacher weights are ordinary submodule state).

    skip: parameter-name prefixes left out of the average entirely (parts of the copy the teacher never
    runs, e.g. the frontend when it is fed the student's features). copy: prefixes copied from the student
    instead of averaged (fairseq `ema_layers_only`: the positional conv). Buffers are always copied.

    FSDP2: when both parameters are DTensors with the same placement the update runs on the local shards
    (`to_local()`), no gather. Arithmetic runs in fp32; if the teacher's parameters are not fp32 (a
    "-true" precision cast the module), fp32 master copies are kept on the side.
    NOTE(ref): fairseq saves its fp32 master copy under `_ema`; ours lives in the teacher parameters
    themselves (fp32 under "*-mixed" precision, the usual case), and side masters are not checkpointed.
    """

    def __init__(
        self,
        student: nn.Module,
        *,
        decay_start: float = 0.999,  # data2vec audio base: 0.999 -> 0.9999 over 30 k updates (REFERENCE §B.4)
        decay_end: float = 0.9999,
        anneal_steps: int = 30_000,
        skip: tuple[str, ...] = (),
        copy: tuple[str, ...] = (),
    ) -> None:
        super().__init__()
        if not (0.0 <= decay_start <= 1.0 and 0.0 <= decay_end <= 1.0):
            raise ValueError(f"EMA decays must be in [0, 1], got {decay_start}, {decay_end}")
        self.module = deepcopy(student)
        self.module.requires_grad_(False)
        self.module.eval()
        self.decay_start, self.decay_end, self.anneal_steps = decay_start, decay_end, anneal_steps
        self.skip, self.copy = tuple(skip), tuple(copy)
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))
        self._student = [student]  # a plain list: not a submodule, not in state_dict, not in parameters()
        self._master: dict[str, Tensor] = {}

    @property
    def decay(self) -> float:
        return annealed_decay(self.decay_start, self.decay_end, int(self.num_updates), self.anneal_steps)

    def train(self, mode: bool = True) -> "EMATeacher":
        super().train(mode)
        self.module.eval()  # the teacher never trains (no dropout, no layerdrop)
        return self

    def set_num_updates(self, num_updates: int) -> None:
        """Once per new optimizer-step count: set the decay for that step and average the student in."""
        if num_updates <= int(self.num_updates):
            return
        self.num_updates.fill_(num_updates)
        if self.training:
            self.update(self._student[0])

    @torch.no_grad()
    def targets(self, tokens: Tokens, *, top_k: int, norm: str | None, final_norm: str | None, num_prefix: int = 0,
                source: str = "layers") -> Tensor:
        """Run the teacher's copy on unmasked `tokens` and average its top-K layers (`top_k_targets`) -> (B, N, D)
        fp32 without the `num_prefix` (CLS) tokens. source: "ffn" (each block's FFN output before its last
        residual: data2vec v1 audio and text, `fc_results`; data2vec 2.0, `AltBlock(ffn_targets=True)`) or
        "layers" (raw block outputs, data2vec v1 vision: for a pre-LN trunk the top one is taken before the
        final LayerNorm, as fairseq appends each block's output before `norm`)."""
        if source not in ("ffn", "layers"):
            raise ValueError(f"target source must be 'ffn' or 'layers', got {source!r}")
        out = self.module.encode(tokens, return_layers="ffn" if source == "ffn" else "blocks")
        layers = out.ffn if source == "ffn" else out.layers[1:]  # block outputs, not the input
        layers = [h[:, num_prefix:] for h in layers]
        return top_k_targets(layers, top_k, norm=norm, final_norm=final_norm, padding_mask=tokens.padding_mask)

    @staticmethod
    def _local(t: Tensor) -> Tensor:
        return t.to_local() if hasattr(t, "to_local") else t

    @torch.no_grad()
    def update(self, student: nn.Module, decay: float | None = None) -> None:
        """teacher = decay·teacher + (1 - decay)·student on every averaged parameter; buffers copied."""
        decay = self.decay if decay is None else decay
        # FSDP2 keeps a root's parameters unsharded after its forward (and the teacher has no backward to
        # reshard it): writes into those views would be lost at the next all-gather, so reshard first and
        # update the sharded parameters, which are the source of truth (pytorch#117742).
        for tree in (self.module, student):
            for sub in tree.modules():
                if callable(getattr(sub, "reshard", None)) and callable(getattr(sub, "unshard", None)):
                    sub.reshard()
        theirs = dict(student.named_parameters())
        for name, t in self.module.named_parameters():
            if name.startswith(self.skip):
                continue
            if name not in theirs:
                raise KeyError(f"EMA teacher parameter {name!r} has no counterpart in the student")
            s = theirs[name]
            t_is_d, s_is_d = hasattr(t, "to_local"), hasattr(s, "to_local")
            if t_is_d != s_is_d:
                if s_is_d and not t_is_d:  # teacher left unsharded: gather the student's (correct, not shard-local)
                    s_loc = s.full_tensor()
                else:
                    raise RuntimeError(f"EMA teacher parameter {name!r} is sharded but the student's is not")
            else:
                s_loc = self._local(s)
            t_loc = self._local(t)
            if t_loc.shape != s_loc.shape:
                raise RuntimeError(f"EMA shapes differ for {name!r}: {tuple(t_loc.shape)} vs {tuple(s_loc.shape)}")
            s32 = s_loc.detach().float()
            if name.startswith(self.copy):
                new = s32
            else:
                master = t_loc
                if t_loc.dtype != torch.float32:
                    if name not in self._master:
                        self._master[name] = t_loc.float()
                    master = self._master[name]
                new = master.mul_(decay).add_(s32, alpha=1.0 - decay)
            if new is not t_loc:
                t_loc.copy_(new)
        theirs_b = dict(student.named_buffers())
        for name, b in self.module.named_buffers():
            if name in theirs_b and not name.startswith(self.skip):
                self._local(b).copy_(self._local(theirs_b[name]))


def _normalize(x: Tensor, how: str | None, valid: Tensor | None) -> Tensor:
    if how is None or how == "none":
        return x
    if how == "instance":
        return masked_instance_norm(x, valid)
    if how == "layer":
        return F.layer_norm(x, x.shape[-1:])
    raise ValueError(f"target norm must be 'instance', 'layer' or None, got {how!r}")


def top_k_targets(
    layers: list[Tensor],
    k: int,
    *,
    norm: str | None = "instance",
    final_norm: str | None = None,
    padding_mask: Tensor | None = None,
) -> Tensor:
    """data2vec targets: the average of the last `k` of `layers` (each (B, N, D)), each normalized first.

    norm: "instance" (over time per channel, fairseq `instance_norm_target_layer`, audio and images),
    "layer" (over channels per position, data2vec text) or None. final_norm: the same options applied to
    the average (`instance_norm_targets` / `layer_norm_targets`). padding_mask (B, N) True at padding:
    excluded from the instance statistics and zeroed in the output. Runs in fp32 with autocast off.
    Returns (B, N, D) fp32.

    NOTE(ref): fairseq's `F.instance_norm` takes its statistics over the padded time axis too; its pretraining
    never pads (wav2vec-style batches are cropped to the shortest, `pad=False`), so the statistics over the
    valid frames are the faithful analogue for our padded batches: a row's targets do not depend on what it was
    batched with (tests/objectives/test_data2vec.py, `test_top_k_targets_match_naive_reference`).
    """
    if not 1 <= k <= len(layers):
        raise ValueError(f"top_k must be in [1, {len(layers)}], got {k}")
    valid = None if padding_mask is None else ~padding_mask
    with torch.autocast(device_type=layers[0].device.type, enabled=False):
        acc = None
        for layer in layers[-k:]:
            y = _normalize(layer.float(), norm, valid)
            acc = y if acc is None else acc + y
        out = _normalize(acc / k, final_norm, valid)
        if valid is not None:
            out = out * valid[..., None].to(out.dtype)
    return out


def check_teacher_in_checkpoint(checkpoint: dict, name: str) -> None:
    """Refuse to resume objective `name` from a Lightning checkpoint without EMA teacher weights."""
    if "state_dict" not in checkpoint:
        # a sharded (FSDP2) checkpoint: the strategy has already loaded every weight, teacher included, into the
        # sharded modules (torch.distributed.checkpoint fails naming any key the checkpoint lacks); the dict
        # Lightning hands this hook holds only the rest
        return
    state = checkpoint["state_dict"]
    if not any(k.startswith("teacher.") for k in state):
        raise ValueError(
            f"this checkpoint has no EMA teacher ('teacher.*' weights), so {name} cannot resume from it (it "
            "was probably written by another objective). To start from its encoder instead, pass it as "
            "--model.init_args.init_from <ckpt> and train without ckpt_path."
        )


def shard_teacher(teacher: EMATeacher, strategy: object, mesh) -> None:
    """Under Lightning's ModelParallelStrategy (FSDP2), shard the teacher's copy over `mesh["data_parallel"]`
    like the student, so the EMA update runs shard by shard. Other strategies: nothing to do."""
    if not isinstance(strategy, ModelParallelStrategy):
        return
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    fully_shard(teacher.module, mesh=mesh["data_parallel"])
    for method in ("embed", "encode"):
        register_fsdp_forward_method(teacher.module, method)


class TeacherHooks:
    """The Lightning hooks of an objective that holds an `EMATeacher` as `self.teacher` (Data2Vec, Data2Vec2);
    list it before SSLModule in the bases.

    on_load_checkpoint: refuse a checkpoint without teacher weights (`check_teacher_in_checkpoint`).
    configure_model: as SSLModule, then shard the teacher's copy like the student (its parameters do not
    require grad, so SSLModule leaves it whole), so the EMA update runs shard by shard.
    """

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        check_teacher_in_checkpoint(checkpoint, type(self).__name__)

    def configure_model(self) -> None:
        super().configure_model()  # type: ignore[misc]
        if self.attached:  # type: ignore[attr-defined]
            shard_teacher(self.teacher, self.trainer.strategy, self.device_mesh)  # type: ignore[attr-defined]
