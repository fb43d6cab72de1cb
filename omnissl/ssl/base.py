"""`SSLModule`: the thin LightningModule every objective subclasses.

It owns what objectives share and nothing else: the injected optimizer and scheduler, weight-decay groups,
per-update hooks (`set_num_updates` on every submodule that has one: layerdrop seed, Gumbel temperature,
EMA decay), reproducible mask generators, global loss normalization, the non-finite-loss guard, and
logging. An objective implements `step(batch) -> StepOutput` and returns metrics; only this class logs.
"""

from __future__ import annotations

import abc
from typing import Callable, NamedTuple

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import Tensor

from omnissl.backbones.config import module_config
from omnissl.backbones.transformer import Block
from omnissl.batch import Batch
from omnissl.optim import global_normalize, grad_norm, param_groups


class StepOutput(NamedTuple):
    """loss: scalar to backpropagate (already globally normalized); metrics: scalars to log;
    batch_size: for weighting epoch averages."""

    loss: Tensor
    metrics: dict[str, Tensor | float]
    batch_size: int


class NonFiniteLossError(RuntimeError):
    pass


def _adamw(params) -> torch.optim.Optimizer:
    # fairseq wav2vec 2.0 / RoBERTa: Adam betas (0.9, 0.98), eps 1e-6, lr 5e-4 (REFERENCE §B.1, §B.2)
    return torch.optim.AdamW(params, lr=5e-4, betas=(0.9, 0.98), eps=1e-6)


class SSLModule(L.LightningModule, abc.ABC):
    """Base of every objective.

    optimizer / lr_scheduler: callables injected by LightningCLI (`optimizer: class_path: torch.optim.AdamW`);
    the scheduler steps per optimizer step. weight_decay: applied to the decay group only (see
    omnissl/optim.py). seed: mask generators are seeded by (seed, update, rank, micro-batch).
    on_nonfinite: "raise" stops the run naming the step and sample ids; "skip" zeroes the batch's loss
    and counts it.
    """

    def __init__(
        self,
        *,
        optimizer: OptimizerCallable = _adamw,
        lr_scheduler: LRSchedulerCallable | None = None,
        weight_decay: float = 0.01,
        seed: int = 0,
        on_nonfinite: str = "raise",
    ) -> None:
        super().__init__()
        if on_nonfinite not in ("raise", "skip"):
            raise ValueError(f"on_nonfinite must be 'raise' or 'skip', got {on_nonfinite!r}")
        self.optimizer_factory, self.scheduler_factory = optimizer, lr_scheduler
        self.weight_decay, self.seed, self.on_nonfinite = weight_decay, seed, on_nonfinite
        self.skipped_nonfinite = 0
        self._micro = 0

    # --- what objectives implement -------------------------------------------------------------------

    @abc.abstractmethod
    def step(self, batch: Batch) -> StepOutput:
        """Compute the loss (globally normalized) and metrics of one batch."""

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
        """Summed loss -> gradient of the global mean over all ranks' predicted positions (fairseq)."""
        count = torch.as_tensor(count, device=loss_sum.device, dtype=torch.float32)
        if not self.attached or self.trainer.world_size == 1:
            return loss_sum / count.clamp(min=1)
        return global_normalize(loss_sum, count, self.all_gather(count), self.trainer.world_size)

    # --- Lightning hooks --------------------------------------------------------------------------------

    def on_train_batch_start(self, batch: Batch, batch_idx: int) -> None:
        accumulate = self.trainer.accumulate_grad_batches if self.attached else 1
        self._micro = batch_idx % accumulate
        # dropout and any other draw from torch's global generators: seeded per (seed, update, rank, micro-batch)
        # like the masks, so a run resumed from a checkpoint draws what the uninterrupted run drew (fairseq's
        # Trainer._set_seed); salt 1 keeps these draws apart from the mask generator's
        torch.manual_seed(self._step_key(self.global_step, self.global_rank, salt=1))
        for module in self.modules():
            if module is not self and hasattr(module, "set_num_updates"):
                module.set_num_updates(self.global_step)

    def _check_finite(self, out: StepOutput, batch: Batch) -> StepOutput:
        if torch.isfinite(out.loss).all():
            return out
        ids = [] if batch.ids is None else batch.ids.tolist()
        if self.on_nonfinite == "skip":
            self.skipped_nonfinite += 1
            self.log("train/skipped_nonfinite", float(self.skipped_nonfinite))
            return StepOutput(out.loss.nan_to_num(0.0, 0.0, 0.0) * 0.0, {}, out.batch_size)
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

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        out = self._check_finite(self.step(batch), batch)
        self._log_metrics("train", out)
        return out.loss

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self._micro = 0
        out = self.step(batch)
        if torch.isfinite(out.loss):
            self._log_metrics("val", out)

    def checkpoint_metadata(self) -> dict:
        """Objective settings an export needs beyond the weights (e.g. wav2vec 2.0's current Gumbel τ);
        plain JSON-able values, stored in every checkpoint under checkpoint["omnissl"]["metadata"]."""
        return {}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Describe the encoder by its constructor arguments (backbones/config.py) so `omnissl export` can
        rebuild it from a weights-only load, without the recipe and without unpickling code."""
        info: dict = {
            "objective": f"{type(self).__module__}.{type(self).__qualname__}",
            "heads": {name: f"{type(m).__module__}.{type(m).__qualname__}"
                      for name, m in self.named_children() if name != "encoder"},
            "metadata": self.checkpoint_metadata(),
        }
        encoder = getattr(self, "encoder", None)
        try:
            info["encoder"] = module_config(encoder)
        except ValueError as e:  # e.g. a timm backbone: still checkpointed, just not exportable
            info["encoder_error"] = str(e)
        checkpoint["omnissl"] = info

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.global_step % max(1, self.trainer.log_every_n_steps) == 0:
            self.log("train/grad_norm", grad_norm(self.parameters()), on_step=True, on_epoch=False)

    def configure_model(self) -> None:
        """FSDP2 under Lightning's ModelParallelStrategy: shard every transformer block, then each top-level
        child (so an EMA teacher is sharded like its student). Weight-decay groups are decided by name in
        configure_optimizers, which runs after this and sees the same parameter names."""
        if not self.attached or not isinstance(self.trainer.strategy, ModelParallelStrategy):
            return
        from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

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
