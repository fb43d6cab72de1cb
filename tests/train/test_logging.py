import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from lightning.pytorch.loggers import CSVLogger, WandbLogger

from omnissl.train.loggers import auto_logger, wandb_mode

ROOT = Path(__file__).resolve().parents[2]


def test_auto_logger_choice(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert isinstance(auto_logger(save_dir=str(tmp_path)), CSVLogger)
    monkeypatch.setenv("WANDB_MODE", "offline")
    lg = auto_logger(save_dir=str(tmp_path))
    assert isinstance(lg, WandbLogger) and lg._offline
    monkeypatch.delenv("WANDB_MODE")
    assert auto_logger(save_dir=str(tmp_path))._offline  # no credentials -> offline, never a login prompt
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert not auto_logger(save_dir=str(tmp_path))._offline
    assert isinstance(auto_logger(mode="csv", save_dir=str(tmp_path)), CSVLogger)
    with pytest.raises(ValueError, match="logger mode"):
        auto_logger(mode="tensorboard")


def test_wandb_mode(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode() == "disabled"
    monkeypatch.delenv("WANDB_MODE")
    assert wandb_mode() == "offline"  # no credentials
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_mode() == "online"
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert wandb_mode() == "offline"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode() == "disabled"


@pytest.mark.slow
def test_offline_wandb_run_holds_resolved_config(tmp_path):
    env = dict(os.environ, WANDB_MODE="offline", HF_HUB_OFFLINE="1")
    env.pop("WANDB_API_KEY", None)
    # an earlier test's wandb.init left WANDB_SERVICE (the pytest process's own W&B service socket) in os.environ;
    # inherited, it makes the child hand its run to that service, which never writes it where we look
    env.pop("WANDB_SERVICE", None)
    cmd = [str(Path(sys.executable).parent / "omnissl"), "fit", "-c", str(ROOT / "recipes/trainer/default.yaml"),
           "-c", str(ROOT / "recipes/audio/mae_tiny_synthetic.yaml"), "--trainer.max_steps", "2",
           "--trainer.limit_val_batches", "1", "--trainer.accelerator", "cpu",
           "--model.init_args.mask_ratio", "0.7"]
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    runs: list[Path] = []
    for _ in range(60):  # W&B's service process may still be flushing the offline run after the command exits
        runs = list(tmp_path.glob("runs/wandb/offline-run-*/run-*.wandb"))
        if runs and b"mask_ratio" in runs[0].read_bytes():
            break
        time.sleep(1)
    assert len(runs) == 1, sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))[:40]
    assert b"mask_ratio" in runs[0].read_bytes() and b"0.7" in runs[0].read_bytes()
    assert "mask_ratio: 0.7" in (tmp_path / "runs/config.yaml").read_text()
