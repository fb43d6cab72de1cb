"""What `omnissl fit` prints: third-party noise filtered narrowly, in this one place; real warnings kept.

`quiet_third_party()` (called by omnissl/cli.py before Lightning starts) hides exactly these, each matched by its
message and category (or logger), never a whole category or module:

- Lightning's "💡 Tip: ... litlogger" advertisement (an INFO log record of lightning's rank_zero logger);
- torch's FutureWarning "`isinstance(treespec, LeafSpec)` is deprecated", raised by Lightning's own code
  (lightning/pytorch/utilities/_pytree.py), which a user cannot act on;
- Lightning's PossibleUserWarning "Found N module(s) in eval mode at the start of training": a data2vec EMA
  teacher is in eval mode on purpose (it never runs dropout). Lightning's check counts every eval module, so it
  is replaced by `warn_eval_modules`, which names the eval-mode modules that are NOT inside an EMA teacher:
  a module a user left in eval mode by mistake still gets a warning, with its names.
"""

from __future__ import annotations

import logging
import warnings

from lightning.pytorch.callbacks import Callback
from torch import nn

from omnissl.ssl.teacher import EMATeacher

# (category, regex at the start of the message, module regex) of the warnings filtered
NOISE_WARNINGS = (
    (FutureWarning, r"`isinstance\(treespec, LeafSpec\)` is deprecated", r"lightning\."),
    (None, r"Found \d+ module\(s\) in eval mode at the start of training", r"lightning\."),
)
# (logger name, substring of the message) of the log records filtered
NOISE_LOGS = (("lightning.pytorch.utilities.rank_zero", "try installing [litlogger]"),)


class DropMessages(logging.Filter):
    """Drops log records whose message contains one of `needles`."""

    def __init__(self, needles: tuple[str, ...]) -> None:
        super().__init__()
        self.needles = needles

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(n in message for n in self.needles)


def quiet_third_party() -> None:
    """Install the filters above (idempotent: a filter already installed is not added twice)."""
    from lightning.pytorch.utilities.warnings import PossibleUserWarning

    for category, message, module in NOISE_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category or PossibleUserWarning,
                                module=module)
    for name, needle in NOISE_LOGS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, DropMessages) and needle in f.needles for f in logger.filters):
            logger.addFilter(DropMessages((needle,)))


def eval_modules(model: nn.Module) -> list[str]:
    """Names of the submodules of `model` in eval mode, leaving out everything inside an `EMATeacher` (kept in
    eval mode on purpose)."""
    teachers = [name for name, m in model.named_modules() if isinstance(m, EMATeacher)]
    inside = tuple(f"{t}." for t in teachers)
    return [name for name, m in model.named_modules()
            if not m.training and name not in teachers and not name.startswith(inside)]


def warn_eval_modules(model: nn.Module) -> None:
    """Lightning's eval-mode check without the teacher: warn naming the eval-mode modules a run would train."""
    names = eval_modules(model)
    if names:
        shown = ", ".join(repr(n or "<the model itself>") for n in names[:5])
        warnings.warn(f"{len(names)} module(s) of the model are in eval mode at the start of training ({shown}"
                      f"{', ...' if len(names) > 5 else ''}): they run without dropout and keep their batch-norm "
                      "statistics; call .train() on them if that is not intended", stacklevel=2)


class EvalModeCheck(Callback):
    """`warn_eval_modules` at the start of training, where Lightning runs its own check (after on_fit_start);
    omnissl/cli.py adds it to every `fit`."""

    def on_train_start(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            warn_eval_modules(pl_module)
