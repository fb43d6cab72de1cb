import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("fsdp2_cpu_run.py")


@pytest.mark.slow
def test_fsdp2_shards_blocks_on_two_cpu_processes(tmp_path):
    out = tmp_path / "result.txt"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    proc = subprocess.run([sys.executable, str(SCRIPT), "fsdp2", str(out)], capture_output=True, text=True,
                          timeout=600, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    kind, steps = out.read_text().split()
    assert kind == "DTensor" and steps == "3"
    dist = tmp_path / "dist.ckpt"  # the checkpoint plugin leaves FSDP2's distributed checkpoints alone
    assert dist.is_dir() and (dist / ".metadata").is_file() and (dist / "meta.pt").is_file()
    assert not list(tmp_path.rglob("*.tmp"))
