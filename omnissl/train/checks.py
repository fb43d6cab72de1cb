"""Config checks that `omnissl fit / validate / test` runs right after parsing, before anything is built, the data
prepared or a checkpoint read: degenerate settings that would otherwise run silently (or fail late, after data
set-up), each refused naming its key.

    check_config(config) -> list of messages ("<key>: <why>"); empty when the config is fine

Checked here (what no omnissl constructor sees; a model's own arguments, e.g. wav2vec 2.0's `num_distractors`,
are checked by its constructor, which also runs before any work):

* `trainer.max_steps` 0 (nothing would be trained, and no checkpoint written, with exit 0), `trainer.max_epochs`
  0 when no step limit is set;
* the optimizer: a learning rate that is not > 0 (`lr` 0 trains nothing; a negative lr is otherwise refused by
  torch only in configure_optimizers, after the data set-up), and any other argument its constructor refuses;
  it is built once on a dummy parameter;
* the learning-rate scheduler, built on that optimizer: e.g. warmup_steps > total_steps;
* `ckpt_path` (an existing file): readable as a checkpoint; otherwise the file is named, with a readable
  checkpoint beside it when there is one (LightningCLI itself reads it right after parsing, with a bare
  torch error).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import torch

from omnissl.train.checkpoint_io import CheckpointReadError, check_readable

__all__ = ["check_config"]


def _get(config: Any, key: str) -> Any:
    node = config
    for part in key.split("."):
        if node is None:
            return None
        node = node.get(part) if hasattr(node, "get") else getattr(node, part, None)
    return node


def _plain(value: Any) -> Any:
    """jsonargparse Namespaces -> dicts (recursively)."""
    if hasattr(value, "as_dict"):
        return value.as_dict()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _factory(spec: Any):
    """A `class_path`/`init_args` config node -> (class, keyword arguments), or None for anything else."""
    spec = _plain(spec)
    if not isinstance(spec, dict) or not isinstance(spec.get("class_path"), str):
        return None
    module, _, name = spec["class_path"].rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    return cls, dict(spec.get("init_args") or {})


def _check_optimization(config: Any, max_steps: Any = None) -> list[str]:
    errors: list[str] = []
    opt_key, sched_key = "model.init_args.optimizer", "model.init_args.lr_scheduler"
    lr = _get(config, f"{opt_key}.init_args.lr")
    if isinstance(lr, (int, float)) and not lr > 0:
        why = "nothing would be learned" if lr == 0 else "a negative learning rate climbs the loss"
        return [f"{opt_key}.init_args.lr: must be > 0, got {lr} ({why})"]
    found = _factory(_get(config, opt_key))
    if found is None:
        return errors
    cls, kwargs = found
    dummy = torch.nn.Parameter(torch.zeros(1))
    try:
        optimizer = cls([dummy], **kwargs)
    except (ValueError, TypeError) as e:
        return [f"{opt_key}: {cls.__name__}({kwargs}) is refused: {e}"]
    for group in optimizer.param_groups:
        if isinstance(group.get("lr"), (int, float)) and not group["lr"] > 0:
            return [f"{opt_key}.init_args.lr: must be > 0, got {group['lr']}"]
    sched = _factory(_get(config, sched_key))
    if sched is not None:
        cls, kwargs = sched
        try:
            scheduler = cls(optimizer, **kwargs)
        except (ValueError, TypeError) as e:
            return errors + [f"{sched_key}: {cls.__name__}({kwargs}) is refused: {e}"]
        total = kwargs.get("total_steps")
        if isinstance(max_steps, int) and isinstance(total, int) and 0 < total < max_steps and \
                hasattr(scheduler, "factor") and scheduler.factor(max_steps - 1) == 0:
            errors.append(f"{sched_key}.init_args.total_steps: {total} is below trainer.max_steps {max_steps}, so "
                          f"the learning rate is 0 for the last {max_steps - total} updates; drop total_steps (it "
                          "then follows trainer.max_steps) or set it to the run's length")
    return errors


def check_config(config: Any, subcommand: str = "fit") -> list[str]:
    """Messages naming each degenerate setting of one subcommand's config (`cli.config[subcommand]`); the
    step limits only matter to "fit"."""
    errors: list[str] = []
    max_steps, max_epochs = _get(config, "trainer.max_steps"), _get(config, "trainer.max_epochs")
    if subcommand != "fit":
        pass
    elif max_steps == 0:
        errors.append("trainer.max_steps: 0 trains nothing (and writes no checkpoint); give a positive number of "
                      "optimizer steps, or -1 for no step limit")
    elif max_steps in (None, -1) and max_epochs == 0:
        errors.append("trainer.max_epochs: 0 trains nothing; give a positive number, or set trainer.max_steps")
    errors += _check_optimization(config, max_steps if subcommand == "fit" else None)
    ckpt = _get(config, "ckpt_path")
    if isinstance(ckpt, (str, Path)) and Path(ckpt).is_file():
        try:
            check_readable(ckpt)
        except CheckpointReadError as e:
            errors.append(f"ckpt_path: {e}")
    return errors
