"""Pictures of what a run learned, drawn by one Lightning callback from what the objectives already log or
compute (nothing in an objective changes): PNGs in `<run folder>/figures/` and images in the W&B run, through
`omnissl.train.figures.save_figure`.

    trainer.callbacks: [{class_path: omnissl.train.pictures.Pictures, init_args: {every_n_steps: 200}}]

What it draws, each where it applies (recipes/trainer/cpu.yaml and default.yaml enable it):

- `codebook_usage` (wav2vec 2.0): how often each entry of each codebook group was the argmax choice since the
  last picture (a forward hook on the objective's `quantizer` reads its codes), the entries in use per group
  over training (in windows of `trainer.log_every_n_steps` steps), and the logged code / prob perplexities against G x V.
- `unit_usage` (HuBERT): frames per unit of the batches' `units` targets (the batches of the logger's steps,
  every `trainer.log_every_n_steps`), sorted, and, when the batches carry
  utterance labels (`targets["label"]`), unit purity (HuBERT's cluster purity: the share of a unit's frames
  that carry its most frequent label) and label purity over training.
- `target_variance` (data2vec v1 / 2.0): the logged `train/target_var` and `train/pred_var` (fairseq's
  compute_var, omnissl/ssl/monitors.py) over training, with the collapse guards' thresholds.
- `run_summary`, after fit: train and valid loss, every other logged train metric (the monitors), and the
  online probe's accuracy when an OnlineProbe ran, on one page.

`every_n_steps` (0: only at the end of fit) draws the usage / variance pictures during training as well.
Only global rank 0 draws; the statistics it draws are that rank's (the logged metrics are global).
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from omnissl.batch import IGNORE_INDEX
from omnissl.eval.online_probe import OnlineProbe
from omnissl.train.figures import new_figure, save_figure

# logged metrics not worth a panel of the summary
SKIP = ("train/loss", "val/loss", "train/grad_norm_step", "epoch", "step")


def purity(counts: Tensor) -> tuple[float, float]:
    """(unit purity, label purity) of a (units, labels) co-occurrence count matrix: the share of frames that
    carry their unit's most frequent label, and the share that fall in their label's most frequent unit."""
    total = counts.sum().clamp(min=1)
    return float(counts.max(1).values.sum() / total), float(counts.max(0).values.sum() / total)


class Pictures(Callback):
    """See the module docstring. every_n_steps: also draw during training every that many optimizer steps
    (0: at the end of fit only). summary: draw the one-page run summary after fit."""

    def __init__(self, every_n_steps: int = 0, summary: bool = True) -> None:
        if every_n_steps < 0:
            raise ValueError(f"every_n_steps must be >= 0, got {every_n_steps}")
        self.every_n_steps, self.summary = every_n_steps, summary
        self.history: dict[str, list[tuple[int, float]]] = defaultdict(list)  # metric -> [(step, value)]
        self.code_counts: Tensor | None = None  # (G, V) argmax choices since the last drawing
        self.window_counts: Tensor | None = None  # (G, V) choices since the last logger step
        self.entries_used: list[tuple[int, list[int]]] = []  # (step, entries in use per group in that window)
        self.unit_counts: Tensor | None = None  # (K,) frames per unit since the start
        self.unit_labels: Tensor | None = None  # (K, L) frames per (unit, utterance label) since the last drawing
        self.purities: list[tuple[int, float, float]] = []  # (step, unit purity, label purity)
        self.probe_runs = 0
        self.last_drawn = -1
        self.hook = None

    # ---- collection ----------------------------------------------------------------------------------------

    def on_fit_start(self, trainer, pl_module) -> None:
        quantizer = getattr(pl_module, "quantizer", None)
        if quantizer is not None and hasattr(quantizer, "groups") and self.hook is None:
            self.hook = quantizer.register_forward_hook(self.count_codes)

    def count_codes(self, module, inputs, output) -> None:
        if not module.training or not hasattr(output, "codes"):
            return  # validation batches are not counted
        codes = output.codes.detach().reshape(-1, module.groups)  # (frames, G) entry ids
        counts = F.one_hot(codes, module.entries).sum(0)  # (G, V), on the codes' device: no host sync per step
        self.code_counts = counts if self.code_counts is None else self.code_counts + counts
        self.window_counts = counts if self.window_counts is None else self.window_counts + counts

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        step = trainer.global_step
        self.read_probe(trainer)
        if step % max(1, trainer.log_every_n_steps) == 0:  # at the logger's steps (a read costs a device sync)
            for name, value in trainer.callback_metrics.items():
                if name.startswith("train/") and not name.endswith("_epoch") and value.numel() == 1:
                    series = self.history[name]
                    if not series or series[-1][0] != step:
                        series.append((step, float(value)))
            if self.window_counts is not None:
                self.entries_used.append((step, (self.window_counts > 0).sum(1).tolist()))
                self.window_counts = None
            units = getattr(batch, "targets", {}).get("units")
            if units is not None:
                self.count_units(units, batch.targets.get("label"))
        if self.every_n_steps and step % self.every_n_steps == 0 and step != self.last_drawn:
            self.draw_usage(trainer, pl_module)

    def read_probe(self, trainer) -> None:
        """The online probe's latest metrics, at the step it ran, once per probe run."""
        for cb in trainer.callbacks:
            if isinstance(cb, OnlineProbe) and cb.num_probes > self.probe_runs and cb.metrics:
                self.probe_runs = cb.num_probes
                for name, value in cb.metrics.items():
                    self.history[name].append((cb.last_step, float(value)))

    def count_units(self, units: Tensor, labels: Tensor | None) -> None:
        units = units.detach().cpu()
        valid = units != IGNORE_INDEX
        k = int(units.max()) + 1 if valid.any() else 0
        if self.unit_counts is None or len(self.unit_counts) < k:
            grown = torch.zeros(max(k, 1), dtype=torch.long)
            if self.unit_counts is not None:
                grown[: len(self.unit_counts)] = self.unit_counts
            self.unit_counts = grown
        self.unit_counts += torch.bincount(units[valid], minlength=len(self.unit_counts))
        if labels is None:
            return
        frame_labels = labels.detach().cpu()[:, None].expand_as(units)[valid]
        shape = (len(self.unit_counts), max(int(frame_labels.max()) + 1, 1))
        if self.unit_labels is None or self.unit_labels.shape[0] < shape[0] or self.unit_labels.shape[1] < shape[1]:
            grown = torch.zeros(max(shape[0], 0 if self.unit_labels is None else self.unit_labels.shape[0]),
                                max(shape[1], 0 if self.unit_labels is None else self.unit_labels.shape[1]),
                                dtype=torch.long)
            if self.unit_labels is not None:
                grown[: self.unit_labels.shape[0], : self.unit_labels.shape[1]] = self.unit_labels
            self.unit_labels = grown
        flat = units[valid] * self.unit_labels.shape[1] + frame_labels
        self.unit_labels += torch.bincount(flat, minlength=self.unit_labels.numel()).view_as(self.unit_labels)

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        for name, value in trainer.callback_metrics.items():
            if name.startswith("val/") and value.numel() == 1:
                self.history[name].append((trainer.global_step, float(value)))

    def on_fit_end(self, trainer, pl_module) -> None:
        self.read_probe(trainer)  # a probe at the last step ran after this callback's last batch hook
        if trainer.global_step != self.last_drawn:
            self.draw_usage(trainer, pl_module)
        if self.summary and self.history:
            self.draw_summary(trainer, pl_module)
        if self.hook is not None:
            self.hook.remove()
            self.hook = None

    # ---- pictures ------------------------------------------------------------------------------------------

    def draw_usage(self, trainer, pl_module) -> None:
        self.last_drawn = trainer.global_step
        if self.code_counts is not None:
            self.draw_codebook(trainer, pl_module)
        if self.unit_counts is not None:
            self.draw_units(trainer)
        if "train/target_var" in self.history:
            self.draw_variance(trainer, pl_module)

    def draw_codebook(self, trainer, pl_module) -> None:
        counts = self.code_counts.cpu()
        self.code_counts = None  # the next window starts empty
        groups, entries = counts.shape
        fig, axes = new_figure(1, 3, figsize=(15, 3.8), gridspec_kw={"width_ratios": [2.2, 1, 1]})
        shares = counts.float() / counts.sum(1, keepdim=True).clamp(min=1)
        image = axes[0].imshow(shares.numpy(), aspect="auto", interpolation="nearest", cmap="viridis")
        axes[0].set_yticks(range(groups), [f"group {g + 1}" for g in range(groups)])
        axes[0].set_xlabel(f"codebook entry (of {entries})")
        fig.colorbar(image, ax=axes[0], label="share of frames")
        axes[0].set_title(f"codebook usage, step {trainer.global_step} (window since the last picture)")
        steps = [s for s, _ in self.entries_used]
        for g in range(groups):
            axes[1].plot(steps, [used[g] for _, used in self.entries_used], marker="o", label=f"group {g + 1}")
        axes[1].axhline(entries, color="grey", ls=":", label=f"V = {entries}")
        axes[1].set(xlabel="step", ylabel="entries in use", ylim=(0, entries * 1.05),
                    title=f"entries used per group (windows of {trainer.log_every_n_steps} steps)")
        axes[1].legend(fontsize=8)
        for name in ("train/code_perplexity", "train/prob_perplexity"):
            if self.history.get(name):
                s, v = zip(*self.history[name])
                axes[2].plot(s, v, label=name.split("/")[1])
        axes[2].axhline(groups * entries, color="grey", ls=":", label=f"G x V = {groups * entries}")
        threshold = getattr(getattr(pl_module, "collapse_guard", None), "threshold", 0)
        if threshold:
            axes[2].axhline(threshold, color="red", ls="--", label=f"collapse guard {threshold:g}")
        axes[2].set(xlabel="step", ylabel="perplexity", title="perplexities", yscale="log")
        axes[2].legend(fontsize=8)
        fig.tight_layout()
        save_figure(trainer, fig, "pictures/codebook_usage")

    def draw_units(self, trainer) -> None:
        counts = self.unit_counts
        if self.unit_labels is not None and self.unit_labels.sum() > 0:
            self.purities.append((trainer.global_step, *purity(self.unit_labels)))
            self.unit_labels = None
        fig, axes = new_figure(1, 2 if self.purities else 1, figsize=(12 if self.purities else 7, 3.8), squeeze=False)
        axes = axes[0]
        order = counts.sort(descending=True).values.float()
        share = order / order.sum().clamp(min=1)
        axes[0].bar(range(len(share)), share.numpy(), width=1.0)
        used = int((counts > 0).sum())
        p = share[share > 0]
        ppl = float(torch.exp(-(p * p.log()).sum())) if len(p) else 0.0
        axes[0].set(xlabel="unit (sorted by frequency)", ylabel="share of frames",
                    title=f"unit usage: {used} of {len(counts)} units, perplexity {ppl:.1f}")
        if self.purities:
            s, unit_p, label_p = zip(*self.purities)
            axes[1].plot(s, unit_p, marker="o", label="unit purity")
            axes[1].plot(s, label_p, marker="o", label="label purity")
            axes[1].set(xlabel="step", ylabel="purity", ylim=(0, 1.02),
                        title="units vs utterance labels (window since the last picture)")
            axes[1].legend(fontsize=8)
        fig.tight_layout()
        save_figure(trainer, fig, "pictures/unit_usage")

    def draw_variance(self, trainer, pl_module) -> None:
        fig, ax = new_figure(figsize=(7, 3.8))
        guards = getattr(pl_module, "guards", None)  # VarianceGuards of both data2vec versions
        for name, guard_name in (("train/target_var", "target"), ("train/pred_var", "pred")):
            if self.history.get(name):
                s, v = zip(*self.history[name])
                (line,) = ax.plot(s, v, label=name.split("/")[1])
                threshold = getattr(getattr(guards, guard_name, None), "threshold", 0)
                if threshold:
                    ax.axhline(threshold, color=line.get_color(), ls="--", lw=1, label=f"min {guard_name} {threshold:g}")
        ax.set(xlabel="step", ylabel="std per dimension (compute_var)", title="data2vec target / prediction variance")
        ax.legend(fontsize=8)
        fig.tight_layout()
        save_figure(trainer, fig, "pictures/target_variance")

    def draw_summary(self, trainer, pl_module) -> None:
        others = sorted(n for n in self.history if n.startswith("train/") and n not in SKIP and len(self.history[n]) > 1)
        probe = sorted(n for n in self.history if n.startswith("probe/") and "acc" in n)  # accuracies only
        panels = 1 + len(others) + (1 if probe else 0)
        cols = min(4, panels)
        rows = math.ceil(panels / cols)
        fig, axes = new_figure(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
        axes = [ax for row in axes for ax in row]
        for name, style in (("train/loss", "-"), ("val/loss", "o-")):
            if self.history.get(name):
                s, v = zip(*self.history[name])
                axes[0].plot(s, v, style, label=name)
        axes[0].set(title="loss", xlabel="step")
        axes[0].legend(fontsize=8)
        for ax, name in zip(axes[1:], others):
            s, v = zip(*self.history[name])
            ax.plot(s, v, lw=1)
            ax.set(title=name.split("/", 1)[1], xlabel="step")
        if probe:
            ax = axes[1 + len(others)]
            for name in probe:
                s, v = zip(*self.history[name])
                ax.plot(s, v, "o-", label=name)
            ax.set(title="online probe", xlabel="step", ylabel="accuracy", ylim=(0, 1))
            ax.legend(fontsize=8)
        for ax in axes[panels:]:
            ax.axis("off")
        fig.suptitle(f"{type(pl_module).__name__}: {trainer.global_step} steps ({trainer.default_root_dir})", fontsize=10)
        fig.tight_layout()
        save_figure(trainer, fig, "pictures/run_summary")

    def state_dict(self) -> dict[str, Any]:
        return {}  # pictures restart with a resumed run (the history lives in the logger)
