"""A callback for tests/train/test_resume.py: one JSON line per training batch (optimizer step after it, loss,
sample ids, process id), appended and flushed at once so a SIGKILLed run keeps what it wrote. Written before
the step's checkpoint (Lightning runs ModelCheckpoint callbacks last)."""

import json
import os

from lightning.pytorch.callbacks import Callback


class StepTrace(Callback):
    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        row = {"step": trainer.global_step, "epoch": trainer.current_epoch, "loss": float(loss),
               "ids": batch.ids.tolist(), "pid": os.getpid()}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
