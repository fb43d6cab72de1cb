"""HuBERT unit pipeline (omnissl/ssl/units.py): frame alignment of MFCC features, k-means determinism,
resumability, unit-file checks, iteration 2 from a checkpoint, the CLI."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import torch
import yaml

from omnissl.backbones.builders import tiny
from omnissl.backbones.frontends import WAV2VEC2_CONV, conv_output_lengths
from omnissl.ssl import units as U

FAST = {"clusters": 6, "sample_fraction": 0.5, "n_init": 1, "shard_size": 2}


def make_corpus(folder, n=6, seed=0):
    (folder / "wav").mkdir(parents=True)
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        num = int(rng.integers(8000, 20000))
        t = np.arange(num) / 16000
        x = 0.3 * np.sin(2 * np.pi * (150 + 40 * i) * t) + 0.02 * rng.standard_normal(num)
        sf.write(folder / "wav" / f"{i}.wav", x.astype(np.float32), 16000, subtype="PCM_16")
        rows.append((f"wav/{i}.wav", num))
    (folder / "train.tsv").write_text(f"{folder}\n" + "".join(f"{r}\t{k}\n" for r, k in rows[: n - 2]))
    (folder / "valid.tsv").write_text(f"{folder}\n" + "".join(f"{r}\t{k}\n" for r, k in rows[n - 2:]))
    return folder / "train.tsv", folder / "valid.tsv", [k for _, k in rows]


def test_mfcc_frames_are_the_encoder_frames():
    for t in (400, 401, 719, 720, 1039, 16000, 33333):
        feats = U.mfcc_features(torch.randn(t) * 0.1)
        want = int(conv_output_lengths(torch.tensor([t]), WAV2VEC2_CONV)[0])
        assert feats.shape == (want, 39), (t, feats.shape, want)


def test_units_written_checked_and_deterministic(tmp_path):
    train, valid, sizes = make_corpus(tmp_path / "a")
    out = U.make_units(train, valid=valid, seed=0, **FAST)
    assert [p.name for p in out] == ["train.km", "valid.km"]
    U.check_units(train, out[0], 320)
    U.check_units(valid, out[1], 320)
    lines = U.read_units(out[0])
    assert [len(x) for x in lines] == [(n - 400) // 320 + 1 for n in sizes[:4]]
    assert all(((x >= 0) & (x < 6)).all() for x in lines)
    # the same seed on a copy of the corpus gives the same units
    train_b, valid_b, _ = make_corpus(tmp_path / "b")
    out_b = U.make_units(train_b, valid=valid_b, seed=0, **FAST)
    assert out_b[0].read_text() == out[0].read_text() and out_b[1].read_text() == out[1].read_text()


def test_resumes_without_recomputing(tmp_path, monkeypatch):
    train, valid, _ = make_corpus(tmp_path)
    first = U.make_units(train, valid=valid, **FAST)[0].read_text()
    calls = []
    real = U.mfcc_features
    monkeypatch.setattr(U, "mfcc_features", lambda wav: calls.append(1) or real(wav))
    assert U.make_units(train, valid=valid, **FAST)[0].read_text() == first
    assert calls == []  # everything cached
    shard = sorted((tmp_path / "train.km.cache").rglob("labels-*/*/shard00001.npz"))[0]
    shard.unlink()  # an interrupted run: one label shard missing
    assert U.make_units(train, valid=valid, **FAST)[0].read_text() == first
    assert len(calls) == 2  # only that shard's two utterances


def test_check_units_names_the_file(tmp_path):
    train, _, sizes = make_corpus(tmp_path)
    km = tmp_path / "train.km"
    with pytest.raises(FileNotFoundError, match="train.km"):
        U.check_units(train, km)
    km.write_text("1 2 3\n")
    with pytest.raises(ValueError, match="train.km has 1 lines but manifest .*train.tsv lists 4"):
        U.check_units(train, km)
    km.write_text("".join(" ".join(["0"] * (n // 320)) + "\n" for n in sizes[:3]) + "0 0\n")
    with pytest.raises(ValueError, match=r"train.km does not match .*line 4 \(wav/3.wav\): 2 units"):
        U.check_units(train, km)


def test_iteration_2_clusters_layer_outputs_of_a_checkpoint(tmp_path):
    train, valid, sizes = make_corpus(tmp_path / "data")
    torch.manual_seed(0)
    enc = tiny("audio")
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    cfg = {"model": {"class_path": "omnissl.ssl.hubert.HuBERT", "init_args": {
        "encoder": {"class_path": "omnissl.backbones.builders.tiny", "init_args": {"modality": "audio"}}}}}
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    ckpt = run / "checkpoints" / "last.ckpt"
    torch.save({"state_dict": {f"encoder.{k}": v for k, v in enc.state_dict().items()}}, ckpt)
    loaded = U.load_encoder(ckpt)
    for k, v in enc.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)
    out = U.make_units(train, iteration=2, checkpoint=ckpt, layer=1, **FAST)[0]
    assert [len(x) for x in U.read_units(out)] == [(n - 400) // 320 + 1 for n in sizes[:4]]
    with pytest.raises(ValueError, match="layer 3 out of range"):
        U.make_units(train, iteration=2, checkpoint=ckpt, layer=3, **FAST)


def test_cli(tmp_path):
    from omnissl.cli import main

    train, _, _ = make_corpus(tmp_path)
    with pytest.raises(SystemExit) as e:
        main(["hubert-units", "--manifest", str(train), "--clusters", "4", "--sample-fraction", "1.0",
              "--n-init", "1", "--seed", "3"])
    assert e.value.code == 0 and (tmp_path / "train.km").is_file()
