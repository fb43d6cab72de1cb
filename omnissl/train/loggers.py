"""Logger set-up used by the CLI and the recipes (recipes/trainer/*.yaml): W&B when it can log, else CSV, and
the resolved config in the run."""

from __future__ import annotations

import netrc
import os
from pathlib import Path

from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger, Logger


def _wandb_credentials() -> bool:
    """Whether W&B can log online: WANDB_API_KEY is set or ~/.netrc holds api.wandb.ai."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def wandb_mode() -> str:
    """How a W&B run of this process would log: "disabled" (WANDB_MODE=disabled), "offline" (WANDB_MODE=offline,
    or no credentials: `wandb sync` uploads later, never a login prompt) or "online"."""
    env = os.environ.get("WANDB_MODE", "")
    if env == "disabled":
        return "disabled"
    return "offline" if env == "offline" or not _wandb_credentials() else "online"


def auto_logger(*, project: str = "omnissl", name: str | None = None, save_dir: str = "runs",
                mode: str = "auto") -> Logger:
    """W&B when it can log, else CSV.

    mode="auto": CSV when WANDB_MODE=disabled; W&B online with credentials (WANDB_API_KEY or ~/.netrc),
    offline otherwise (or when WANDB_MODE=offline; `wandb sync` uploads later). mode="wandb"/"csv" force one.
    """
    if mode not in ("auto", "wandb", "csv"):
        raise ValueError(f"logger mode must be auto, wandb or csv, got {mode!r}")
    wandb = wandb_mode()
    if mode == "csv" or (mode == "auto" and wandb == "disabled"):
        return CSVLogger(save_dir=save_dir, name=name or project)
    from lightning.pytorch.loggers import WandbLogger  # imported lazily: `import omnissl` stays light

    Path(save_dir).mkdir(parents=True, exist_ok=True)
    offline = wandb == "offline" or not _wandb_credentials()
    return WandbLogger(project=project, name=name, save_dir=save_dir, offline=offline)


class SaveConfigToRun(SaveConfigCallback):
    """Writes the resolved config next to the checkpoints and into the W&B run's config."""

    def save_config(self, trainer, pl_module, stage: str) -> None:
        from lightning.pytorch.loggers import WandbLogger

        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.experiment.config.update(self.config.as_dict(), allow_val_change=True)
