import json
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
def test_offline_wandb_run_holds_resolved_config_and_a_resume_continues_it(tmp_path):
    env = dict(os.environ, WANDB_MODE="offline", HF_HUB_OFFLINE="1")
    env.pop("WANDB_API_KEY", None)
    # an earlier test's wandb.init left WANDB_SERVICE (the pytest process's own W&B service socket) in os.environ;
    # inherited, it makes the child hand its run to that service, which never writes it where we look
    env.pop("WANDB_SERVICE", None)
    cmd = [str(Path(sys.executable).parent / "omnissl"), "fit", "-c", str(ROOT / "recipes/trainer/default.yaml"),
           "-c", str(ROOT / "recipes/audio/mae_tiny_synthetic.yaml"), "--trainer.limit_val_batches", "1",
           "--trainer.accelerator", "cpu", "--model.init_args.mask_ratio", "0.7", "--run_name", "mae-a",
           "--trainer.logger.init_args.tags", "[smoke, test]", "--trainer.logger.init_args.group", "g1"]
    folder = tmp_path / "runs/mae-a"

    def offline_runs(expected: int) -> list[Path]:
        found: list[Path] = []
        for _ in range(60):  # W&B's service process may still be flushing the offline run after the command exits
            found = sorted(folder.glob("wandb/offline-run-*/run-*.wandb"))
            if len(found) == expected and all(b"mask_ratio" in p.read_bytes() for p in found):
                break
            time.sleep(1)
        return found

    for steps, launches in ((2, 1), (4, 2)):  # the second launch resumes the run (same folder, more steps)
        out = subprocess.run(cmd + ["--trainer.max_steps", str(steps)], cwd=tmp_path, env=env, capture_output=True,
                             text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        runs = offline_runs(launches)
        assert len(runs) == launches, sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))[:40]
    assert "resuming from" in out.stderr
    run_id = json.loads((folder / "run.json").read_text())["wandb_id"]
    assert [p.stem.removeprefix("run-") for p in runs] == [run_id, run_id]  # one W&B run, continued
    data = runs[0].read_bytes()
    assert b"mask_ratio" in data and b"0.7" in data and b"smoke" in data and b"g1" in data
    assert "mask_ratio: 0.7" in (folder / "config.yaml").read_text()
    # the resumed launch's config differs (max_steps): saved beside the first, which is never overwritten
    assert "max_steps: 2" in (folder / "config.yaml").read_text()
    assert "max_steps: 4" in (folder / "config.1.yaml").read_text()
    assert list(folder.glob("checkpoints/last.ckpt"))
    # the saved config re-runs the run itself: here finished, so nothing is trained
    again = subprocess.run([cmd[0], "fit", "-c", str(folder / "config.1.yaml")], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and f"run {folder} is finished" in again.stderr, again.stderr[-3000:]
