"""`SSLModule`: the thin LightningModule every objective subclasses.

It owns what objectives share and nothing else: the injected optimizer and scheduler, weight-decay groups,
per-update hooks (`set_num_updates` on every submodule that has one: layerdrop seed, Gumbel temperature,
EMA decay), reproducible mask generators, global loss normalization, the non-finite-loss guard, and
logging. An objective implements `step(batch) -> StepOutput` and returns metrics; only this class logs.
"""

from __future__ import annotations

import abc
from pathlib import Path
from typing import Callable, NamedTuple

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import Tensor

from omnissl.backbones.config import module_config
from omnissl.backbones.transformer import Block
from omnissl.batch import Batch
from omnissl.ops import first_nonfinite
from omnissl.optim import grad_norm, param_groups, sum_gradient, update_grad_scale


class StepOutput(NamedTuple):
    """loss: scalar to backpropagate (from `normalize`); metrics: scalars to log;
    batch_size: for weighting epoch averages."""

    loss: Tensor
    metrics: dict[str, Tensor | float]
    batch_size: int


class NonFiniteLossError(RuntimeError):
    """A non-finite loss (on_nonfinite="raise"), too many consecutive skipped steps (on_nonfinite="skip"), or
    non-finite weights after an optimizer step; the message names the step (and the batch or the tensor)."""


def _adamw(params) -> torch.optim.Optimizer:
    # fairseq wav2vec 2.0 / RoBERTa: Adam betas (0.9, 0.98), eps 1e-6, lr 5e-4 (REFERENCE §B.1, §B.2)
    return torch.optim.AdamW(params, lr=5e-4, betas=(0.9, 0.98), eps=1e-6)


