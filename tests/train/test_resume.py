"""Resume by re-running the command (omnissl/train/runs.py) and exactly (omnissl/datamodules/sampler.py, the
per-step seeds of omnissl/ssl/base.py): a real `omnissl fit` process is SIGKILLed mid-epoch, the same command is
run again, and its per-step losses and sample ids must equal those of a run never interrupted."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
OMNISSL = str(Path(sys.executable).parent / "omnissl")
CPU = str(ROOT / "recipes/trainer/cpu.yaml")
TOL = 1e-5


def _env() -> dict:
    env = dict(os.environ, WANDB_MODE="disabled", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(Path(__file__).parent), env.get("PYTHONPATH", "")])
    env.pop("WANDB_SERVICE", None)
    return env


def _overrides(tmp: Path, trace: Path, max_steps: int) -> Path:
    """Small CPU run: 5 batches per epoch (so the kill lands mid-epoch of a later epoch), a checkpoint every
    step, no validation, the step trace."""
    cfg = tmp / f"overrides-{trace.stem}.yaml"
    cfg.write_text(f"""
trainer:
  max_steps: {max_steps}
  limit_train_batches: 5
  limit_val_batches: 0
  log_every_n_steps: 1
  enable_progress_bar: false
  enable_model_summary: false
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {{save_last: true, every_n_train_steps: 1}}
    - class_path: step_trace.StepTrace
      init_args: {{path: {trace}}}
model:
  init_args:
    lr_scheduler:
      init_args: {{warmup_steps: 2}}
data:
  init_args: {{max_samples: 16000, min_samples: 8000, max_tokens: 48000, num_workers: 1}}
""")
    return cfg


def _cmd(recipe: str, overrides: Path, run_name: str) -> list[str]:
    return [OMNISSL, "fit", "-c", CPU, "-c", str(ROOT / recipe), "-c", str(overrides), "--run_name", run_name]


def _trace(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _kill_after(cmd: list[str], cwd: Path, trace: Path, step: int, timeout: float = 240) -> int:
    """Start `cmd`, SIGKILL it as soon as the trace shows optimizer step `step + 1` under way (so the
    checkpoint of `step` is on disk); returns the last step the killed process traced."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            rows = [r for r in _trace(trace) if r["pid"] == proc.pid]
            if rows and rows[-1]["step"] >= step:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(30)
                assert proc.returncode == -signal.SIGKILL
                return rows[-1]["step"]
            if proc.poll() is not None:
                raise AssertionError(f"{cmd} ended before step {step}:\n{proc.stderr.read().decode()[-3000:]}")
            time.sleep(0.02)
        raise AssertionError(f"{cmd} did not reach step {step} in {timeout} s")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, f"{cmd} failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}"
    return out


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["recipes/audio/wav2vec2_tiny_cpu.yaml", "recipes/audio/data2vec2_tiny_cpu.yaml"])
def test_sigkill_mid_epoch_then_rerun_matches_uninterrupted_run(recipe, tmp_path):
    max_steps, kill_at = 12, 7  # epochs of 5 batches: killed in the middle of the second epoch
    ref_trace, trace = tmp_path / "reference.jsonl", tmp_path / "resumed.jsonl"
    _run(_cmd(recipe, _overrides(tmp_path, ref_trace, max_steps), "reference"), tmp_path)
    reference = {r["step"]: r for r in _trace(ref_trace)}
    assert sorted(reference) == list(range(1, max_steps + 1))

    cmd = _cmd(recipe, _overrides(tmp_path, trace, max_steps), "killed")
    killed_at = _kill_after(cmd, tmp_path, trace, kill_at)
    first_pid = _trace(trace)[0]["pid"]
    folder = tmp_path / "runs/cpu/killed"
    assert (folder / "checkpoints/last.ckpt").is_file()

    out = _run(cmd, tmp_path)  # the same command again
    assert "resuming from" in out.stderr and str(folder / "checkpoints") in out.stderr
    rows = _trace(trace)
    before = [r for r in rows if r["pid"] == first_pid]
    after = [r for r in rows if r["pid"] != first_pid]
    assert after and after[-1]["step"] == max_steps
    # it continued from its last checkpoint (the step traced before the kill, or the one before it if the kill
    # landed before that step's checkpoint was written), mid-epoch, not from the start of an epoch
    resumed_from = after[0]["step"] - 1
    assert killed_at - 1 <= resumed_from <= killed_at and resumed_from % 5 != 0
    assert [r["step"] for r in after] == list(range(resumed_from + 1, max_steps + 1))
    for r in before + after:  # same samples in the same order, same losses, on both sides of the kill
        ref = reference[r["step"]]
        assert r["ids"] == ref["ids"], f"step {r['step']}: samples {r['ids']} != uninterrupted {ref['ids']}"
        assert r["epoch"] == ref["epoch"]
    worst = max(abs(r["loss"] - reference[r["step"]]["loss"]) for r in before + after)
    print(f"{recipe}: resumed from step {resumed_from}, largest loss difference {worst:.3g}")
    assert worst <= TOL, [(r["step"], r["loss"], reference[r["step"]]["loss"]) for r in after]

    # re-running the finished command trains nothing more
    out = _run(cmd, tmp_path)
    assert "is finished" in out.stderr and len(_trace(trace)) == len(rows)


def test_ckpt_path_last_on_a_fresh_run_fails_naming_the_folder(tmp_path):
    cfg = _overrides(tmp_path, tmp_path / "t.jsonl", 2)
    out = subprocess.run(_cmd("recipes/audio/wav2vec2_tiny_cpu.yaml", cfg, "fresh") + ["--ckpt_path", "last"],
                         cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert f"run folder {tmp_path / 'runs/cpu/fresh'} holds no checkpoint" in out.stderr
    assert not list(tmp_path.glob("runs/**/*.ckpt"))
