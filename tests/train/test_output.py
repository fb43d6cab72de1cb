"""What a user sees on `omnissl fit`: none of the third-party noise (omnissl/train/quiet.py), every real warning."""

import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DEBUG = str(ROOT / "recipes/trainer/debug.yaml")
OMNISSL = str(Path(sys.executable).parent / "omnissl")

NOISE = ("litlogger", "LightningCLI's args parameter", "LeafSpec", "If this is intentional, you can ignore this warning")

# data2vec (its EMA teacher sits in eval mode on purpose) at tiny size on synthetic tones
D2V = """
model:
  class_path: omnissl.ssl.data2vec.Data2Vec
  init_args:
    encoder:
      class_path: omnissl.backbones.builders.tiny
      init_args: {modality: audio}
    mask_prob: 0.65
    mask_length: 5
    top_k: 2
data:
  class_path: omnissl.datamodules.synthetic.SyntheticDataModule
  init_args: {modality: audio, batch_size: 4, min_samples: 8000, max_samples: 16000}
"""

# planted: a real warning of the user's code, and a student module left in eval mode by mistake
PLANTED = '''
import warnings
from lightning.pytorch.callbacks import Callback


class Planted(Callback):
    def __init__(self, eval_head: bool = False):
        self.eval_head = eval_head

    def on_fit_start(self, trainer, pl_module):
        warnings.warn("planted: a real warning about this run")
        if self.eval_head:
            pl_module.head.eval()
'''


def fit(tmp_path: Path, *extra: str) -> str:
    (tmp_path / "d2v.yaml").write_text(D2V)
    (tmp_path / "planted.py").write_text(textwrap.dedent(PLANTED))
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(tmp_path), str(ROOT), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([OMNISSL, "fit", "-c", DEBUG, "-c", "d2v.yaml", "--trainer.max_steps", "2", *extra],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout + out.stderr


def test_fit_prints_no_third_party_noise_and_keeps_real_warnings(tmp_path):
    from omnissl.train.quiet import eval_modules

    # the run's student head is put in eval mode by the planted callback; the teacher is in eval mode as always
    text = fit(tmp_path, "--trainer.callbacks+=planted.Planted", "--trainer.callbacks.init_args.eval_head=true")
    for needle in NOISE:
        assert needle not in text, f"{needle!r} printed:\n{text[-3000:]}"
    assert "planted: a real warning about this run" in text
    # our check names the student module, and only it (not the teacher's 50 modules)
    assert "1 module(s) of the model are in eval mode at the start of training ('head')" in text

    import torch.nn as nn

    from omnissl.ssl.teacher import EMATeacher

    model = nn.Module()
    model.encoder = nn.Sequential(nn.Linear(2, 2), nn.Dropout())
    model.teacher = EMATeacher(model.encoder)
    assert eval_modules(model) == []  # the teacher's copy is eval on purpose
    model.encoder[1].eval()
    assert eval_modules(model) == ["encoder.1"]


def test_lightning_cli_from_python_does_not_warn_about_the_callers_argv(monkeypatch, tmp_path):
    from omnissl.cli import lightning_cli

    monkeypatch.chdir(tmp_path)
    (tmp_path / "d2v.yaml").write_text(D2V)
    monkeypatch.setattr(sys, "argv", ["bench/learning_check.py", "--objective", "wav2vec2"])  # the caller's
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli = lightning_cli(["-c", DEBUG, "-c", "d2v.yaml"], run=False)
    assert type(cli.model).__name__ == "Data2Vec"
    assert not [w for w in caught if "args parameter" in str(w.message)]


@pytest.mark.parametrize("planted", ["a FutureWarning of our own", "Found 3 module(s) in eval mode elsewhere"])
def test_filters_are_narrow(planted):
    from omnissl.train.quiet import quiet_third_party

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_third_party()
        warnings.warn(planted, FutureWarning)
    assert [str(w.message) for w in caught] == [planted]


def test_wandb_runs_print_no_anonymous_setting_warning(tmp_path):
    """Lightning passes wandb.init anonymous=None, which wandb answers with a warning on every run; the auto
    logger leaves it out. A real offline W&B run in a subprocess (as `omnissl fit` starts one)."""
    script = (f"from omnissl.train.loggers import auto_logger\n"
              f"logger = auto_logger(mode='wandb', save_dir={str(tmp_path)!r})\n"
              "logger.experiment.log({'x': 1.0})\n"
              "logger.experiment.finish()\n")
    env = dict(os.environ, WANDB_MODE="offline", PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "offline" in out.stdout + out.stderr  # the W&B run did start
    assert "anonymous setting" not in out.stdout + out.stderr
