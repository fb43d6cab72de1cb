"""One folder per training run, resumed by re-running the same command (`omnissl fit`).

    omnissl fit -c recipes/trainer/cpu.yaml -c recipes/audio/wav2vec2_tiny_cpu.yaml --run_name w2v-a
    -> runs/cpu/w2v-a/                   trainer.default_root_dir / run_name
         config.yaml                     the resolved config of the first launch (a later launch whose config
                                         differs adds config.<k>.yaml; none is ever overwritten)
         run.json                        the run's name and W&B run id (a resumed run continues that W&B run)
         checkpoints/last.ckpt ...       every ModelCheckpoint without a dirpath of its own writes here
         wandb/ or <logger>/version_<k>/ the logger's files (CSV: one version folder per launch)

Without `--run_name` the name is `<objective>-<8 hex digits>`, a hash of the resolved config without the keys
that do not change what is trained (run_name, auto_resume, ckpt_path, trainer.default_root_dir, trainer.logger,
trainer.callbacks, trainer.enable_progress_bar): the same command lands in the same folder, a sweep trial or any
other change in a new one. To continue a run under other settings (e.g. a larger trainer.max_steps), name it.

Re-running a command whose folder holds a checkpoint resumes from it (`last.ckpt`, else the newest `*.ckpt`):
weights, optimizer, schedule, loop counters and the data position (omnissl/datamodules/sampler.py), and W&B
continues the same run. A run whose checkpoint reached trainer.max_steps is not trained again.
`--auto_resume false` refuses a folder that already holds checkpoints instead of resuming (nothing is ever
overwritten); `--ckpt_path last` with no checkpoint in the folder is an error naming it; `--ckpt_path FILE`
starts from that file.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omnissl.checkpoints import read_progress

RUN_FILE = "run.json"
CHECKPOINTS = "checkpoints"
# keys that do not change what is trained: left out of the default run name's hash
NOT_IDENTITY = ("run_name", "auto_resume", "ckpt_path", "config", "trainer.default_root_dir", "trainer.logger",
                "trainer.callbacks", "trainer.enable_progress_bar")


class RunError(ValueError):
    """A run folder that cannot be used as asked (the message names the folder and the way out)."""


def _plain(value: Any) -> Any:
    """A jsonargparse Namespace (or anything nested) as plain dicts/lists, for hashing and inspection."""
    if hasattr(value, "as_dict"):
        value = value.as_dict()
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def _drop(tree: dict, dotted: str) -> None:
    *parents, last = dotted.split(".")
    for key in parents:
        tree = tree.get(key)
        if not isinstance(tree, dict):
            return
    tree.pop(last, None)


def default_run_name(config: Any) -> str:
    """`<objective>-<hash>` of a resolved fit config (module docstring)."""
    tree = _plain(config)
    for key in NOT_IDENTITY:
        _drop(tree, key)
    digest = hashlib.sha1(json.dumps(tree, sort_keys=True, default=str).encode()).hexdigest()[:8]
    model = tree.get("model")
    objective = model.get("class_path", "") if isinstance(model, dict) else ""
    objective = objective.rsplit(".", 1)[-1].lower() or "run"
    return f"{objective}-{digest}"


def check_run_name(name: str) -> str:
    if not name or name in (".", "..") or "/" in name or os.sep in name or name.strip() != name:
        raise RunError(f"run_name must be a plain folder name (no '/', not empty), got {name!r}")
    return name


def last_checkpoint(folder: Path) -> Path | None:
    """`folder/checkpoints/last.ckpt`, else the newest `*.ckpt` there; None when there is none."""
    ckpts = Path(folder) / CHECKPOINTS
    if (ckpts / "last.ckpt").exists():
        return ckpts / "last.ckpt"
    found = sorted(ckpts.glob("*.ckpt"), key=lambda p: p.stat().st_mtime) if ckpts.is_dir() else []
    return found[-1] if found else None


def run_info(folder: Path) -> dict:
    """`run.json` of a run folder, written once by the first launch (first writer wins under DDP)."""
    path = Path(folder) / RUN_FILE
    if path.is_file():
        return json.loads(path.read_text())
    info = {"name": Path(folder).name, "wandb_id": os.environ.get("WANDB_RUN_ID") or uuid.uuid4().hex[:8]}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{RUN_FILE}.{os.getpid()}")
    tmp.write_text(json.dumps(info, indent=1) + "\n")
    try:
        os.link(tmp, path)  # atomic and exclusive: another rank's file wins
    except FileExistsError:
        pass
    finally:
        tmp.unlink()
    return json.loads(path.read_text())


def _class(path: str) -> Any:
    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None


def _is(class_path: Any, base: str) -> bool:
    cls = _class(class_path) if isinstance(class_path, str) else None
    target = _class(base)
    return isinstance(cls, type) and target is not None and issubclass(cls, target)


def _logger_args(logger: Any) -> list[tuple[str, Any]]:
    """(class_path, init_args namespace) of each configured logger."""
    items = logger if isinstance(logger, list) else [logger]
    return [(item["class_path"], item["init_args"]) for item in items
            if item is not None and not isinstance(item, bool) and "class_path" in item and "init_args" in item]


def prepare_fit(config: Any) -> dict:
    """Point a parsed `fit` config at its run folder, in place; returns what was decided
    {"folder", "name", "ckpt_path", "resumed", "finished", "step"} (module docstring).

    `config` is LightningCLI's Namespace for the fit subcommand (dotted access, `config["a.b"]`)."""
    name = check_run_name(config.get("run_name") or default_run_name(config))
    root = Path(config.get("trainer.default_root_dir") or ".")
    folder = (root / name).resolve()
    config["run_name"] = name
    config["trainer.default_root_dir"] = str(folder)

    ckpt = config.get("ckpt_path")
    found = last_checkpoint(folder)
    if ckpt == "last":
        if found is None:
            raise RunError(f"--ckpt_path last: run folder {folder} holds no checkpoint ({folder / CHECKPOINTS} has no "
                           "*.ckpt); drop --ckpt_path to start this run, or name another run with --run_name")
        ckpt = str(found)
    elif ckpt is None and found is not None:
        if not config.get("auto_resume", True):
            raise RunError(f"run folder {folder} already holds checkpoints ({found.name}) and auto_resume is false: "
                           "pass another --run_name, or drop --auto_resume false to resume it")
        ckpt = str(found)
    elif ckpt in ("best", "hpc", "registry"):
        raise RunError(f"--ckpt_path {ckpt} is not supported by omnissl fit: use last (this run's folder) or a file")
    config["ckpt_path"] = ckpt

    # every checkpoint callback without a folder of its own writes into the run folder
    for cb in config.get("trainer.callbacks") or []:
        if isinstance(cb, Mapping) or hasattr(cb, "get"):
            if _is(cb.get("class_path"), "lightning.pytorch.callbacks.ModelCheckpoint") and \
                    cb["init_args"].get("dirpath") is None:
                cb["init_args"]["dirpath"] = str(folder / CHECKPOINTS)

    # loggers write into the run folder; W&B continues the run's own id
    info = run_info(folder)
    for class_path, args in _logger_args(config.get("trainer.logger")):
        if "save_dir" in args:
            args["save_dir"] = str(folder)
        wandb_like = class_path == "omnissl.train.loggers.auto_logger" or \
            _is(class_path, "lightning.pytorch.loggers.WandbLogger")
        if wandb_like:
            if args.get("id") is None:
                args["id"] = info["wandb_id"]
            if args.get("resume") is None:
                args["resume"] = "allow"
            if args.get("name") is None:
                args["name"] = name

    step = finished = None
    max_steps = config.get("trainer.max_steps")
    if ckpt is not None and Path(ckpt).exists():  # a file, or an FSDP2 checkpoint folder
        step = read_progress(Path(ckpt))
        finished = max_steps is not None and max_steps > 0 and step is not None and step >= max_steps
    return {"folder": folder, "name": name, "ckpt_path": ckpt, "resumed": ckpt is not None, "step": step,
            "finished": bool(finished)}


