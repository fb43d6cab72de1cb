"""Collapse watch for objectives: guards that stop a run whose metric stays past a threshold, fairseq's
`compute_var`, and the monitors both data2vec versions log.

Every function takes the values it needs; a distributed run passes its strategy's `reduce(tensor,
reduce_op=...)` (SSLModule.reducer()) so statistics are global over ranks.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

Reduce = Callable[..., Tensor]  # Lightning's Strategy.reduce(tensor, reduce_op="sum" | "mean")


class CollapseError(RuntimeError):
    """A watched collapse metric stayed past its threshold for longer than the configured patience."""


class CollapseGuard:
    """Counts consecutive optimizer steps a metric stays below `threshold`; raises after `patience` steps.
    threshold <= 0 disables it."""

    def __init__(self, *, name: str, threshold: float, patience: int, remedies: str) -> None:
        self.name, self.threshold, self.patience, self.remedies = name, threshold, patience, remedies
        self.since: int | None = None

    def update(self, value: float, step: int) -> None:
        if self.threshold <= 0:
            return
        if value >= self.threshold:
            self.since = None
            return
        if self.since is None:
            self.since = step
        if step - self.since >= self.patience:
            raise CollapseError(
                f"{self.name} has stayed below {self.threshold} since step {self.since} (now {value:.3g} at "
                f"step {step}): the run has collapsed. Usual remedies: {self.remedies}"
            )


class VarianceGuards:
    """fairseq's data2vec collapse check: after `after_steps` updates, stop when target_var < min_target or
    pred_var < min_pred (<= 0 disables one)."""

    REMEDIES = ("lower the learning rate or lengthen the warmup (fairseq#4177: 7.5e-4 -> 5e-4), check the "
                "precision and batch size (bf16 / smaller batches have collapsed data2vec-family teachers), "
                "and keep instance-normed targets.")

    def __init__(self, *, min_target: float, min_pred: float, after_steps: int) -> None:
        self.after = after_steps
        self.target = CollapseGuard(name="target_var (std of the teacher targets)", threshold=min_target,
                                    patience=0, remedies=self.REMEDIES)
        self.pred = CollapseGuard(name="pred_var (std of the student predictions)", threshold=min_pred,
                                  patience=0, remedies=self.REMEDIES)

    def check(self, target_var: float, pred_var: float, step: int) -> None:
        if step <= self.after:  # fairseq: `num_updates > 5000`
            return
        self.target.update(target_var, step)
        self.pred.update(pred_var, step)


def compute_var(y: Tensor, reduce: Reduce | None = None) -> Tensor:
    """fairseq `compute_var`: per-dimension std over all rows, averaged over dimensions. y (..., D) -> scalar,
    fp32, no grad. reduce: the strategy's reduce when several ranks train (statistics over every rank's rows),
    else None (this rank's rows)."""
    y = y.detach().float().reshape(-1, y.shape[-1])
    if reduce is not None:
        zc = reduce(torch.tensor(float(y.shape[0]), device=y.device), reduce_op="sum")
        zs = reduce(y.sum(0), reduce_op="sum")
        zss = reduce(y.pow(2).sum(0), reduce_op="sum")
        var = zss / (zc - 1) - zs.pow(2) / (zc * (zc - 1))
        return torch.sqrt(var + 1e-6).mean()
    if y.shape[0] < 2:
        return torch.zeros((), device=y.device)
    return torch.sqrt(y.var(dim=0) + 1e-6).mean()


def monitors(*, pred: Tensor, target: Tensor, loss_vs_zero: Tensor, ema_decay: float, masked_frac: float,
             dropped: int, guards: VarianceGuards | None = None, step: int = 0, reduce: Reduce | None = None,
             var_target: Tensor | None = None) -> dict[str, Tensor | float]:
    """The collapse monitors both data2vec versions log: target_var / pred_var (`compute_var`; var_target: the
    rows to measure the targets on, default `target`), ema_decay, masked_frac, loss_vs_zero and, when
    utterances were dropped, dropped_short. guards (training only): checked at optimizer step `step`."""
    target_var = compute_var(target if var_target is None else var_target, reduce)
    pred_var = compute_var(pred, reduce)
    if guards is not None:
        guards.check(float(target_var), float(pred_var), step)
    metrics: dict[str, Tensor | float] = {
        "target_var": target_var,
        "pred_var": pred_var,
        "ema_decay": ema_decay,
        "masked_frac": masked_frac,
        "loss_vs_zero": loss_vs_zero,
    }
    if dropped:
        metrics["dropped_short"] = float(dropped)
    return metrics
