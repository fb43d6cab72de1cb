"""Learning-rate schedules that advance once per optimizer step (Lightning `interval: step`).

Each is a `torch.optim.lr_scheduler.LRScheduler` with a closed-form factor of the update number, so a
resumed run lands on the same value and gradient accumulation does not change the curve. `total_steps` left
unset in a recipe follows `trainer.max_steps` (`omnissl fit` fills it in, omnissl/train/runs.py link_schedule),
so changing one never leaves the other stale; set it only to end the schedule elsewhere on purpose.
"""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler


def _total(total_steps: int | None) -> int:
    if total_steps is None:
        raise ValueError("total_steps is not set: `omnissl fit` sets it from trainer.max_steps; give it when building "
                         "a schedule yourself")
    return int(total_steps)


class _Factor(LRScheduler):
    """Base: lr = base_lr * factor(step)."""

    def factor(self, step: int) -> float:  # pragma: no cover - overridden
        return 1.0

    def get_lr(self) -> list[float]:
        f = self.factor(self.last_epoch)
        return [base * f for base in self.base_lrs]


class WarmupCosine(_Factor):
    """Linear warmup from 0 over `warmup_steps`, then cosine decay to `final_scale`·lr at `total_steps`
    (data2vec 2.0, MAE)."""

    def __init__(self, optimizer: Optimizer, *, warmup_steps: int, total_steps: int | None = None,
                 final_scale: float = 0.0, last_epoch: int = -1) -> None:
        total_steps = _total(total_steps)
        if not 0 <= warmup_steps <= total_steps:
            raise ValueError(f"need 0 <= warmup_steps ({warmup_steps}) <= total_steps ({total_steps})")
        self.warmup_steps, self.total_steps, self.final_scale = warmup_steps, total_steps, final_scale
        super().__init__(optimizer, last_epoch)

    def factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return step / self.warmup_steps
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.final_scale + (1 - self.final_scale) * 0.5 * (1 + math.cos(math.pi * progress))


class WarmupPolynomial(_Factor):
    """Linear warmup, then polynomial decay (power 1 = linear) to `final_scale`·lr at `total_steps`
    (fairseq `polynomial_decay`, used by wav2vec 2.0 and RoBERTa)."""

    def __init__(self, optimizer: Optimizer, *, warmup_steps: int, total_steps: int | None = None, power: float = 1.0,
                 final_scale: float = 0.0, last_epoch: int = -1) -> None:
        total_steps = _total(total_steps)
        if not 0 <= warmup_steps <= total_steps:
            raise ValueError(f"need 0 <= warmup_steps ({warmup_steps}) <= total_steps ({total_steps})")
        self.warmup_steps, self.total_steps = warmup_steps, total_steps
        self.power, self.final_scale = power, final_scale
        super().__init__(optimizer, last_epoch)

    def factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return step / self.warmup_steps
        span = max(1, self.total_steps - self.warmup_steps)
        remaining = max(0.0, 1.0 - (step - self.warmup_steps) / span)
        return self.final_scale + (1 - self.final_scale) * remaining**self.power


class TriStage(_Factor):
    """fairseq's tri-stage schedule (wav2vec 2.0 fine-tuning): linear warmup from `init_scale`·lr, hold,
    then exponential decay to `final_scale`·lr; phases are fractions of `total_steps`."""

    def __init__(self, optimizer: Optimizer, *, total_steps: int | None = None, phase_ratio: tuple[float, float, float] = (0.1, 0.4, 0.5),
                 init_scale: float = 0.01, final_scale: float = 0.05, last_epoch: int = -1) -> None:
        total_steps = _total(total_steps)
        if abs(sum(phase_ratio) - 1.0) > 1e-6:
            raise ValueError(f"phase_ratio must sum to 1, got {phase_ratio}")
        self.warmup = int(total_steps * phase_ratio[0])
        self.hold = int(total_steps * phase_ratio[1])
        self.decay = int(total_steps * phase_ratio[2])
        self.init_scale, self.final_scale = init_scale, final_scale
        super().__init__(optimizer, last_epoch)

    def factor(self, step: int) -> float:
        if step < self.warmup:
            return self.init_scale + (1 - self.init_scale) * step / max(1, self.warmup)
        step -= self.warmup
        if step < self.hold:
            return 1.0
        step -= self.hold
        if step <= self.decay:
            return math.exp(math.log(self.final_scale) * step / max(1, self.decay))
        return self.final_scale
