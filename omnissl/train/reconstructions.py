"""MAE / AudioMAE reconstructions during training: every `every_n_steps` updates, a figure of a few fixed
samples (rows) with their input, masked input and reconstruction (columns), saved as
`<run>/figures/<name>-step<N>.png` and logged to W&B by `omnissl.train.figures.save_figure`.

    trainer.callbacks+: [{class_path: omnissl.train.reconstructions.Reconstructions,
                          init_args: {every_n_steps: 200, num_samples: 4}}]

Works with any objective that has `reconstruct(batch, seed=) -> {"input", "masked", "reconstruction"}`
(pictures: images (B, C, H, W) or spectrograms (B, frames, bins); NaN marks what is not shown), i.e.
`omnissl.ssl.mae.MAE`. The samples are the first `num_samples` of the first validation batch (the first
training batch when the run has no validation data), taken once, so every figure shows the same samples under
the same mask.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

from omnissl.batch import Batch
from omnissl.train.figures import new_figure, save_figure

COLUMNS = ("input", "masked", "reconstruction")


def first_batch(trainer: Any, fallback: Batch) -> tuple[Batch, str]:
    """The first validation batch of the run's datamodule, or `fallback` (with its split name)."""
    dm = getattr(trainer, "datamodule", None)
    loader = None
    if dm is not None and trainer.limit_val_batches != 0:
        try:
            loader = dm.val_dataloader()
        except Exception:  # a datamodule without validation data
            loader = None
    if isinstance(loader, (list, tuple)):
        loader = loader[0] if loader else None
    if loader is not None:
        for batch in loader:
            return batch, "valid"
    return fallback, "train"


def head(batch: Batch, n: int) -> Batch:
    """The first n samples of a batch."""
    cut = lambda d: {k: v[:n] for k, v in d.items()}  # noqa: E731
    return Batch(cut(batch.inputs), cut(batch.lengths), cut(batch.targets), None if batch.ids is None else batch.ids[:n])


def picture(x: torch.Tensor) -> np.ndarray:
    """(C, H, W) image -> (H, W[, 3]) array for imshow; (frames, bins) spectrogram -> (bins, frames)."""
    a = x.detach().float().cpu().numpy()
    if a.ndim == 3:
        return a[0] if a.shape[0] == 1 else np.transpose(a[:3], (1, 2, 0))
    return a.T


def draw(pictures: dict[str, torch.Tensor], title: str):
    """A figure: one row per sample, columns input / masked / reconstruction, one colour scale per row."""
    n = pictures["input"].shape[0]
    spectrogram = pictures["input"].dim() == 3
    width = 4.0 if spectrogram else 1.8
    fig, axes = new_figure(n, len(COLUMNS), figsize=(width * len(COLUMNS), 1.8 * n + 0.4), squeeze=False)
    for i in range(n):
        ref = picture(pictures["input"][i])
        lo, hi = float(np.nanmin(ref)), float(np.nanmax(ref))
        for j, name in enumerate(COLUMNS):
            a = picture(pictures[name][i])
            ax = axes[i][j]
            if a.ndim == 3:  # colour: scale with the input's range, NaN (removed) grey
                rgb = np.clip((a - lo) / max(hi - lo, 1e-6), 0.0, 1.0)
                rgb[np.isnan(a)] = 0.5
                ax.imshow(rgb, interpolation="nearest")
            else:
                cmap = "magma" if spectrogram else "gray"
                ax.imshow(np.ma.masked_invalid(a), cmap=cmap, vmin=lo, vmax=hi, interpolation="nearest",
                          origin="lower" if spectrogram else "upper", aspect="auto" if spectrogram else "equal")
                ax.set_facecolor("0.5")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(name, fontsize=9)
    fig.suptitle(title, fontsize=9)
    return fig


class Reconstructions(Callback):
    """Every `every_n_steps` optimizer updates (and at the end of training), draw `num_samples` fixed samples'
    reconstructions and save them under `name` (`<run>/figures/<name>-step<N>.png`, W&B image). `seed` fixes
    the mask. Only global rank 0 draws; the objective must have `reconstruct`."""

    def __init__(self, *, every_n_steps: int = 200, num_samples: int = 4, seed: int = 0,
                 name: str = "reconstructions") -> None:
        if every_n_steps < 1 or num_samples < 1:
            raise ValueError(f"every_n_steps and num_samples must be >= 1, got {every_n_steps}, {num_samples}")
        self.every_n_steps, self.num_samples, self.seed, self.name = every_n_steps, num_samples, seed, name
        self.samples: Batch | None = None
        self.split = "train"
        self.last_step = -1
        self.latest: Batch | None = None

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        if not callable(getattr(pl_module, "reconstruct", None)):
            raise TypeError(f"Reconstructions needs an objective with reconstruct(batch), got "
                            f"{type(pl_module).__name__}")

    def draw_now(self, trainer: Any, pl_module: Any, batch: Batch) -> None:
        step = trainer.global_step
        if step == self.last_step or not trainer.is_global_zero:
            return
        self.last_step = step
        if self.samples is None:
            found, self.split = first_batch(trainer, batch)
            self.samples = head(found, self.num_samples)
        pics = pl_module.reconstruct(self.samples.to(pl_module.device), seed=self.seed)
        title = f"{type(pl_module).__name__} reconstructions, {self.split} samples, step {step}"
        save_figure(trainer, draw({k: pics[k] for k in COLUMNS}, title), self.name, step=step)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Batch, batch_idx: int) -> None:
        if trainer.global_step > 0 and trainer.global_step % self.every_n_steps == 0:
            self.draw_now(trainer, pl_module, batch)
        self.latest = batch

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if self.latest is not None:
            self.draw_now(trainer, pl_module, self.latest)
