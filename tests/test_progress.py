"""Progress bars of long jobs (omnissl/progress.py): drawn on a terminal, silent in a pipe or log and with
--quiet / OMNISSL_QUIET=1; on the manifest scan, the probe's extraction and head training, the k-means fit."""

import fcntl
import io
import os
import pty
import struct
import subprocess
import sys
import termios
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from omnissl.progress import QUIET_ENV, progress

OMNISSL = str(Path(sys.executable).parent / "omnissl")


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def not_quiet(monkeypatch):
    monkeypatch.delenv(QUIET_ENV, raising=False)


def test_drawn_on_a_terminal_only(monkeypatch):
    tty, log = Terminal(), io.StringIO()
    assert list(progress(range(3), desc="job", file=tty)) == [0, 1, 2]
    list(progress(range(3), desc="job", file=log))
    assert "job: 100%" in tty.getvalue() and "3/3" in tty.getvalue()
    assert log.getvalue() == ""
    monkeypatch.setenv(QUIET_ENV, "1")
    quiet = Terminal()
    list(progress(range(3), desc="job", file=quiet))
    assert quiet.getvalue() == ""


def wav_folder(root: Path, n: int = 3) -> Path:
    rng = np.random.default_rng(0)
    for i in range(n):
        (root / "audio").mkdir(parents=True, exist_ok=True)
        sf.write(root / "audio" / f"{i}.wav", rng.standard_normal(1600 * (i + 1)).astype(np.float32) * 0.1, 16000)
    return root / "audio"


def test_manifest_scan_and_kmeans_show_progress_on_a_terminal(tmp_path, monkeypatch):
    from omnissl.datamodules.audio_io import write_audio_manifest
    from omnissl.eval.units import fit_kmeans

    folder = wav_folder(tmp_path)
    for stream in (Terminal(), io.StringIO()):
        monkeypatch.setattr(sys, "stderr", stream)
        assert write_audio_manifest(folder, tmp_path / "m.tsv") == 3
        feats = np.random.default_rng(0).standard_normal((400, 4)).astype(np.float32)
        km = fit_kmeans(feats, 5, seed=0, n_init=2, batch_size=64, max_iter=3)
        if isinstance(stream, Terminal):
            shown, centroids = stream.getvalue(), km.cluster_centers_
            assert "scanning audio" in shown and "3/3" in shown
            assert "k-means K=5" in shown and "Minibatch step" not in shown  # sklearn's lines became the bar
        else:
            assert stream.getvalue() == ""
            # the bar reads sklearn's verbose output only: the same centroids either way
            np.testing.assert_array_equal(km.cluster_centers_, centroids)


def test_probe_extraction_and_head_training_show_progress(monkeypatch):
    from omnissl.batch import Batch
    from omnissl.eval.probe import fit_classifier, extract_splits
    from omnissl.eval.probe_data import ProbeData

    stream = Terminal()
    monkeypatch.setattr(sys, "stderr", stream)
    g = torch.Generator().manual_seed(0)
    batches = [Batch(inputs={"audio": torch.randn(4, 160, generator=g)}, ids=torch.arange(4 * k, 4 * k + 4),
                     targets={"label": torch.arange(4) % 2}) for k in range(5)]

    def states(batch):  # a stand-in upstream: 3 hidden states of width 8 over 10 frames
        x = batch.inputs["audio"].view(4, 10, 16)[..., :8]
        return torch.stack([x, 2 * x, -x], dim=2), torch.ones(4, 10, dtype=torch.bool)

    data = ProbeData("audio", {"train": batches}, {"train": "train"})
    feats, _ = extract_splits(states, data)
    assert "features (train): 100%" in stream.getvalue() and "5/5" in stream.getvalue()
    fit_classifier(feats["train"], feats["train"], feats["train"], epochs=3)
    # the head's bar is left=False (a per-layer probe fits many heads): its start stays in the stream
    assert "probe head:   0%" in stream.getvalue() and "0/3" in stream.getvalue()


def run_on_a_terminal(args: list[str], cwd: Path) -> str:
    """Run a command with its stderr on a pseudo-terminal (as in an interactive shell); -> what it wrote there."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # 24 x 100 characters
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    env.pop(QUIET_ENV, None)
    proc = subprocess.Popen(args, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=follower)
    os.close(follower)
    chunks = []
    while True:
        try:
            data = os.read(leader, 4096)
        except OSError:  # the follower side closed: the process is gone
            break
        if not data:
            break
        chunks.append(data)
    assert proc.wait(timeout=120) == 0
    os.close(leader)
    return b"".join(chunks).decode(errors="replace")


def test_data_manifest_on_a_terminal_and_quiet(tmp_path):
    folder = wav_folder(tmp_path)
    shown = run_on_a_terminal([OMNISSL, "data", "manifest", str(folder), "--out", "m.tsv"], tmp_path)
    assert "scanning audio" in shown and "3/3" in shown
    quiet = run_on_a_terminal([OMNISSL, "data", "manifest", str(folder), "--out", "m.tsv", "--quiet"], tmp_path)
    assert "scanning" not in quiet
    piped = subprocess.run([OMNISSL, "data", "manifest", str(folder), "--out", "m.tsv"], cwd=tmp_path,
                           capture_output=True, text=True, timeout=120)
    assert piped.returncode == 0 and "scanning" not in piped.stderr
