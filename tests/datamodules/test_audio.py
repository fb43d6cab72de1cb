"""AudioDataModule, AudioDataset, BucketBatchSampler and load_audio on real files written to tmp_path."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from omnissl.batch import Batch
from omnissl.batch import IGNORE_INDEX
from omnissl.datamodules.audio import AudioDataModule, AudioDataset, AudioLoader
from omnissl.datamodules.audio_io import AudioDataError, load_audio, read_audio_manifest, write_audio_manifest
from omnissl.datamodules.corpora import parse_embedded
from omnissl.datamodules.sampler import BucketBatchSampler

SPU = 320  # samples per unit at 50 Hz


def tone(n: int, sr: int = 16_000, f: float = 440.0) -> np.ndarray:
    return (0.3 * np.sin(2 * np.pi * f * np.arange(n) / sr)).astype(np.float32)


def write_corpus(folder: Path, lengths: list[int], labels: list[str] | None = None, name: str = "train") -> Path:
    """16 kHz wavs + manifest `folder/<name>.tsv` (root line, then path, samples[, label])."""
    (folder / "wav").mkdir(parents=True, exist_ok=True)
    rows = []
    for i, n in enumerate(lengths):
        rel = f"wav/{name}{i:03d}.wav"
        sf.write(folder / rel, tone(n, f=200 + 30 * i), 16_000, subtype="PCM_16")
        rows.append(f"{rel}\t{n}" + (f"\t{labels[i]}" if labels else ""))
    path = folder / f"{name}.tsv"
    path.write_text(f"{folder}\n" + "\n".join(rows) + "\n")
    return path


def frame_coded(folder: Path, n: int, name: str) -> tuple[str, int]:
    """A float wav whose sample s holds (s // 320) / 1000: the audio says which unit frame it belongs to."""
    x = (np.arange(n) // SPU).astype(np.float32) / 1000.0
    sf.write(folder / name, x, 16_000, subtype="FLOAT")
    return name, n


# ---------------------------------------------------------------------------------------------- manifests


def test_manifest_roundtrip_and_folder_scan(tmp_path):
    write_corpus(tmp_path / "c", [16_000, 20_000])
    sf.write(tmp_path / "c" / "wav" / "extra.flac", tone(8_000), 16_000)
    sf.write(tmp_path / "c" / "wav" / "hi.ogg", tone(44_100, sr=44_100), 44_100)
    scanned = read_audio_manifest(tmp_path / "c")
    assert sorted(scanned.paths) == scanned.paths
    assert dict(zip(scanned.paths, scanned.sizes.tolist())) == {
        "wav/extra.flac": 8_000, "wav/hi.ogg": 16_000, "wav/train000.wav": 16_000, "wav/train001.wav": 20_000,
    }  # fmt: skip
    out = tmp_path / "m.tsv"
    assert write_audio_manifest(tmp_path / "c", out) == 4
    again = read_audio_manifest(out)
    assert again.paths == scanned.paths and again.sizes.tolist() == scanned.sizes.tolist()
    assert again.lines.tolist() == [2, 3, 4, 5]


def test_relative_root_and_labels(tmp_path):
    write_corpus(tmp_path, [16_000, 16_000], labels=["b", "a"])
    (tmp_path / "rel.tsv").write_text(".\nwav/train000.wav\t16000\tb\n\nwav/train001.wav\t16000\ta\n")
    m = read_audio_manifest(tmp_path / "rel.tsv")
    assert m.root == tmp_path / "." and m.labels == ["b", "a"] and m.lines.tolist() == [2, 4]


@pytest.mark.parametrize(
    "body, match",
    [
        ("a.wav\tnot-a-number\n", "not an integer"),
        ("a.wav\n", "expected 'path"),
        ("a.wav\t10\tx\nb.wav\t10\n", "some lines have a label"),
    ],
)
def test_bad_manifest_lines_name_the_line(tmp_path, body, match):
    p = tmp_path / "bad.tsv"
    p.write_text(f"{tmp_path}\n{body}")
    with pytest.raises(AudioDataError, match=match) as e:
        read_audio_manifest(p)
    assert "bad.tsv:" in str(e.value)


# ------------------------------------------------------------------------------------------------ decoding


def test_stereo_44k_is_downmixed_and_resampled(tmp_path):
    sr, n = 44_100, 44_100
    left, right = tone(n, sr, 440.0), tone(n, sr, 440.0) * 0.5
    sf.write(tmp_path / "st.wav", np.stack([left, right], 1), sr, subtype="PCM_16")
    x = load_audio(tmp_path / "st.wav")
    assert x.dtype == torch.float32 and x.shape == (16_000,)
    ref = tone(16_000, 16_000, 440.0) * 0.75  # mean of the channels
    assert np.abs(x[200:-200].numpy() - ref[200:-200]).max() < 0.01
    # a crop of the resampled stream reads only its span, and matches the full decode
    part = load_audio(tmp_path / "st.wav", start=4_000, num=8_000)
    assert part.shape == (8_000,)
    assert torch.allclose(part[100:-100], x[4_100:11_900], atol=2e-3)


def _bad_files(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    good = tmp_path / "good.wav"
    sf.write(good, tone(16_000), 16_000, subtype="PCM_16")
    raw = good.read_bytes()
    files = {}
    (tmp_path / "corrupt.wav").write_bytes(b"RIFF" + os.urandom(3_000))
    files["corrupt"] = (tmp_path / "corrupt.wav", "unreadable audio file")
    (tmp_path / "empty.wav").write_bytes(b"")
    files["empty"] = (tmp_path / "empty.wav", "unreadable audio file")
    sf.write(tmp_path / "zero.wav", np.zeros(0, np.float32), 16_000, subtype="PCM_16")
    files["zero_length"] = (tmp_path / "zero.wav", "empty audio")
    (tmp_path / "trunc.wav").write_bytes(raw[: len(raw) // 2])
    files["truncated"] = (tmp_path / "trunc.wav", "truncated")
    (tmp_path / "adir.wav").mkdir()
    files["directory"] = (tmp_path / "adir.wav", "directory")
    os.symlink(tmp_path / "nowhere.wav", tmp_path / "dangling.wav")
    files["dangling"] = (tmp_path / "dangling.wav", "dangling symlink")
    files["missing"] = (tmp_path / "missing.wav", "file not found")
    x = tone(16_000)
    x[100] = np.nan
    sf.write(tmp_path / "nan.wav", x, 16_000, subtype="FLOAT")
    files["nan"] = (tmp_path / "nan.wav", "NaN")
    return files


def test_load_audio_bad_files(tmp_path):
    for kind, (path, match) in _bad_files(tmp_path).items():
        with pytest.raises(AudioDataError, match=match):
            load_audio(path, expected=16_000)


def test_length_disagreeing_with_manifest(tmp_path):
    sf.write(tmp_path / "a.wav", tone(12_000), 16_000, subtype="PCM_16")
    with pytest.raises(AudioDataError, match="manifest says 16000"):
        load_audio(tmp_path / "a.wav", expected=16_000)
    # fairseq's convention for non-16 kHz files (native frame count) is accepted
    sf.write(tmp_path / "b.wav", tone(22_050, 22_050), 22_050, subtype="PCM_16")
    assert load_audio(tmp_path / "b.wav", expected=22_050).shape == (16_000,)
    (tmp_path / "native.tsv").write_text(f"{tmp_path}\nb.wav\t22050\n")
    ds = AudioDataset(read_audio_manifest(tmp_path / "native.tsv"), max_samples=20_000)
    assert all(ds[(0, e)]["audio"].shape == (16_000,) for e in range(3))  # crop mapped onto 16 kHz
    ds = AudioDataset(read_audio_manifest(tmp_path / "native.tsv"), max_samples=8_000)
    assert all(ds[(0, e)]["audio"].shape == (8_000,) for e in range(3))


@pytest.mark.parametrize(
    "kind", ["corrupt", "empty", "zero_length", "truncated", "directory", "dangling", "missing", "nan"]
)
def test_bad_items_raise_naming_the_manifest_line_or_skip(tmp_path, kind):
    files = _bad_files(tmp_path)
    path, match = files[kind]
    good = tmp_path / "good.wav"
    manifest = tmp_path / "m.tsv"
    manifest.write_text(f"{tmp_path}\ngood.wav\t16000\n{path.name}\t16000\ngood.wav\t16000\n")
    dm = AudioDataModule(train=str(manifest), min_samples=0, max_samples=None, batch_size=2,
                         max_tokens=None, num_workers=0)  # fmt: skip
    dm.setup("fit")
    with pytest.raises(AudioDataError, match=match) as e:
        list(dm.train_dataloader())
    assert f"m.tsv:3: {path}" in str(e.value)
    assert good.exists()

    dm = AudioDataModule(train=str(manifest), min_samples=0, max_samples=None, batch_size=2,
                         max_tokens=None, num_workers=0, on_error="skip")  # fmt: skip
    dm.setup("fit")
    loader = dm.train_dataloader()
    batches = list(loader)
    assert sum(b.batch_size for b in batches) == 2 and loader.skipped == 1
    list(loader)  # the count is per epoch and accumulates
    assert loader.skipped == 2


def test_skip_is_reported_per_epoch_with_workers(tmp_path, caplog):
    files = _bad_files(tmp_path)
    rows = ["good.wav\t16000"] * 5 + [f"{files['corrupt'][0].name}\t16000", f"{files['missing'][0].name}\t16000"]
    (tmp_path / "m.tsv").write_text(f"{tmp_path}\n" + "\n".join(rows) + "\n")
    dm = AudioDataModule(train=str(tmp_path / "m.tsv"), min_samples=0, max_samples=None, batch_size=1,
                         max_tokens=None, num_workers=2, on_error="skip")  # fmt: skip
    dm.setup("fit")
    with caplog.at_level(logging.WARNING, logger="omnissl.datamodules.audio"):
        n = sum(b.batch_size for b in dm.train_dataloader())
    assert n == 5
    assert "skipped 2 unreadable items this epoch" in caplog.text


def test_an_epoch_of_only_corrupt_files_raises_naming_the_manifest(tmp_path):
    """Under on_error="skip" an epoch in which every item failed would yield no batch, and Lightning would
    start the next empty epoch forever: it raises instead, naming the manifest (reliability review)."""
    rows = []
    for i in range(3):
        (tmp_path / f"bad{i}.wav").write_bytes(b"RIFF" + os.urandom(2_000))
        rows.append(f"bad{i}.wav\t16000")
    (tmp_path / "bad.tsv").write_text(f"{tmp_path}\n" + "\n".join(rows) + "\n")
    dm = AudioDataModule(train=str(tmp_path / "bad.tsv"), min_samples=0, max_samples=None, batch_size=2,
                         max_tokens=None, num_workers=0, on_error="skip")  # fmt: skip
    dm.setup("fit")
    with pytest.raises(AudioDataError, match=r"every item of .*bad\.tsv failed to load"):
        list(dm.train_dataloader())
    assert sorted(Path(f).name for f in dm.skipped) == ["bad0.wav", "bad1.wav", "bad2.wav"]


# ------------------------------------------------------------------------------------------------- dataset


def test_crops_and_units_stay_aligned(tmp_path):
    lengths = [48_000 + 37, 100_000, 8_000 + 5, 64_000]
    rows, km = [], []
    for i, n in enumerate(lengths):
        rel, n = frame_coded(tmp_path, n, f"u{i}.wav")
        rows.append(f"{rel}\t{n}")
        km.append(" ".join(str(j) for j in range(-(-n // SPU))))  # one unit per started frame
    (tmp_path / "train.tsv").write_text(f"{tmp_path}\n" + "\n".join(rows) + "\n")
    (tmp_path / "train.km").write_text("\n".join(km) + "\n")
    m = read_audio_manifest(tmp_path / "train.tsv")
    for crop in ("random", "center"):
        ds = AudioDataset(m, max_samples=16_000, units=tmp_path / "train.km", crop=crop, seed=3)
        starts = set()
        for epoch in range(4):
            for i in range(len(ds)):
                it = ds[(i, epoch)]
                x, u = it["audio"].numpy(), it["units"].numpy()
                assert len(x) == min(lengths[i], 16_000) and len(u) == -(-len(x) // SPU)
                coded = np.round(x[::SPU] * 1000).astype(int)  # the frame index of every unit's first sample
                np.testing.assert_array_equal(coded, u)
                assert (np.round(x * 1000).astype(int) == np.repeat(u, SPU)[: len(x)]).all()
                starts.add((i, int(u[0])))
        if crop == "random":
            assert len(starts) > len(lengths) + 2  # crops move between epochs
        else:
            assert len(starts) == len(lengths)
    # deterministic: same (seed, epoch, index) -> same crop
    ds = AudioDataset(m, max_samples=16_000, units=tmp_path / "train.km", seed=3)
    assert torch.equal(ds[(1, 7)]["units"], ds[(1, 7)]["units"])


def test_units_mismatch_is_an_error(tmp_path):
    rel, n = frame_coded(tmp_path, 32_000, "a.wav")
    (tmp_path / "train.tsv").write_text(f"{tmp_path}\n{rel}\t{n}\n")
    (tmp_path / "train.km").write_text(" ".join(["1"] * 10) + "\n")
    ds = AudioDataset(read_audio_manifest(tmp_path / "train.tsv"), units=tmp_path / "train.km")
    with pytest.raises(AudioDataError, match="does not match this audio"):
        ds[0]
    (tmp_path / "train.km").write_text("1 2\n3 4\n")
    with pytest.raises(AudioDataError, match="one line of units per manifest line"):
        AudioDataset(read_audio_manifest(tmp_path / "train.tsv"), units=tmp_path / "train.km")


def test_datamodule_emits_batches_with_units_and_labels(tmp_path):
    lengths = [40_000, 33_000, 50_000, 20_000, 36_000]
    rows, km = [], []
    for i, n in enumerate(lengths):
        rel, n = frame_coded(tmp_path, n, f"u{i}.wav")
        rows.append(f"{rel}\t{n}\t{'yes' if i % 2 else 'no'}")
        km.append(" ".join(str(j) for j in range(n // SPU)))
    (tmp_path / "train.tsv").write_text(f"{tmp_path}\n" + "\n".join(rows) + "\n")
    (tmp_path / "train.km").write_text("\n".join(km) + "\n")
    dm = AudioDataModule(train=str(tmp_path / "train.tsv"), max_samples=32_000, min_samples=32_000,
                         max_tokens=64_000, units="km", num_workers=0)  # fmt: skip
    dm.setup("fit")
    assert dm.classes == ["no", "yes"] and len(dm.dataset("train")) == 4  # 20 000 < min_samples
    batches = list(dm.train_dataloader())
    seen = []
    for b in batches:
        assert isinstance(b, Batch)
        assert b.inputs["audio"].shape[0] * b.inputs["audio"].shape[1] <= 64_000
        assert b.lengths["audio"].max() <= 32_000
        units = b.targets["units"]
        for k in range(b.batch_size):
            n = int(b.lengths["audio"][k])
            valid = units[k][units[k] != IGNORE_INDEX]
            coded = torch.round(b.inputs["audio"][k, :n:SPU] * 1000).long()
            assert torch.equal(coded[: len(valid)], valid)
        seen += b.ids.tolist()
        assert set(b.targets["label"].tolist()) <= {0, 1}
    assert sorted(seen) == [0, 1, 2, 3]


def test_empty_after_filtering_fails_in_setup(tmp_path):
    write_corpus(tmp_path, [8_000, 9_000])
    dm = AudioDataModule(train=str(tmp_path / "train.tsv"), min_samples=32_000, num_workers=0)
    with pytest.raises(ValueError, match="train data is empty.*min_samples=32000.*longest has 9000"):
        dm.setup("fit")


# ------------------------------------------------------------------------------------------------ batching


def test_bucketing_respects_max_tokens_and_covers_everything():
    rng = np.random.default_rng(0)
    lengths = rng.integers(32_000, 250_001, 500)
    s = BucketBatchSampler(lengths=lengths, max_tokens=1_400_000, seed=1)
    for epoch in range(3):
        s.set_epoch(epoch)
        batches = list(s)
        assert len(batches) == len(s)
        flat = [i for b in batches for i, e in b]
        assert sorted(flat) == list(range(500)) and all(e == epoch for b in batches for _, e in b)
        for b in batches:
            idx = [i for i, _ in b]
            assert len(idx) * lengths[idx].max() <= 1_400_000
        # similar lengths share a batch: the padding overhead stays small
        padded = sum(len(b) * lengths[[i for i, _ in b]].max() for b in batches)
        assert padded / lengths.sum() < 1.1
    s.set_epoch(0)
    first = list(s)
    s.set_epoch(1)
    assert list(map(len, first)) != list(map(len, list(s))) or first != list(s)
    s.set_epoch(0)
    assert list(s) == first  # a function of (seed, epoch)


def test_lightning_sets_the_epoch(tmp_path):
    from lightning.fabric.utilities.data import _set_sampler_epoch

    write_corpus(tmp_path, [40_000, 36_000, 50_000, 45_000])
    dm = AudioDataModule(train=str(tmp_path / "train.tsv"), max_samples=32_000, batch_size=1,
                         max_tokens=None, num_workers=0)  # fmt: skip
    dm.setup("fit")
    loader = dm.train_dataloader()
    runs = []
    for epoch in (0, 1, 0):
        _set_sampler_epoch(loader, epoch)  # what Lightning's fit loop calls
        assert loader.batch_sampler.epoch == epoch
        runs.append([(b.ids.item(), b.inputs["audio"][0, :50].clone()) for b in loader])
    by_id = [dict(run) for run in runs]
    assert sum(not torch.equal(by_id[0][i], by_id[1][i]) for i in by_id[0]) >= 3  # new crops each epoch
    assert all(i == j and torch.equal(a, b) for (i, a), (j, b) in zip(runs[0], runs[2]))


def test_bucketing_batch_size_cap_and_plain_batches():
    lengths = np.full(50, 1000)
    s = BucketBatchSampler(lengths=lengths, max_tokens=1_000_000, batch_size=8)
    assert all(len(b) <= 8 for b in s) and sum(map(len, s)) == 50
    s = BucketBatchSampler(lengths=lengths, max_tokens=None, batch_size=8, shuffle=False)
    assert [len(b) for b in s] == [8] * 6 + [2]
    with pytest.raises(ValueError, match="exceeds max_tokens"):
        BucketBatchSampler(lengths=[10, 2_000], max_tokens=1_000)


def test_distributed_sharding_and_lightning_injection():
    from lightning.fabric.utilities.data import _replace_dunder_methods
    from lightning.pytorch.utilities.data import _update_dataloader
    from torch.utils.data import BatchSampler, DataLoader, DistributedSampler


    lengths = np.random.default_rng(0).integers(1_000, 10_000, 103)
    per_rank = [list(BucketBatchSampler(lengths=lengths, max_tokens=40_000, num_replicas=4, rank=r))
                for r in range(4)]
    assert len({len(b) for b in per_rank}) == 1  # same number of steps on every rank
    covered = {i for b in per_rank for batch in b for i, _ in batch}
    assert covered == set(range(103))

    # Lightning re-instantiates the batch sampler with a DistributedSampler: rank and world size carry over
    class Toy(torch.utils.data.Dataset):
        def __len__(self):
            return 103

        def __getitem__(self, key):
            return {"id": key[0], "audio": torch.zeros(4)}

    with _replace_dunder_methods(DataLoader, "dataset"), _replace_dunder_methods(BatchSampler):
        loader = AudioLoader(Toy(), split="train", batch_sampler=BucketBatchSampler(lengths=lengths, max_tokens=40_000))
    dist_sampler = DistributedSampler(Toy(), num_replicas=4, rank=2)
    new = _update_dataloader(loader, dist_sampler)
    assert isinstance(new, AudioLoader) and isinstance(new.batch_sampler, BucketBatchSampler)
    assert (new.batch_sampler.num_replicas, new.batch_sampler.rank) == (4, 2)
    assert list(new.batch_sampler) == per_rank[2]
    dist_sampler.set_epoch(5)  # Lightning sets the epoch on the injected sampler
    assert new.batch_sampler.epoch == 5 and all(e == 5 for b in new.batch_sampler for _, e in b)


# ------------------------------------------------------------------------------------------------ embedded


def test_embedded_spec_parsing():
    assert parse_embedded("embedded:small") == ("speech", "small")
    assert parse_embedded("embedded:keywords:tiny") == ("keywords", "tiny")
    assert parse_embedded("embedded:speech", "default") == ("speech", "default")
    with pytest.raises(ValueError, match="unknown embedded"):
        AudioDataModule(train="embedded:huge")
    with pytest.raises(ValueError, match="unknown embedded"):
        parse_embedded("embedded:keywords:huge")


@pytest.mark.slow
def test_embedded_tiny_corpus_through_the_datamodule(tmp_path, monkeypatch):
    monkeypatch.setenv("OMNISSL_DATA", str(tmp_path))
    dm = AudioDataModule(train="embedded:tiny", valid="embedded:tiny", max_samples=64_000,
                         min_samples=16_000, max_tokens=256_000, num_workers=0)  # fmt: skip
    dm.prepare_data()
    dm.setup("fit")
    b = next(iter(dm.train_dataloader()))
    assert b.inputs["audio"].shape[1] <= 64_000 and b.inputs["audio"].abs().max() > 0.01
    assert len(list(dm.val_dataloader())) >= 1


def test_lightning_cli_yaml_configures_the_datamodule(tmp_path):
    from jsonargparse import ArgumentParser

    write_corpus(tmp_path, [40_000, 40_000])
    cfg = tmp_path / "data.yaml"
    cfg.write_text(
        "data:\n  class_path: omnissl.datamodules.audio.AudioDataModule\n  init_args:\n"
        f"    train: {tmp_path / 'train.tsv'}\n    max_tokens: 800000\n    batch_size: 4\n"
        "    on_error: skip\n    units: null\n    num_workers: 0\n"
    )
    parser = ArgumentParser()
    parser.add_argument("--data", type=AudioDataModule)
    parser.add_argument("--config", action="config")
    init = parser.instantiate_classes(parser.parse_args(["--config", str(cfg)]))
    dm = init.data
    assert isinstance(dm, AudioDataModule) and dm.max_tokens == 800_000 and dm.on_error == "skip"
    dm.setup("fit")
    assert next(iter(dm.train_dataloader())).batch_size == 2
