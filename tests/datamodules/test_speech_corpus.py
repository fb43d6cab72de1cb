"""Embedded espeak-ng speech corpora (unlabeled and labeled) and the `omnissl data` commands."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from omnissl.commands.data import main
from omnissl.datamodules.audio_io import read_audio_manifest
from omnissl.datamodules.corpora import CORPORA, labeled_speech, speech


def digest(folder: Path) -> dict[str, str]:
    """sha1 of every wav, and of every manifest minus its root line (which names the folder)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.suffix == ".wav":
            out[p.relative_to(folder).as_posix()] = hashlib.sha1(p.read_bytes()).hexdigest()
        elif p.suffix in (".tsv", ".wrd", ".ltr"):
            out[p.name] = hashlib.sha1("\n".join(p.read_text().splitlines()[1:]).encode()).hexdigest()
    return out


@pytest.fixture(scope="module")
def tiny_corpus(tmp_path_factory) -> Path:
    return speech.generate(tmp_path_factory.mktemp("speech") / "tiny", size="tiny", seed=0)["train"].parent


def test_sentences_are_deterministic_english():
    a, b = speech.sentences(0), speech.sentences(0)
    assert a == b and a != speech.sentences(1) and sorted(a) == sorted(speech.sentences(1))
    assert len(a) > 1000 and len(set(a)) == len(a)
    assert all(s[0].isupper() and s[-1] in ".?!" and 4 <= len(s.split()) <= 30 for s in a)


def test_espeak_synth_and_word_events():
    engine = speech.espeak()
    engine.seed(0)
    wav, words = engine.synth("the value of left is returned", voice="en-us+m3")
    assert engine.sample_rate == 22_050 and wav.dtype == np.int16 and len(wav) > 0.8 * 22_050
    assert [p for p, _ in words] == [1, 5, 11, 14, 19, 22]  # 1-based character positions
    offsets = [s for _, s in words]
    assert offsets == sorted(offsets) and offsets[-1] < len(wav)
    x = speech.to_16k(wav, engine.sample_rate)
    assert abs(len(x) - len(wav) * 16_000 / 22_050) <= 1
    with pytest.raises(ValueError, match="no voice"):
        engine.synth("x", voice="xx-nonexistent")


def test_tiny_corpus_layout(tiny_corpus):
    train, valid, test = (read_audio_manifest(tiny_corpus / f"{s}.tsv") for s in ("train", "valid", "test"))
    assert len(train) >= 4 and len(valid) == len(test) == 2  # utterances 0 and 1 of each shard are held out
    assert train.root == tiny_corpus
    total = (train.sizes.sum() + valid.sizes.sum() + test.sizes.sum()) / 16_000
    assert 55 < total < 100
    for split, m in (("train", train), ("valid", valid), ("test", test)):
        wrd = (tiny_corpus / f"{split}.wrd").read_text().splitlines()
        ltr = (tiny_corpus / f"{split}.ltr").read_text().splitlines()
        assert len(wrd) == len(ltr) == len(m)  # one transcript per manifest line
        for w, letter_line in zip(wrd, ltr):
            assert w and set(w) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZ' ") and "  " not in w
            assert letter_line.replace(" ", "").replace("|", " ").strip() == w
            assert letter_line.endswith("|") and letter_line.count("|") == len(w.split())
        # about 10-20 characters per second of espeak speech: the transcript belongs to this audio
        rates = [len(w) / (n / 16_000) for w, n in zip(wrd, m.sizes)]
        assert all(5 < r < 30 for r in rates), rates
    for rel, n in zip(train.paths, train.sizes):
        info = sf.info(str(tiny_corpus / rel))
        assert (info.samplerate, info.channels, info.frames, info.subtype) == (16_000, 1, n, "PCM_16")
    x, _ = sf.read(tiny_corpus / train.paths[0], dtype="float32")
    assert 0.01 < np.abs(x).max() <= 1.0 and np.sqrt(np.mean(x**2)) > 1e-3


def test_transcript_normalization():
    assert speech.normalize_transcript("However, the 'password' argument is low-level.") == (
        "HOWEVER THE PASSWORD ARGUMENT IS LOW LEVEL")
    assert speech.normalize_transcript("You don't care about the caller's frame; b'' at EOF!") == (
        "YOU DON'T CARE ABOUT THE CALLER'S FRAME B AT EOF")
    assert speech.letters("HI THERE") == "H I | T H E R E |"


def test_generation_is_byte_identical_and_idempotent(tiny_corpus, tmp_path):
    again = speech.generate(tmp_path / "again", size="tiny", seed=0)["train"].parent
    assert digest(again) == digest(tiny_corpus)
    t0 = time.perf_counter()
    assert speech.generate(tiny_corpus, size="tiny", seed=0)["train"] == tiny_corpus / "train.tsv"
    assert time.perf_counter() - t0 < 1.0  # the marker short-circuits
    with pytest.raises(ValueError, match="unknown size"):
        speech.generate(tmp_path / "x", size="huge")


