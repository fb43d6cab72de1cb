"""Logger set-up used by the CLI and the recipes (recipes/trainer/*.yaml): W&B when it can log, else CSV, and
the resolved config in the run."""

from __future__ import annotations

import netrc
import os
import warnings
from pathlib import Path

from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger, Logger

from omnissl.train.runs import save_run_config


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


def auto_logger(*, project: str = "omnissl", name: str | None = None, save_dir: str = "runs", mode: str = "auto",
                entity: str | None = None, group: str | None = None, tags: list[str] | None = None,
                notes: str | None = None, id: str | None = None, resume: str | None = None,
                log_model: bool | str = False, job_type: str | None = None) -> Logger:
    """W&B when it can log, else CSV.

    mode="auto": CSV (save_dir/project/version_<k>) when WANDB_MODE=disabled; W&B online with credentials (WANDB_API_KEY or ~/.netrc),
    offline otherwise (or when WANDB_MODE=offline; `wandb sync` uploads later). mode="wandb"/"csv" force one.
    entity, project, group, tags, notes, job_type: W&B's run fields. id + resume ("allow", "must", "never"):
    which W&B run to continue (`omnissl fit` passes the run folder's id with "allow", so a resumed fit continues
    its W&B run). log_model: True logs checkpoints as W&B artifacts at the end, "all" as they are written.
    """
    if mode not in ("auto", "wandb", "csv"):
        raise ValueError(f"logger mode must be auto, wandb or csv, got {mode!r}")
    if resume not in (None, "allow", "must", "never", "auto"):
        raise ValueError(f"logger resume must be allow, must, never or auto, got {resume!r}")
    wandb = wandb_mode()
    if mode == "csv" or (mode == "auto" and wandb == "disabled"):
        return CSVLogger(save_dir=save_dir, name=project)  # save_dir/project/version_<k>: one per launch
    from lightning.pytorch.loggers import WandbLogger  # imported lazily: `import omnissl` stays light

    Path(save_dir).mkdir(parents=True, exist_ok=True)
    offline = wandb == "offline" or not _wandb_credentials()
    extra = {k: v for k, v in {"entity": entity, "group": group, "tags": tags, "notes": notes, "resume": resume,
                               "job_type": job_type}.items() if v is not None}
    if offline and log_model:  # W&B cannot upload artifacts offline (WandbLogger refuses the pair)
        warnings.warn(f"W&B logs offline here: log_model={log_model!r} is ignored (checkpoints stay in {save_dir})",
                      stacklevel=2)
        log_model = False
    if wandb == "disabled":  # mode="wandb" forced under WANDB_MODE=disabled: W&B's own no-op run
        extra["mode"] = "disabled"
    logger = WandbLogger(project=project, name=name, save_dir=save_dir, offline=offline, id=id,
                         log_model=log_model, **extra)
    # NOTE: Lightning 2.6 hands wandb.init anonymous=None, which wandb 0.31 answers on every run with "The
    # anonymous setting has no effect and will be removed"; left out, wandb keeps its default (what None meant).
    getattr(logger, "_wandb_init", {}).pop("anonymous", None)
    return logger


class SaveConfigToRun(SaveConfigCallback):
    """Writes the resolved config into the run folder (`omnissl fit`: `run_dir`, see omnissl/train/runs.py;
    never overwriting another launch's) and into the W&B run's config. Without a run folder (validate, test)
    only the W&B config is written."""

    def __init__(self, *args, run_dir: str | None = None, **kwargs) -> None:
        kwargs.pop("overwrite", None)
        super().__init__(*args, **kwargs)
        self.run_dir = run_dir

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.already_saved:
            return
        if trainer.is_global_zero:
            if self.run_dir is not None:
                config = self.config.clone()
                # the saved config re-runs (and so resumes) the run itself: `omnissl fit -c <run>/config.yaml`
                config["ckpt_path"] = None
                config["trainer.default_root_dir"] = str(Path(self.run_dir).parent)
                save_run_config(Path(self.run_dir), self.parser.dump(config, skip_none=False))
            self.save_config(trainer, pl_module, stage)
        self.already_saved = True

    def save_config(self, trainer, pl_module, stage: str) -> None:
        from lightning.pytorch.loggers import WandbLogger

        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.experiment.config.update(self.config.as_dict(), allow_val_change=True)
