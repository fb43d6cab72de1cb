"""CLAP's validation-time gathers under DDP: on 2 real CPU processes (gloo, torchrun) the epoch-end retrieval and
zero-shot metrics equal the 1-process metrics on the same validation set (each rank embeds its share of the clips;
the module gathers them, drops the distributed sampler's padding repeats, and ranks / classifies them all)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from omnissl.datamodules.audio_text import AudioTextDataModule, read_caption_manifest
from omnissl.datamodules.common import read_manifest
from omnissl.datamodules.corpora import embedded_corpus

HERE = Path(__file__).resolve().parent
SCRIPT = HERE / "clap_val_run.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_rows(path: Path, root: Path, rows: list) -> Path:
    path.write_text("\n".join([str(root), *("\t".join(str(x) for x in r) for r in rows)]) + "\n")
    return path


def test_validation_metrics_on_two_processes_equal_one_process(tmp_path):
    found = embedded_corpus("embedded:captions", size="tiny", seed=0)
    captions = found["train"].with_name("train.captions.tsv")
    files, _ = read_caption_manifest(captions)
    clips = len(set(files))
    assert clips % 2 == 1  # the sampler pads rank 1's share with a repeat of clip 0
    # 13 of the 14 zero-shot clips (odd too), with the class list (and held-out marks) beside them
    root, rows = read_manifest(found["train"].with_name("zeroshot.tsv"))
    zeroshot = write_rows(tmp_path / "zs.tsv", root, rows[:13])
    (tmp_path / "zs.classes.json").write_text(found["train"].with_name("zeroshot.classes.json").read_text())
    dm = AudioTextDataModule(train=str(captions), valid=str(captions), zeroshot=str(zeroshot), num_workers=0)
    dm.prepare_data()  # the caption tokenizer, trained once here (the processes below only read it)
    dm.setup("fit")
    tokenizer = str(dm.tokenizer_path)
    args = [str(tmp_path), str(captions), str(zeroshot), tokenizer]
    env = dict(os.environ, PYTHONPATH=str(HERE.parents[1]), OMP_NUM_THREADS="1")
    ref = subprocess.run([sys.executable, str(SCRIPT), "ref", *args], capture_output=True, text=True, timeout=300,
                         cwd=tmp_path, env=env)
    assert ref.returncode == 0, ref.stderr[-3000:]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                "--master_port", str(free_port())]
    ddp = subprocess.run([*torchrun, str(SCRIPT), "ddp", *args], capture_output=True, text=True, timeout=300,
                         cwd=tmp_path, env=env)
    assert ddp.returncode == 0, (ddp.stdout + ddp.stderr)[-4000:]
    one = json.loads((tmp_path / "ref_rank0.json").read_text())
    assert one["world"] == 1
    keys = [f"val/{d}_R@{k}" for d in ("a2t", "t2a") for k in (1, 5, 10)] + ["val/a2t_mAP@10", "val/t2a_mAP@10",
                                                                              "val/zeroshot_acc",
                                                                              "val/zeroshot_acc_heldout",
                                                                              "val/zeroshot_acc_seen"]
    assert set(keys) <= set(one), sorted(one)
    # the metrics are not degenerate: a repeated clip counted twice would move them
    assert 0.0 < one["val/zeroshot_acc"] < 1.0 and 0.0 < one["val/t2a_R@1"] < 1.0, one
    for rank in (0, 1):
        got = json.loads((tmp_path / f"ddp_rank{rank}.json").read_text())
        assert got["world"] == 2
        for k in keys:
            assert got[k] == pytest.approx(one[k], abs=1e-6), (rank, k, got[k], one[k])
