"""Bad inputs, faults and misuse, as a regression suite: the matrix of the reliability review
(../shared/reviews/2026-12-reliability.md), section by section: audio, text, images, configs, checkpoints/export/
probe, faults (kills and failed writes), non-finite runs and collapse. Every case checks what a user gets: an error
naming the file (and line) or key, or a skip that is counted and named. Fast: tiny generated files, in-process
calls; real processes only where the failure is a process's (a hang, a kill during a write, a run that
diverges), each with a timeout.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from omnissl.datamodules.audio import AudioDataModule
from omnissl.datamodules.audio_io import AudioDataError, scan_folder
from omnissl.datamodules.common import SkipLog, read_manifest
from omnissl.datamodules.documents import ReadStats, read_documents
from omnissl.datamodules.image import ImageDataset, list_images, load_rgb

ROOT = Path(__file__).resolve().parents[1]
OMNISSL = str(Path(sys.executable).parent / "omnissl")
DEBUG = str(ROOT / "recipes/trainer/debug.yaml")
MAE = str(ROOT / "recipes/audio/mae_tiny_synthetic.yaml")
W2V = str(ROOT / "recipes/audio/wav2vec2_tiny_cpu.yaml")
SHORT_WARMUP = ["--model.init_args.lr_scheduler.init_args.warmup_steps", "1"]  # debug.yaml runs 4 steps
SR = 16_000


def run(cmd: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline", PYTHONPATH=str(ROOT))
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def data_main(argv: list[str], capsys) -> tuple[int, str, str]:
    from omnissl.commands.data import main

    rc = main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


# ================================================================================================== audio


def tone(n: int, f: float = 220.0) -> np.ndarray:
    return (0.3 * np.sin(2 * math.pi * f * np.arange(n) / SR)).astype("float32")


@pytest.fixture
def abad(tmp_path) -> Path:
    """The review's bad audio files (abad/) beside 4 good 1 s clips."""
    d = tmp_path / "abad"
    d.mkdir()
    for i in range(4):
        sf.write(d / f"good{i}.wav", tone(SR, 200 + 50 * i), SR)
    rng = np.random.default_rng(0)
    (d / "corrupt.wav").write_bytes(rng.integers(0, 256, 20_000, dtype=np.uint8).tobytes())
    b = (d / "good1.wav").read_bytes()
    (d / "truncated.wav").write_bytes(b[: len(b) // 2])
    g = bytearray((d / "good2.wav").read_bytes())
    g[8:40] = b"\0" * 32
    (d / "garbled_header.wav").write_bytes(bytes(g))
    (d / "empty.wav").write_bytes(b"")
    x = tone(SR)
    x[::500] = np.nan
    sf.write(d / "nan_spread.wav", x, SR, subtype="FLOAT")
    x = tone(SR)
    x[::500] = np.inf
    sf.write(d / "inf_spread.wav", x, SR, subtype="FLOAT")
    sf.write(d / "silence.wav", np.zeros(SR, "float32"), SR)
    sf.write(d / "with space.wav", tone(SR), SR)
    return d


def write_manifest(path: Path, root: Path, rows: list[str], raw: bytes = b"") -> Path:
    path.write_bytes((f"{root}\n" + "".join(f"{r}\n" for r in rows)).encode() + raw)
    return path


GOOD = [f"good{i}.wav\t{SR}" for i in range(4)]
BAD_AUDIO = {  # case -> (manifest line 6, what the error says)
    "corrupt": ("corrupt.wav\t16000", "unreadable audio file"),
    "truncated": ("truncated.wav\t16000", "truncated"),
    "garbled": ("garbled_header.wav\t16000", "unreadable audio file"),
    "empty": ("empty.wav\t16000", "unreadable audio file"),
    "missing": ("missing.wav\t16000", "file not found"),
    "nan": ("nan_spread.wav\t16000", "NaN or infinite"),
    "inf": ("inf_spread.wav\t16000", "NaN or infinite"),
    "wrongcount": ("good0.wav\t99999", "the manifest says 99999"),
}


@pytest.mark.parametrize("case", sorted(BAD_AUDIO))
def test_audio_bad_file_is_named_by_inspect_and_skipped_when_asked(abad, tmp_path, case, capsys):
    line, why = BAD_AUDIO[case]
    m = write_manifest(tmp_path / f"{case}.tsv", abad, GOOD + [line])
    rc, _, err = data_main(["inspect", str(m)], capsys)
    assert rc == 1 and f"{m}:6:" in err and why in err, err
    rc, out, _ = data_main(["inspect", str(m), "--on-error", "skip"], capsys)
    assert rc == 0 and "items: 5  decoded: 4  bad: 1" in out and f"skipped: {m}:6:" in out, out


@pytest.mark.parametrize("case", ["corrupt", "missing", "nan", "wrongcount"])
def test_audio_bad_file_in_training_data_raises_or_is_counted(abad, tmp_path, case, caplog):
    line, why = BAD_AUDIO[case]
    m = write_manifest(tmp_path / f"{case}.tsv", abad, GOOD + [line])
    kw = dict(min_samples=0, max_samples=None, batch_size=5, max_tokens=None, num_workers=0)
    dm = AudioDataModule(train=str(m), **kw)
    dm.setup("fit")
    with pytest.raises(AudioDataError, match=rf"{m}:6: .*{why}"):
        list(dm.train_dataloader())
    dm = AudioDataModule(train=str(m), on_error="skip", **kw)
    dm.setup("fit")
    with caplog.at_level(logging.WARNING):
        n = sum(b.batch_size for b in dm.train_dataloader())
    assert n == 4 and "skipped 1 unreadable items this epoch" in caplog.text and f"{m}:6:" in caplog.text


def test_audio_unusual_but_valid_input_is_read(abad, tmp_path, capsys):
    """CRLF line ends, spaces in names, all-zero audio: decoded."""
    m = tmp_path / "crlf.tsv"
    m.write_bytes((f"{abad}\r\n" + "".join(f"{r}\r\n" for r in GOOD + ["with space.wav\t16000",
                                                                         "silence.wav\t16000"])).encode())
    rc, out, _ = data_main(["inspect", str(m)], capsys)
    assert rc == 0 and "items: 6  decoded: 6  bad: 0" in out


def test_audio_non_utf8_manifest_line_is_named_and_follows_on_error(abad, tmp_path, capsys):
    """Was a raw UnicodeDecodeError naming neither manifest nor line, even with skip."""
    m = write_manifest(tmp_path / "nonutf8.tsv", abad, GOOD, raw=b"caf\xe9.wav\t16000\n")
    rc, _, err = data_main(["inspect", str(m)], capsys)
    assert rc == 1 and f"{m}:6: not valid UTF-8" in err, err
    rc, out, _ = data_main(["inspect", str(m), "--on-error", "skip"], capsys)
    assert rc == 0 and "items: 5  decoded: 4  bad: 1" in out and f"{m}:6: not valid UTF-8" in out, out
    with pytest.raises(AudioDataError, match=rf"{m}:6: not valid UTF-8"):
        AudioDataModule(train=str(m), min_samples=0, max_tokens=None, batch_size=2).setup("fit")
    dm = AudioDataModule(train=str(m), min_samples=0, max_tokens=None, batch_size=2, on_error="skip",
                         num_workers=0)
    dm.setup("fit")
    assert len(dm.dataset("train")) + len(dm.dataset("valid") or []) == 4


def test_audio_non_utf8_file_name_in_a_folder_is_named_and_follows_on_error(abad, tmp_path, capsys):
    """Was a raw UnicodeEncodeError (soundfile cannot open the surrogate-escaped name) in `data manifest`,
    `data inspect` and fit, even with skip."""
    folder = tmp_path / "names"
    folder.mkdir()
    for i in range(3):
        sf.write(folder / f"ok{i}.wav", tone(SR), SR)
    with open(os.fsencode(folder) + b"/bad\xff\xfename.wav", "wb") as f:
        f.write((abad / "good0.wav").read_bytes())
    out_tsv = tmp_path / "scan.tsv"
    rc, _, err = data_main(["manifest", str(folder), "--out", str(out_tsv)], capsys)
    assert rc == 1 and "bad\\xff\\xfename.wav" in err and "not valid UTF-8" in err, err
    rc, out, err = data_main(["manifest", str(folder), "--out", str(out_tsv), "--on-error", "skip"], capsys)
    assert rc == 0 and "3 audio files" in out and len(out_tsv.read_text().splitlines()) == 4
    rc, out, _ = data_main(["inspect", str(folder), "--on-error", "skip"], capsys)
    assert rc == 0 and "items: 4  decoded: 3  bad: 1" in out and "bad\\xff\\xfename.wav" in out, out
    with pytest.raises(AudioDataError, match=r"bad\\xff\\xfename\.wav: unreadable audio file \(its name is not"):
        scan_folder(folder)
    dm = AudioDataModule(train=str(folder), min_samples=0, max_tokens=None, batch_size=3, on_error="skip",
                         num_workers=0, max_samples=None)
    dm.setup("fit")
    assert sum(b.batch_size for b in dm.loader("train")) + len(dm.dataset("valid") or []) == 3


def test_audio_folder_scan_skips_are_counted_by_inspect(abad, capsys):
    """The review's `inspect FOLDER --on-error skip` reported bad: 3 of 6 bad files (the scan's skips were
    left out of the summary)."""
    rc, out, _ = data_main(["inspect", str(abad), "--on-error", "skip"], capsys)
    # scan (headers): corrupt, garbled, empty; decoding: truncated, nan, inf
    assert rc == 0 and "bad: 6" in out, out
    assert len(scan_folder(abad, on_error="skip").skipped) == 3


@pytest.mark.slow
def test_audio_epoch_of_only_bad_files_stops_a_real_run(abad, tmp_path):
    """The review's hang: `omnissl fit` on a manifest of only corrupt files with on_error skip looped over
    empty epochs forever (102,256 warning lines in 120 s). It must exit non-zero, naming the manifest."""
    m = write_manifest(tmp_path / "all_bad.tsv", abad, ["corrupt.wav\t32000", "empty.wav\t32000",
                                                        "garbled_header.wav\t32000"])
    out = run([OMNISSL, "fit", "-c", DEBUG, "-c", W2V, *SHORT_WARMUP, "--data.init_args.train", str(m),
               "--data.init_args.valid", "null", "--data.init_args.on_error", "skip",
               "--data.init_args.num_workers", "0", "--trainer.enable_progress_bar", "false"],
              cwd=tmp_path, timeout=240)
    assert out.returncode != 0
    assert f"every item of {m} failed to load" in out.stderr, out.stderr[-3000:]
    assert out.stderr.count("skipped 3 unreadable items this epoch") == 1


# =================================================================================================== text


def test_text_non_utf8_document_is_named_or_counted(tmp_path):
    good, bad = tmp_path / "doc.txt", tmp_path / "latin1.txt"
    good.write_text("plain text\n")
    bad.write_bytes("Caf\xe9 cr\xe8me".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.txt: not valid UTF-8"):
        list(read_documents([good, bad]))
    stats = ReadStats()
    assert list(read_documents([good, bad], on_error="skip", stats=stats)) == ["plain text\n"]
    assert list(stats.skipped) == [str(bad)]


def test_text_file_list_line_that_is_not_utf8_is_named_or_counted(tmp_path):
    lst = tmp_path / "list.tsv"
    lst.write_bytes(f"{tmp_path}\n".encode() + b"a.txt\nb\xe9.txt\n")
    with pytest.raises(ValueError, match=rf"{lst}:3: not valid UTF-8"):
        read_manifest(lst)
    skips = SkipLog("manifest line")
    with pytest.warns(UserWarning, match=rf"{lst}:3"):
        _, rows = read_manifest(lst, on_error="skip", skips=skips)
    assert rows == [["a.txt"]] and list(skips.skipped) == [f"{lst}:3"]


# ================================================================================================= images


def png_header_only(path: Path, w: int, h: int) -> None:
    """A valid PNG signature + IHDR of w x h grayscale (+ an empty IDAT): 60 bytes on disk, which PIL
    refuses at open as a decompression bomb above 2 x MAX_IMAGE_PIXELS."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) +
                     chunk(b"IEND", b""))


@pytest.fixture
def images(tmp_path) -> Path:
    from PIL import Image

    d = tmp_path / "img"
    d.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(d / f"good{i}.png")
    return d


def _bad_image(kind: str, p: Path) -> None:
    from PIL import Image

    if kind == "truncated":
        Image.fromarray(np.zeros((64, 64, 3), np.uint8) + 7).save(p)
        b = p.read_bytes()
        p.write_bytes(b[: len(b) // 2])
    elif kind == "text":
        p.write_text("this is not a png\n")
    elif kind == "zero_bytes":
        p.write_bytes(b"")
    elif kind == "bomb":
        png_header_only(p, 20_000, 20_000)


@pytest.mark.parametrize("kind,why", [("truncated", "cannot decode image"), ("text", "cannot identify"),
                                      ("zero_bytes", "cannot identify"), ("bomb", "decompression bomb")])
def test_image_bad_file_is_named_or_skipped_and_counted(images, kind, why):
    """The 20000x20000 PNG gave a raw DecompressionBombError that on_error=skip did not skip."""
    bad = images / f"bad_{kind}.png"
    _bad_image(kind, bad)
    files = [f for f, _ in list_images(images)]
    with pytest.raises(ValueError, match=rf"{bad}: .*{why}"):
        load_rgb(bad)
    ds = ImageDataset(files, lambda x: x.float(), on_error="skip")
    with pytest.warns(UserWarning, match=rf"skipping image {bad}"):
        items = [ds[i] for i in range(len(ds))]
    assert len(items) == 5 and list(ds.skipped) == [str(bad)]
    with pytest.raises(ValueError, match=rf"{bad}"):
        [ImageDataset(files, lambda x: x, on_error="raise")[i] for i in range(len(files))]


def test_image_16_bit_png_is_scaled_not_clipped(tmp_path):
    """I;16 PNGs went through PIL's convert("RGB"), which clips at 255: 99.6 % of the review's image turned
    white."""
    from PIL import Image

    a = np.random.default_rng(0).integers(0, 65536, (40, 48), dtype=np.uint16)
    Image.fromarray(a).save(tmp_path / "i16.png")
    x = load_rgb(tmp_path / "i16.png")
    assert x.shape == (3, 40, 48) and torch.equal(x[0], x[2])
    expected = torch.from_numpy(np.round(a / 257.0).astype(np.uint8))
    assert (x[0].int() - expected.int()).abs().max() <= 1
    assert (x[0] == 255).float().mean() < 0.01


def test_image_usual_modes_are_read(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8), mode="L").save(tmp_path / "l.png")
    Image.fromarray(rng.integers(0, 256, (8, 8, 4), dtype=np.uint8), mode="RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).convert("P").save(tmp_path / "p.png")
    Image.fromarray(np.full((1, 1, 3), 128, np.uint8)).save(tmp_path / "one.png")
    for name in ("l", "rgba", "p", "one"):
        x = load_rgb(tmp_path / f"{name}.png")
        assert x.dtype == torch.uint8 and x.shape[0] == 3


def test_image_list_that_is_not_utf8_is_named_or_counted(images, tmp_path):
    """Was a raw UnicodeDecodeError from common.read_manifest, even with skip."""
    lst = tmp_path / "list_latin1.txt"
    lst.write_bytes(b"".join(f"{images}/good{i}.png\n".encode() for i in range(4)) + b"caf\xe9.png\n")
    with pytest.raises(ValueError, match=rf"{lst}:5: not valid UTF-8"):
        list_images(lst)
    skips = SkipLog("image")
    with pytest.warns(UserWarning, match=rf"{lst}:5"):
        assert len(list_images(lst, on_error="skip", skips=skips)) == 4
    assert len(skips) == 1


def test_image_missing_source_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nonexistent_dir does not exist"):
        list_images(tmp_path / "nonexistent_dir")


# ================================================================================================ configs


def cli_error(args: list[str], capsys) -> str:
    """`omnissl fit ARGS` in-process must stop at parsing (exit 2) and return its stderr."""
    from omnissl.cli import lightning_cli

    with pytest.raises(SystemExit) as e:
        lightning_cli(["fit", "-c", DEBUG, "-c", MAE, *args])
    assert e.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("args,needle", [
    (["--trainer.max_step", "3"], "unrecognized arguments: --trainer.max_step"),  # was taken as max_steps
    (["--data.init_args.batch_siz", "3"], "batch_siz"),
    (["--trainer.max_steps", "0"], "trainer.max_steps: 0 trains nothing"),
    (["--model.init_args.optimizer.init_args.lr", "0"], "model.init_args.optimizer.init_args.lr: must be > 0, got 0"),
    (["--model.init_args.optimizer.init_args.lr", "-1"], "optimizer.init_args.lr: must be > 0, got -1"),
    (["--model.init_args.optimizer.init_args.betas", "[0.9, 1.5]"], "model.init_args.optimizer: AdamW"),
    (["--model.init_args.lr_scheduler.init_args.warmup_steps", "1000"], "need 0 <= warmup_steps (1000)"),
    (["--model.init_args.mask_ratio", "lots"], "mask_ratio"),
    ([*SHORT_WARMUP, "--model.init_args.lr_scheduler.init_args.total_steps", "2"],  # debug.yaml: 4 steps
     "total_steps: 2 is below trainer.max_steps 4, so the learning rate is 0 for the last 2 updates"),
])
def test_config_degenerate_or_mistyped_setting_is_refused_before_work_naming_the_key(tmp_path, monkeypatch, capsys,
                                                                                      args, needle):
    monkeypatch.chdir(tmp_path)
    assert needle in cli_error(args, capsys)
    assert not (tmp_path / "runs").exists()


def test_config_num_distractors_zero_is_refused_before_work(tmp_path, monkeypatch):
    from omnissl.cli import lightning_cli

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="num_distractors must be >= 1, got 0"):
        lightning_cli(["-c", DEBUG, "-c", W2V, *SHORT_WARMUP, "--model.init_args.num_distractors", "0"], run=False)


# ===================================================================================== checkpoints, export


@pytest.fixture(scope="module")
def good_ckpt(tmp_path_factory) -> Path:
    """A real 2-step MAE checkpoint written through AtomicCheckpointIO."""
    import lightning as L

    from omnissl.datamodules.synthetic import SyntheticDataModule
    from omnissl.ssl.mae import MAE as MAEModel
    from omnissl.backbones.builders import tiny
    from omnissl.train.checkpoint_io import AtomicCheckpointIO

    d = tmp_path_factory.mktemp("ck")
    model = MAEModel(tiny("spectrogram"), modality="audio", decoder_dim=32, decoder_depth=1, decoder_heads=4)
    t = L.Trainer(accelerator="cpu", devices=1, max_steps=2, logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                  plugins=[AtomicCheckpointIO()], default_root_dir=d)
    t.fit(model, SyntheticDataModule(modality="audio", batch_size=2, train_size=4, min_samples=8000,
                                     max_samples=16000))
    t.save_checkpoint(d / "good.ckpt")
    return d / "good.ckpt"


def _bad_ckpts(folder: Path, good: Path) -> dict[str, Path]:
    folder.mkdir(exist_ok=True)
    b = good.read_bytes()
    out = {"truncated": b[: len(b) // 2], "random": np.random.default_rng(0).bytes(100_000), "empty": b""}
    for name, data in out.items():
        (folder / f"{name}.ckpt").write_bytes(data)
    return {name: folder / f"{name}.ckpt" for name in out}


@pytest.mark.parametrize("kind", ["truncated", "random", "empty"])
def test_checkpoint_unreadable_ckpt_path_is_named_with_a_good_one_beside_it(good_ckpt, tmp_path, monkeypatch,
                                                                            capsys, kind):
    """--ckpt_path gave `KeyError: 44`, a bare EOFError or a miniz RuntimeError, naming no file."""
    import shutil

    folder = tmp_path / "checkpoints"
    bad = _bad_ckpts(folder, good_ckpt)[kind]
    monkeypatch.chdir(tmp_path)
    err = cli_error(["--ckpt_path", str(bad)], capsys)
    assert f"cannot read checkpoint {bad}" in err and "no other readable checkpoint" in err, err
    shutil.copy(good_ckpt, folder / "epoch=0-step=2.ckpt")
    for other in folder.glob("*.ckpt"):
        if other.name != "epoch=0-step=2.ckpt" and other != bad:
            other.unlink()
    err = cli_error(["--ckpt_path", str(bad)], capsys)
    assert f"cannot read checkpoint {bad}" in err and f"{folder / 'epoch=0-step=2.ckpt'} beside it" in err, err


def test_checkpoint_load_through_the_plugin_names_the_file(good_ckpt, tmp_path):
    from omnissl.train.checkpoint_io import AtomicCheckpointIO, CheckpointReadError

    bad = _bad_ckpts(tmp_path, good_ckpt)["random"]
    with pytest.raises(CheckpointReadError, match=rf"cannot read checkpoint {bad}"):
        AtomicCheckpointIO().load_checkpoint(bad)
    assert AtomicCheckpointIO().load_checkpoint(good_ckpt)["global_step"] == 2


def _poisoned(good: Path, out: Path) -> Path:
    ckpt = torch.load(good, map_location="cpu", weights_only=True)
    key = next(k for k in ckpt["state_dict"] if k.startswith("encoder.") and k.endswith("weight"))
    ckpt["state_dict"][key] = ckpt["state_dict"][key].clone()
    ckpt["state_dict"][key].view(-1)[:3] = float("nan")
    torch.save(ckpt, out)
    return out


def test_export_and_probe_refuse_non_finite_weights_naming_the_tensor(good_ckpt, tmp_path, capsys):
    """The review's NaN checkpoint (74 of 74 tensors NaN) exported with exit 0 and probed to chance accuracy."""
    from omnissl.backbones.encoder import Encoder
    from omnissl.checkpoints import load_encoder, read_checkpoint, save_backbone
    from omnissl.commands.export import main as export_main

    nan = _poisoned(good_ckpt, tmp_path / "nan.ckpt")
    with pytest.raises(SystemExit) as e:
        export_main([str(nan), str(tmp_path / "pkg")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "encoder." in err and "(3 of" in err and "is not finite" in err, err
    assert not (tmp_path / "pkg" / "model.safetensors").exists()

    encoder = read_checkpoint(good_ckpt).encoder
    save_backbone(encoder, tmp_path / "pkg_ok")
    assert isinstance(load_encoder(tmp_path / "pkg_ok"), Encoder)
    with torch.no_grad():
        next(encoder.parameters()).view(-1)[0] = float("inf")
    save_backbone(encoder, tmp_path / "pkg_inf")
    with pytest.raises(ValueError, match=r"model\.safetensors: tensor \S+ \(1 of \d+ values\) is not finite"):
        load_encoder(tmp_path / "pkg_inf")  # what `omnissl probe` (and features, units, fine-tuning) call


def test_export_refuses_pickled_objects(good_ckpt, tmp_path, capsys):
    from omnissl.commands.export import main as export_main

    ckpt = torch.load(good_ckpt, map_location="cpu", weights_only=True)
    ckpt["planted"] = SkipLog("planted")  # any class: unpickling would import and build it
    torch.save(ckpt, tmp_path / "custom.ckpt")
    with pytest.raises(SystemExit):
        export_main([str(tmp_path / "custom.ckpt"), str(tmp_path / "out")])
    assert "refused to load" in capsys.readouterr().err


# ========================================================================= faults: atomic checkpoint writes


def test_checkpoint_write_failing_midway_keeps_the_previous_file_and_no_temporary(good_ckpt, tmp_path, monkeypatch):
    """A full disk (an OSError from the writer after part of the file is written) left a partial checkpoint
    under its final name; Lightning's writer in another $TMPDIR filesystem truncated last.ckpt."""
    import errno
    import shutil

    from omnissl.train import checkpoint_io
    from omnissl.train.checkpoint_io import AtomicCheckpointIO

    last = tmp_path / "last.ckpt"
    shutil.copy(good_ckpt, last)
    before = last.read_bytes()

    def disk_full(obj, f):
        f.write(b"PK\x03\x04" + b"\0" * 50_000)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint_io.torch, "save", disk_full)
    ckpt = torch.load(good_ckpt, map_location="cpu", weights_only=True)
    with pytest.raises(OSError, match=rf"could not write checkpoint {last} \(no space left"):
        AtomicCheckpointIO().save_checkpoint(ckpt, last)
    assert last.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


KILL_SCRIPT = textwrap.dedent("""
    import sys, time, torch
    from omnissl.train import checkpoint_io
    real_save = torch.save

    def slow_save(obj, f):  # the real bytes, half of them, then stall until killed
        import io
        buf = io.BytesIO(); real_save(obj, buf); data = buf.getvalue()
        f.write(data[: len(data) // 2]); f.flush()
        print("HALF", flush=True)
        time.sleep(600)

    ckpt = torch.load(sys.argv[1], map_location="cpu", weights_only=True)
    checkpoint_io.torch.save = slow_save
    checkpoint_io.AtomicCheckpointIO().save_checkpoint(ckpt, sys.argv[2])
""")


def test_checkpoint_kill_during_the_write_leaves_last_ckpt_whole(good_ckpt, tmp_path):
    """A real SIGKILL while the new last.ckpt is half written: the old one stays whole and loadable, the
    orphaned temporary file is removed by the next save into the folder."""
    import shutil

    from omnissl.train.checkpoint_io import AtomicCheckpointIO

    last = tmp_path / "ckpts" / "last.ckpt"
    last.parent.mkdir()
    shutil.copy(good_ckpt, last)
    before = last.read_bytes()
    script = tmp_path / "writer.py"
    script.write_text(KILL_SCRIPT)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, str(script), str(good_ckpt), str(last)], stdout=subprocess.PIPE,
                            text=True, env=env)
    try:
        assert proc.stdout.readline().strip() == "HALF"
        temps = list(last.parent.glob(".last.ckpt.*.tmp"))
        assert len(temps) == 1 and temps[0].stat().st_size > 0
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
    assert last.read_bytes() == before
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 2
    ckpt = torch.load(good_ckpt, map_location="cpu", weights_only=True)
    AtomicCheckpointIO().save_checkpoint(ckpt, last.parent / "epoch=1-step=4.ckpt")
    assert sorted(p.name for p in last.parent.iterdir()) == ["epoch=1-step=4.ckpt", "last.ckpt"]


def test_checkpoint_plugin_is_in_every_trainer_recipe():
    import yaml

    for name in ("debug", "cpu", "default"):
        cfg = yaml.safe_load((ROOT / f"recipes/trainer/{name}.yaml").read_text())
        assert {"class_path": "omnissl.train.checkpoint_io.AtomicCheckpointIO"} in cfg["trainer"]["plugins"], name


# =============================================================================== non-finite runs, collapse


@pytest.mark.slow
def test_nonfinite_run_with_skip_stops_naming_the_step_and_tensor_and_saves_nothing(tmp_path):
    """lr 1e6 with on_nonfinite skip: the weights went NaN after step 0, every later batch was skipped, the bar
    showed loss 0.000, NaN checkpoints were saved and the run exited 0."""
    out = run([OMNISSL, "fit", "-c", DEBUG, "-c", MAE, "--model.init_args.optimizer.init_args.lr", "1e6",
               "--model.init_args.lr_scheduler", "null", "--model.init_args.on_nonfinite", "skip",
               "--trainer.max_steps", "20", "--trainer.enable_progress_bar", "false"], cwd=tmp_path, timeout=300)
    assert out.returncode != 0
    assert "NonFiniteLossError: non-finite weights after the update of step" in out.stderr, out.stderr[-3000:]
    assert "values)" in out.stderr.splitlines()[-1]
    for ckpt in tmp_path.glob("runs/**/*.ckpt"):
        state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point()), ckpt


def _mae():
    from omnissl.backbones.builders import tiny
    from omnissl.ssl.mae import MAE as MAEModel

    return MAEModel(tiny("spectrogram"), modality="audio", decoder_dim=32, decoder_depth=1, decoder_heads=4,
                    on_nonfinite="skip", max_skipped_steps=3)


def _nan_batches(n: int):
    from omnissl.batch import Batch

    x = torch.randn(2, 16000)
    x[0, 100] = float("nan")
    return [Batch({"audio": x.clone()}, {"audio": torch.tensor([16000, 16000])}, ids=torch.tensor([4, 5]))] * n


def test_nonfinite_loss_skipped_too_often_in_a_row_stops_the_run():
    import lightning as L

    from omnissl.ssl.base import NonFiniteLossError

    loader = torch.utils.data.DataLoader(_nan_batches(6), batch_size=None, collate_fn=lambda b: b)
    t = L.Trainer(accelerator="cpu", devices=1, max_steps=6, logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(NonFiniteLossError, match=r"3 consecutive batches had a non-finite loss .*step 2 on samples "
                                                 r"\[4, 5\]; max_skipped_steps=3"):
        t.fit(_mae(), train_dataloaders=loader)


def test_nonfinite_validation_loss_raises_or_is_logged():
    import lightning as L

    from omnissl.ssl.base import NonFiniteLossError

    loader = torch.utils.data.DataLoader(_nan_batches(2), batch_size=None, collate_fn=lambda b: b)
    kw = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False)
    model = _mae()
    model.on_nonfinite = "raise"
    with pytest.raises(NonFiniteLossError, match=r"non-finite validation loss nan at step 0 \(validation batch 0"):
        L.Trainer(**kw).validate(model, loader)
    metrics = L.Trainer(**kw).validate(_mae(), loader)[0]
    assert math.isnan(metrics["val/loss"])  # logged, not dropped


@pytest.mark.slow
def test_debug_recipe_runs_on_data_of_fewer_than_4_batches_per_epoch(tmp_path):
    """debug.yaml's val_check_interval 4 failed on any data set with fewer than 4 batches per epoch."""
    out = run([OMNISSL, "fit", "-c", DEBUG, "-c", MAE, "--data.init_args.train_size", "4",
               "--data.init_args.batch_size", "2", "--trainer.enable_progress_bar", "false"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert list(tmp_path.glob("runs/debug/**/last.ckpt"))
    assert "val/loss" in next(tmp_path.glob("runs/debug/**/metrics.csv")).read_text()
