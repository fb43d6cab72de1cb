"""HuBERT unit pipeline (omnissl/eval/units.py, unit files in omnissl/datamodules/units.py, the command in
omnissl/commands/hubert_units.py): frame alignment of MFCC features, k-means determinism, resumability,
unit-file checks, iteration 2 from a real HuBERT checkpoint (weights only: a planted pickled object is refused),
other sample rates, the CLI."""

from __future__ import annotations

import pathlib

import lightning as L
import numpy as np
import pytest
import soundfile as sf
import torch

from omnissl.backbones.builders import tiny
from omnissl.backbones.frontends import WAV2VEC2_CONV, conv_output_lengths
from omnissl.checkpoints import read_checkpoint
from omnissl.cli import main
from omnissl.datamodules.audio import AudioDataModule
from omnissl.datamodules.units import check_units, read_units
from omnissl.eval import units as U
from omnissl.ssl.hubert import HuBERT

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
    check_units(train, out[0], 320)
    check_units(valid, out[1], 320)
    lines = read_units(out[0])
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
        check_units(train, km)
    km.write_text("1 2 3\n")
    with pytest.raises(ValueError, match="train.km has 1 lines but manifest .*train.tsv lists 4"):
        check_units(train, km)
    km.write_text("".join(" ".join(["0"] * (n // 320)) + "\n" for n in sizes[:3]) + "0 0\n")
    with pytest.raises(ValueError, match=r"train.km does not match .*line 4 \(wav/3.wav\): 2 units"):
        check_units(train, km)


def hubert_checkpoint(folder, train, clusters=6):
    """last.ckpt of a 1-step HuBERT fit on iteration-1 units of `train`, written by Lightning."""
    U.make_units(train, seed=0, **dict(FAST, clusters=clusters))
    torch.manual_seed(0)
    model = HuBERT(tiny("audio"), num_classes=clusters, final_dim=16)
    dm = AudioDataModule(train=str(train), max_samples=8000, min_samples=400, max_tokens=None,
                         batch_size=2, num_workers=0, units="km")
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        default_root_dir=folder)
    trainer.fit(model, dm)
    trainer.save_checkpoint(folder / "last.ckpt")
    return folder / "last.ckpt", model


def test_iteration_2_clusters_layer_outputs_of_a_checkpoint(tmp_path):
    train, valid, sizes = make_corpus(tmp_path / "data")
    (ckpt_dir := tmp_path / "runs/a/checkpoints").mkdir(parents=True)
    ckpt, model = hubert_checkpoint(ckpt_dir, train)
    # another run's config overwrote the shared config.yaml beside and above the checkpoint (issue 11): the
    # encoder is rebuilt from the checkpoint's own record, never from a config file found nearby
    other = ("model:\n  class_path: omnissl.ssl.hubert.HuBERT\n  init_args:\n    encoder:\n      class_path: "
             "omnissl.backbones.builders.tiny\n      init_args: {modality: audio, dim: 64, depth: 8, heads: 2}\n")
    for folder in (ckpt_dir, ckpt_dir.parent, tmp_path / "runs"):
        (folder / "config.yaml").write_text(other)
    out = U.make_units(train, iteration=2, checkpoint=ckpt, layer=1, **FAST)[0]
    assert [len(x) for x in read_units(out)] == [(n - 400) // 320 + 1 for n in sizes[:4]]
    # the features clustered are the trained encoder's own layer-1 outputs
    wav = torch.from_numpy(sf.read(tmp_path / "data" / "wav" / "0.wav", dtype="float32")[0])
    with torch.no_grad():
        want = model.encoder.eval()(wav[None]).layers[1][0]
    assert torch.allclose(U.LayerFeatures(read_checkpoint(ckpt).encoder, 1)(wav), want, atol=1e-6)
    with pytest.raises(ValueError, match="layer 3 out of range"):
        U.make_units(train, iteration=2, checkpoint=ckpt, layer=3, **FAST)


class _Payload:
    """Unpickling this runs code: it creates the marker file."""

    def __init__(self, marker) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def test_iteration_2_refuses_a_checkpoint_with_pickled_objects(tmp_path, capsys):
    train, _, _ = make_corpus(tmp_path / "data")
    ckpt, _ = hubert_checkpoint(tmp_path, train)
    state = torch.load(ckpt, weights_only=True)
    marker = tmp_path / "UNPICKLED"
    state["hyper_parameters"] = {"extra": _Payload(marker)}
    evil = tmp_path / "evil.ckpt"
    torch.save(state, evil)
    with pytest.raises(SystemExit) as e:
        main(["hubert-units", "--manifest", str(train), "--iteration", "2", "--checkpoint", str(evil), "--layer",
              "1", "--clusters", "4", "--n-init", "1", "--cache-dir", str(tmp_path / "cache")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and not marker.exists()
    assert f"omnissl hubert-units: error: {evil}: refused to load" in err and "Traceback" not in err
    with pytest.raises(SystemExit) as e:
        main(["hubert-units", "--manifest", str(train), "--iteration", "2", "--checkpoint", str(tmp_path / "no.ckpt")])
    assert e.value.code == 2 and "no.ckpt" in capsys.readouterr().err


def test_other_sample_rates_are_resampled_as_training_does(tmp_path, capsys):
    """A 22.05 kHz corpus (manifest by `omnissl data manifest`): decoded and resampled like AudioDataModule."""
    rng = np.random.default_rng(0)
    (tmp_path / "wav").mkdir()
    for i in range(3):
        x = 0.3 * np.sin(2 * np.pi * 200 * np.arange(22050) / 22050) + 0.02 * rng.standard_normal(22050)
        sf.write(tmp_path / "wav" / f"{i}.wav", x.astype(np.float32), 22050, subtype="PCM_16")
    assert main_exit(["data", "manifest", str(tmp_path / "wav"), "--out", str(tmp_path / "train.tsv")]) == 0
    assert main_exit(["hubert-units", "--manifest", str(tmp_path / "train.tsv"), "--clusters", "4",
                      "--sample-fraction", "1.0", "--n-init", "1"]) == 0
    check_units(tmp_path / "train.tsv", tmp_path / "train.km")
    assert [len(x) for x in read_units(tmp_path / "train.km")] == [(16000 - 400) // 320 + 1] * 3
    # a broken file is one line naming the manifest row, not a traceback
    (tmp_path / "wav" / "1.wav").write_bytes(b"RIFF....WAVEfmt garbage")
    (tmp_path / "bad.tsv").write_text((tmp_path / "train.tsv").read_text())
    capsys.readouterr()
    assert main_exit(["hubert-units", "--manifest", str(tmp_path / "bad.tsv"), "--clusters", "4",
                      "--sample-fraction", "1.0", "--n-init", "1"]) == 2
    err = capsys.readouterr().err
    assert "omnissl hubert-units: error: " in err and "bad.tsv:3: " in err and "1.wav" in err
    assert "Traceback" not in err


def main_exit(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as e:
        main(argv)
    return e.value.code


def test_cli(tmp_path):
    train, _, _ = make_corpus(tmp_path)
    with pytest.raises(SystemExit) as e:
        main(["hubert-units", "--manifest", str(train), "--clusters", "4", "--sample-fraction", "1.0",
              "--n-init", "1", "--seed", "3"])
    assert e.value.code == 0 and (tmp_path / "train.km").is_file()


def test_nearest_centroid_assigns_as_kmeans_predict():
    """The k-means cache holds centroids (data, never a pickle); labels from them equal MiniBatchKMeans.predict."""
    from omnissl.eval.units import fit_kmeans, nearest_centroid

    rng = np.random.default_rng(0)
    feats = np.concatenate([rng.normal(c, 1.0, size=(200, 13)) for c in (-4, 0, 4)]).astype(np.float32)
    km = fit_kmeans(feats, 3, seed=0, n_init=2, batch_size=256)
    assert np.array_equal(nearest_centroid(feats, km.cluster_centers_.astype(np.float32)), km.predict(feats))
    assert nearest_centroid(feats[:0], km.cluster_centers_).shape == (0,)


def test_logmel_frames_are_the_encoder_frames():
    for t in (400, 719, 720, 16000, 33333):
        assert U.logmel_features(torch.randn(t) * 0.1).shape == (len(U.mfcc_features(torch.randn(t))), 64)


def test_cmvn_units_ignore_a_recording_gain(tmp_path, capsys):
    """Per-utterance normalization (--cmvn) takes out what is constant over an utterance: a clip and the same
    clip 8x quieter (every log-mel band and the MFCC c0 shift by a constant) get the same units with it, for
    both iteration-1 feature sets, through the command; without it the log-mel units split by level."""
    rng = np.random.default_rng(0)
    (tmp_path / "wav").mkdir()
    rows = []
    for i in range(4):
        t = np.arange(12000) / 16000
        x = 0.3 * np.sin(2 * np.pi * (150 + 60 * i) * t * (1 + t)) + 0.02 * rng.standard_normal(len(t))
        for gain, name in ((1.0, f"{i}"), (0.125, f"{i}-quiet")):
            sf.write(tmp_path / "wav" / f"{name}.wav", (gain * x).astype(np.float32), 16000, subtype="FLOAT")
            rows.append(f"wav/{name}.wav\t{len(t)}\n")
    (tmp_path / "train.tsv").write_text(f"{tmp_path}\n" + "".join(rows))
    for features in ("logmel", "mfcc"):
        for normalize in (False, True):
            ext = f"km-{features}-{normalize}"
            assert main_exit(["hubert-units", "--manifest", str(tmp_path / "train.tsv"), "--clusters", "6",
                              "--sample-fraction", "1.0", "--n-init", "1", "--features", features,
                              "--out-ext", ext, *(["--cmvn"] if normalize else [])]) == 0
            units = read_units(tmp_path / f"train.{ext}")
            same = [np.array_equal(units[2 * i], units[2 * i + 1]) for i in range(4)]
            if normalize:
                assert all(same), (features, same)
            elif features == "logmel":
                assert not any(same), same
    with pytest.raises(ValueError, match="unknown iteration-1 features 'fbank'"):
        U.iteration1_features("fbank")
    capsys.readouterr()  # a contradictory request stops before any work, saying why
    assert main_exit(["hubert-units", "--manifest", str(tmp_path / "train.tsv"), "--iteration", "2",
                      "--features", "logmel", "--checkpoint", str(tmp_path / "none.ckpt")]) == 2
    assert "features 'logmel' name iteration 1's frame features" in capsys.readouterr().err