def link_schedule(config: Any) -> None:
    """The LR schedule's `total_steps`, when not set, follows `trainer.max_steps` (in place). What is wrong with
    the result (neither set, warmup longer than the run) is named by omnissl/train/checks.py, which builds the
    scheduler before any work."""
    key = "model.init_args.lr_scheduler.init_args"
    try:
        args = config.get(key)
    except (KeyError, AttributeError):
        return
    if args is None or "total_steps" not in args or args["total_steps"] is not None:
        return
    max_steps = config.get("trainer.max_steps")
    if max_steps is not None and max_steps > 0:
        args["total_steps"] = int(max_steps)


def save_run_config(folder: Path, text: str) -> Path:
    """Write a launch's resolved config: `config.yaml` the first time; a later launch with the same config
    writes nothing, one with another config `config.<k>.yaml` (the next free k). Never overwrites."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    first = folder / "config.yaml"
    existing = [first, *sorted(folder.glob("config.*.yaml"), key=lambda p: int(p.suffixes[0][1:])
                                 if p.suffixes[0][1:].isdigit() else 0)]
    for path in existing:
        if path.is_file() and path.read_text() == text:
            return path
    k = 0 if not first.exists() else 1
    while (path := first if k == 0 else folder / f"config.{k}.yaml").exists():
        k += 1
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path