class SSLModule(L.LightningModule, abc.ABC):
    """Base of every objective.

    optimizer / lr_scheduler: callables injected by LightningCLI (`optimizer: class_path: torch.optim.AdamW`);
    the scheduler steps per optimizer step. weight_decay: applied to the decay group only (see
    omnissl/optim.py). seed: mask generators are seeded by (seed, update, rank, micro-batch).
    on_nonfinite: "raise" stops the run naming the step and sample ids; "skip" zeroes the batch's loss
    and counts it (`train/skipped_nonfinite`), and stops the run once `max_skipped_steps` consecutive batches
    were skipped (a transient overflow or one bad batch recovers within a few steps; a run whose every batch is
    non-finite is dead, and finishing it would only save dead checkpoints). Either way the weights are checked
    after every optimizer step: a non-finite weight stops the run naming the step and the tensor, before any
    checkpoint of them is written. A non-finite validation loss raises under "raise" and is logged (not
    dropped) under "skip".
    """

    def __init__(
        self,
        *,
        optimizer: OptimizerCallable = _adamw,
        lr_scheduler: LRSchedulerCallable | None = None,
        weight_decay: float = 0.01,
        seed: int = 0,
        on_nonfinite: str = "raise",
        max_skipped_steps: int = 10,
    ) -> None:
        super().__init__()
        if on_nonfinite not in ("raise", "skip"):
            raise ValueError(f"on_nonfinite must be 'raise' or 'skip', got {on_nonfinite!r}")
        if max_skipped_steps < 1:
            raise ValueError(f"max_skipped_steps must be >= 1, got {max_skipped_steps}")
        self.optimizer_factory, self.scheduler_factory = optimizer, lr_scheduler
        self.weight_decay, self.seed, self.on_nonfinite = weight_decay, seed, on_nonfinite
        self.max_skipped_steps = max_skipped_steps
        self.skipped_nonfinite = 0  # in total (logged)
        self.skipped_in_a_row = 0  # consecutive skipped batches (the stop rule)
        self._micro = 0
        self._update_count: Tensor | None = None  # positions normalized so far in this update (this rank)

    # --- what objectives implement -------------------------------------------------------------------

    @abc.abstractmethod
    def step(self, batch: Batch) -> StepOutput:
        """Compute the loss (through `normalize`) and metrics of one batch."""

    # --- helpers for objectives -------------------------------------------------------------------------

    @property
    def attached(self) -> bool:
        """Whether a Trainer drives this module (False when an objective is called directly, as in tests)."""
        return self._trainer is not None

    def reducer(self) -> Callable[..., Tensor] | None:
        """The strategy's `reduce(tensor, reduce_op=...)` when several ranks train, else None (for the
        monitors' global statistics, omnissl/ssl/monitors.py)."""
        if not self.attached or self.trainer.world_size == 1:
            return None
        return self.trainer.strategy.reduce

    def generator(self, device: torch.device | None = None) -> torch.Generator:
        """A generator seeded by (seed, update, rank, micro-batch): masks are reproducible on resume and
        differ across ranks and accumulated micro-batches."""
        device = device or self.device
        rank = self.global_rank if self.attached else 0
        step = self.global_step if self.attached else 0
        return torch.Generator(device=device).manual_seed(self._step_key(step, rank))

    def _step_key(self, step: int, rank: int, salt: int = 0) -> int:
        key = ((self.seed * 1_000_003 + step) * 1_009 + rank) * 1_013 + self._micro
        return (key * 1_019 + salt if salt else key) % (2**63 - 1)

    def normalize(self, loss_sum: Tensor, count: Tensor | int) -> Tensor:
        """A summed loss over `count` predicted positions -> the loss to backpropagate; call it once per step.

        fairseq divides the gradient of the loss summed over a whole update (every accumulated micro-batch,
        every rank) by that update's total count. The counts of later micro-batches are unknown when the
        first is backpropagated, so when training under a Trainer the returned value is this micro-batch's
        mean (what is logged) while its gradient is that of `loss_sum`; the count joins the update's total
        and `on_before_optimizer_step` divides the accumulated gradients by the total over all micro-batches
        and ranks (omnissl/optim.py `update_grad_scale`), before clipping and the optimizer step. Otherwise
        (validation, direct calls) it is simply loss_sum / count.
        """
        count = torch.as_tensor(count, device=loss_sum.device, dtype=torch.float32)
        if not (self.attached and self.training and torch.is_grad_enabled()):
            return loss_sum / count.clamp(min=1)
        count = count.detach()
        self._update_count = count if self._update_count is None else self._update_count + count
        return sum_gradient(loss_sum, count)

    def scale_grads_to_update_count(self) -> None:
        """Divide the update's accumulated gradients of summed losses by its global count (see `normalize`)."""
        if self._update_count is None:  # no normalized loss this update (e.g. a step that returns a mean)
            return
        total, world = self._update_count, self.trainer.world_size
        if world > 1:
            total = self.trainer.strategy.reduce(total, reduce_op="sum")
        factor = update_grad_scale(total, self.trainer.accumulate_grad_batches, world)
        for p in self.parameters():
            if p.grad is not None:
                p.grad.mul_(factor)
        self._update_count = None

    # --- Lightning hooks --------------------------------------------------------------------------------

    def on_train_batch_start(self, batch: Batch, batch_idx: int) -> None:
        accumulate = self.trainer.accumulate_grad_batches if self.attached else 1
        self._micro = batch_idx % accumulate
        if self._micro == 0:
            self._update_count = None
        # dropout and any other draw from torch's global generators: seeded per (seed, update, rank, micro-batch)
        # like the masks, so a run resumed from a checkpoint draws what the uninterrupted run drew (fairseq's
        # Trainer._set_seed); salt 1 keeps these draws apart from the mask generator's
        torch.manual_seed(self._step_key(self.global_step, self.global_rank, salt=1))
        for module in self.modules():
            if module is not self and hasattr(module, "set_num_updates"):
                module.set_num_updates(self.global_step)

    def _check_finite(self, out: StepOutput, batch: Batch) -> StepOutput | None:
        """`out`, or None when its loss is non-finite and on_nonfinite="skip" (the batch is skipped)."""
        if torch.isfinite(out.loss).all():
            self.skipped_in_a_row = 0
            return out
        ids = [] if batch.ids is None else batch.ids.tolist()
        if self.on_nonfinite == "skip":
            self.skipped_nonfinite += 1
            self.skipped_in_a_row += 1
            if self.skipped_in_a_row >= self.max_skipped_steps:
                raise NonFiniteLossError(
                    f"{self.skipped_in_a_row} consecutive batches had a non-finite loss (the last, "
                    f"{out.loss.item()}, at step {self.global_step} on samples {ids}; max_skipped_steps="
                    f"{self.max_skipped_steps}): the run has diverged; lower the learning rate or lengthen its "
                    "warmup, and resume from a checkpoint before the divergence"
                )
            self.log("train/skipped_nonfinite", float(self.skipped_nonfinite))
            return None
        raise NonFiniteLossError(
            f"non-finite loss {out.loss.item()} at step {self.global_step} on samples {ids}; "
            "set on_nonfinite: skip to skip such batches, or lower the learning rate"
        )

    def _log_metrics(self, stage: str, out: StepOutput) -> None:
        on_step = stage == "train"
        self.log(f"{stage}/loss", out.loss.detach(), batch_size=out.batch_size, prog_bar=True, sync_dist=not on_step,
                 on_step=on_step, on_epoch=not on_step)
        for name, value in out.metrics.items():
            value = value.detach().float() if isinstance(value, Tensor) else float(value)
            self.log(f"{stage}/{name}", value, batch_size=out.batch_size, sync_dist=not on_step,
                     on_step=on_step, on_epoch=not on_step)

    # packed text rows (Batch.segments, TextDataModule break_mode="documents") mean nothing to an objective
    # that does not hand them to its encoder: it would attend across documents; such a batch is refused
    reads_segments = False

    def refuse_segments(self, batch: Batch) -> None:
        if batch.segments and not self.reads_segments:
            raise ValueError(f"{type(self).__name__} does not read packed rows (Batch.segments, from a "
                             "TextDataModule with break_mode='documents'); use break_mode 'complete' or 'none'")

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        self.refuse_segments(batch)
        counted = self._update_count
        out = self.step(batch)
        checked = self._check_finite(out, batch)
        if checked is None:
            # a skipped micro-batch contributes no gradient, so its positions leave the update's count too (else
            # the other micro-batches' gradients would be divided by positions that were never backpropagated)
            self._update_count = counted
            # skipped: a zero loss on the parameters themselves, not through the batch's graph (0 x a NaN
            # activation's gradient is NaN, and the update would poison the weights), so every parameter gets an
            # exact zero gradient and every rank's backward stays in step; no loss is logged (a bar showing 0.000
            # would hide the skip)
            return sum((p.sum() * 0.0 for p in self.parameters() if p.requires_grad), out.loss.new_zeros(()))
        self._log_metrics("train", checked)
        return checked.loss

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self._micro = 0
        self.refuse_segments(batch)
        out = self.step(batch)
        if not torch.isfinite(out.loss).all() and self.on_nonfinite == "raise":
            ids = [] if batch.ids is None else batch.ids.tolist()
            raise NonFiniteLossError(
                f"non-finite validation loss {out.loss.item()} at step {self.global_step} (validation batch "
                f"{batch_idx}, samples {ids}); set on_nonfinite: skip to log it and go on, or lower the learning rate"
            )
        self._log_metrics("val", out)  # under "skip" a NaN is logged as NaN: the epoch's val/loss shows it

    def optimizer_step(self, *args, **kwargs) -> None:
        """Lightning's step, then the weights checked: a non-finite weight stops the run here, before a
        checkpoint callback could save it."""
        super().optimizer_step(*args, **kwargs)
        self.check_weights()

    def check_weights(self) -> None:
        """Raise NonFiniteLossError naming the step and the first non-finite parameter (all ranks agree)."""
        bad = first_nonfinite(self.named_parameters())
        if self.attached and self.trainer.world_size > 1:  # FSDP shards differ; every rank must stop together
            flag = torch.tensor(float(bad is not None), device=self.device)
            if float(self.trainer.strategy.reduce(flag, reduce_op="sum")) == 0:
                return
        elif bad is None:
            return
        step = self.global_step if self.attached else 0
        where = bad or "another rank's shard"
        raise NonFiniteLossError(
            f"non-finite weights after the update of step {step}: first {where}; the update "
            "diverged (lower the learning rate or lengthen its warmup; set gradient_clip_val) and nothing after it "
            "is saved: resume from the last checkpoint"
        )

    def checkpoint_metadata(self) -> dict:
        """Objective settings an export needs beyond the weights (e.g. wav2vec 2.0's current Gumbel τ);
        plain JSON-able values, stored in every checkpoint under checkpoint["omnissl"]["metadata"]."""
        return {}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Describe the encoder by its constructor arguments (backbones/config.py) so `omnissl export` can
        rebuild it from a weights-only load, without the recipe and without unpickling code; with the text of
        the DataModule's tokenizer file (`tokenizer_path`) under "tokenizer" when it has one."""
        info: dict = {
            "objective": f"{type(self).__module__}.{type(self).__qualname__}",
            "heads": {name: f"{type(m).__module__}.{type(m).__qualname__}"
                      for name, m in self.named_children() if name != "encoder"},
            "metadata": self.checkpoint_metadata(),
        }
        # a text run's tokenizer travels with its checkpoint (exports write it as tokenizer.json)
        tokenizer = getattr(self.trainer.datamodule, "tokenizer_path", None) if self.attached else None
        if tokenizer is not None:
            info["tokenizer"] = Path(tokenizer).read_text(encoding="utf-8")
        encoder = getattr(self, "encoder", None)
        try:
            info["encoder"] = module_config(encoder)
        except ValueError as e:  # e.g. a timm backbone: still checkpointed, just not exportable
            info["encoder_error"] = str(e)
        checkpoint["omnissl"] = info

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self.scale_grads_to_update_count()
        if self.global_step % max(1, self.trainer.log_every_n_steps) == 0:
            self.log("train/grad_norm", grad_norm(self.parameters()), on_step=True, on_epoch=False)

    def configure_model(self) -> None:
        """FSDP2 under Lightning's ModelParallelStrategy: shard every transformer block, then each top-level
        child (so an EMA teacher is sharded like its student). Weight-decay groups are decided by name in
        configure_optimizers, which runs after this and sees the same parameter names."""
        if not self.attached or not isinstance(self.trainer.strategy, ModelParallelStrategy):
            return
        from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

        own = [name for name, p in self.named_parameters(recurse=False) if p.requires_grad]
        if own:  # only child modules are sharded: these would train unreduced, a different model on every rank
            raise ValueError(f"{type(self).__name__} has trainable parameters of its own ({', '.join(own)}): FSDP2 "
                             f"shards child modules only, so their gradients would not be reduced across ranks; "
                             f"hold them in a child module (as CLAP's LogitScale)")
        mesh = self.device_mesh["data_parallel"]
        for module in self.modules():
            if isinstance(module, Block):
                fully_shard(module, mesh=mesh)
        for child in self.children():
            if any(p.requires_grad for p in child.parameters()):
                fully_shard(child, mesh=mesh)
                for method in ("embed", "encode"):  # backbone entry points other than forward()
                    if callable(getattr(type(child), method, None)):
                        register_fsdp_forward_method(child, method)

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(param_groups(self, self.weight_decay))
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