@pytest.mark.parametrize("task", ["keywords", "speakers"])
def test_labeled_sets_hold_out_voices_and_accents(tmp_path, task):
    paths = labeled_speech.generate(tmp_path / task, size="tiny", seed=0, task=task)
    assert set(paths) == {"train", "valid", "test"}
    manifests = {s: read_audio_manifest(p) for s, p in paths.items()}
    classes = labeled_speech.KEYWORDS if task == "keywords" else labeled_speech.SPEAKERS
    for s, m in manifests.items():
        assert m.labels is not None and set(m.labels) == set(classes)
        per_class = labeled_speech.SIZES[task]["tiny"][("train", "valid", "test").index(s)]
        assert len(m) == per_class * len(classes)
    items = [json.loads(line) for line in (tmp_path / task / "items.jsonl").read_text().splitlines()]
    accent = {s: {it["voice"].split("+")[0] for it in items if it["split"] == s} for s in manifests}
    variant = {s: {it["voice"].split("+")[1] for it in items if it["split"] == s} for s in manifests}
    assert not accent["train"] & accent["test"]
    if task == "keywords":
        assert not variant["train"] & variant["test"] and not variant["train"] & variant["valid"]
    else:
        assert not accent["train"] & accent["valid"]
        texts = {s: {it["text"] for it in items if it["split"] == s} for s in manifests}
        assert not texts["train"] & texts["test"]
    m = manifests["train"]
    x, sr = sf.read(m.root / m.paths[0], dtype="float32")
    assert sr == 16_000 and len(x) == m.sizes[0] and np.abs(x).max() > 0.01


def test_labeled_generation_is_deterministic(tmp_path):
    items = labeled_speech.plan("keywords", "tiny", 0)[:6]
    outs = []
    for d in ("a", "b"):
        speech.run_shards(labeled_speech._labeled_shard, [(str(tmp_path / d), 0, items)], desc="test")
        outs.append(digest(tmp_path / d))
    assert outs[0] == outs[1] and len(outs[0]) == 6


def test_signal_helpers():
    rng = np.random.default_rng(0)
    x = rng.standard_normal(16_000).astype(np.float32)
    n = labeled_speech.colored_noise(16_000, "pink", rng)
    y = labeled_speech.mix_at_snr(x, n, 3.0)
    snr = 10 * np.log10(np.mean(x**2) / np.mean((y - x) ** 2))
    assert abs(snr - 3.0) < 1e-3
    assert abs(np.sqrt(np.mean(labeled_speech.set_level(x * 0.01, -20.0) ** 2)) - 0.1) < 1e-3
    imp = np.zeros(16_000, np.float32)
    imp[0] = 1.0
    h = labeled_speech.reverb(imp, 0.5, rng)  # the impulse response itself: decays by ~60 dB in 0.5 s
    early, late = np.mean(h[:800] ** 2), np.mean(h[7_600:8_000] ** 2)
    assert 10 * np.log10(early / late) > 40
    w = labeled_speech.window(np.arange(5, dtype=np.float32), -2, 4)
    assert w.tolist() == [0, 0, 0, 1]


# ---------------------------------------------------------------------------------------------- commands


def test_generate_command_speech_is_idempotent(tiny_corpus, capsys):
    assert main(["generate", "speech", "--size", "tiny", "--out", str(tiny_corpus)]) == 0
    assert str(tiny_corpus / "train.tsv") in capsys.readouterr().out


def test_generate_command_dispatches_through_the_corpus_registry(tmp_path, monkeypatch):
    """Every name of the one registry (the names embedded:<name> specs take) is a `data generate` kind."""
    calls = []
    for name, corpus in list(CORPORA.items()):
        fake = lambda out, size, seed, _n=name: calls.append((_n, out, size, seed)) or {"train": out}  # noqa: E731
        monkeypatch.setitem(CORPORA, name, dataclasses.replace(corpus, generate=fake))
    for kind in CORPORA:
        assert main(["generate", kind, "--size", "small", "--out", str(tmp_path / kind), "--seed", "3"]) == 0
    assert [c[0] for c in calls] == list(CORPORA)
    assert all(c[2:] == ("small", 3) for c in calls)


def test_manifest_and_inspect_commands(tiny_corpus, tmp_path, capsys):
    out = tmp_path / "scan.tsv"
    assert main(["manifest", str(tiny_corpus / "wav"), "--out", str(out)]) == 0
    m = read_audio_manifest(out)
    listed = [read_audio_manifest(tiny_corpus / f"{s}.tsv") for s in ("train", "valid", "test")]
    assert len(m) == sum(len(x) for x in listed)
    png = tmp_path / "hist.png"
    assert main(["inspect", str(out), "--png", str(png)]) == 0
    text = capsys.readouterr().out
    assert f"items: {len(m)}  decoded: {len(m)}  bad: 0" in text and "total:" in text
    assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"

    # a bad item: non-zero exit naming it, or a counted skip
    (tmp_path / "broken.wav").write_bytes(b"RIFF....WAVEfmt garbage")
    bad = tmp_path / "bad.tsv"
    lines = out.read_text().splitlines()
    bad.write_text("\n".join(lines[:2] + [f"{tmp_path / 'broken.wav'}\t16000"] + lines[2:]) + "\n")
    assert main(["inspect", str(bad)]) == 1
    assert f"bad.tsv:3: {tmp_path / 'broken.wav'}" in capsys.readouterr().err
    assert main(["inspect", str(bad), "--on-error", "skip"]) == 0
    text = capsys.readouterr().out
    assert f"decoded: {len(m)}  bad: 1" in text and "skipped: " in text
    assert main(["inspect", str(tmp_path / "nope.tsv")]) == 1


@pytest.mark.slow
def test_small_corpus_size_and_time(tmp_path):
    """`small` is ~20 minutes of audio and generates in under 2 minutes on 2 cores."""
    t0 = time.perf_counter()
    p = speech.generate(tmp_path / "small", size="small", seed=0)["train"]
    assert time.perf_counter() - t0 < 120
    m = read_audio_manifest(p)
    assert 15 * 60 < m.sizes.sum() / 16_000 < 25 * 60
