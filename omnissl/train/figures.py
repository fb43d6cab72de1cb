"""Pictures of a run: one way to save a matplotlib figure as a PNG in the run folder and log it to W&B.

Every picture a callback or an objective draws during training (MAE reconstructions, codebook usage, unit
usage, target variance, the run summary) goes through `save_figure`, so that all of them land in
`<run folder>/figures/<name>-step<global step>.png` and, when the trainer has a W&B logger, in the W&B run
under `name` at that step. Only global rank 0 writes; the figure is closed in every case.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def new_figure(*args: Any, **kwargs: Any):
    """`plt.subplots(*args, **kwargs)` on the non-interactive Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(*args, **kwargs)


def figure_path(folder: str | Path, name: str, step: int | None) -> Path:
    """<folder>/figures/<name>[-step<step>].png; `name` may hold '/' (W&B panel groups) and becomes '-'."""
    stem = name.replace("/", "-")
    if step is not None:
        stem = f"{stem}-step{step}"
    return Path(folder) / "figures" / f"{stem}.png"


def save_figure(trainer: Any, fig: Any, name: str, *, step: int | None = None, dpi: int = 110) -> Path | None:
    """Save `fig` as a PNG in the run folder (`trainer.default_root_dir`) and log it to W&B; close it.

    `step` defaults to the trainer's global step. Returns the PNG's path on rank 0, None elsewhere."""
    import matplotlib.pyplot as plt
    from lightning.pytorch.loggers import WandbLogger

    try:
        if not trainer.is_global_zero:
            return None
        step = trainer.global_step if step is None else step
        path = figure_path(trainer.default_root_dir, name, step)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=dpi, bbox_inches="tight")
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(key=name, images=[str(path)], step=step)
        return path
    finally:
        plt.close(fig)
