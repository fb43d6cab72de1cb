"""Embedded corpora: determinism, idempotence, and that their content is what they claim."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from omnissl.datamodules.common import read_manifest
from omnissl.datamodules.corpora import captions, images, labeled_images, labeled_text, text

GENERATORS = {"text": text, "images": images, "captions": captions, "labeled_text": labeled_text,
              "labeled_images": labeled_images}


def tree_hashes(out: Path) -> dict[str, str]:
    """sha1 of every file under `out`; manifests are hashed without their root line (which names `out`)."""
    hashes = {}
    for f in sorted(p for p in out.rglob("*") if p.is_file()):
        data = f.read_bytes()
        if f.suffix == ".tsv":
            first, _, data = data.partition(b"\n")
            assert first.decode() == str(out)
        hashes[str(f.relative_to(out))] = hashlib.sha1(data).hexdigest()
    return hashes


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, dict[str, Path]]:
    root = tmp_path_factory.mktemp("corpora")
    return {name: gen.generate(root / name, size="tiny", seed=0) for name, gen in GENERATORS.items()}


@pytest.mark.parametrize("name", sorted(GENERATORS))
def test_same_seed_gives_identical_files_in_two_folders(tiny, tmp_path, name):
    first = tiny[name]["train"].parent
    again = GENERATORS[name].generate(tmp_path / "again", size="tiny", seed=0)
    assert set(again) == set(tiny[name])
    a, b = tree_hashes(first), tree_hashes(tmp_path / "again")
    assert a == b
    assert len(a) > 3


@pytest.mark.parametrize("name", sorted(GENERATORS))
def test_generate_is_idempotent(tiny, name):
    out = tiny[name]["train"].parent
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    again = GENERATORS[name].generate(out, size="tiny", seed=0)
    assert again == tiny[name]
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == mtimes


def test_outdated_corpus_is_rebuilt(tmp_path):
    import json

    out = tmp_path / "digits"
    labeled_images.generate(out, size="tiny")
    marker = json.loads((out / ".complete.json").read_text())
    marker["config"]["version"] = -1  # written by another version of the generator
    (out / ".complete.json").write_text(json.dumps(marker))
    (out / "train.tsv").write_text("garbage\n")
    found = labeled_images.generate(out, size="tiny")
    root, rows = read_manifest(found["train"])
    assert root == out and len(rows) == 100


def test_unknown_size_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown corpus size 'huge'"):
        text.generate(tmp_path, size="huge")


def test_captions_seed_changes_content(tmp_path, tiny):
    other = captions.generate(tmp_path / "s1", size="tiny", seed=1)
    caps = lambda m: [r[2] for r in read_manifest(m)[1]]  # noqa: E731
    assert caps(other["train"]) != caps(tiny["captions"]["train"])


# ----------------------------------------------------------------------------------------------------- text


def test_text_corpus_documents(tiny):
    out = tiny["text"]["train"].parent
    meta = [json.loads(line) for line in (out / "docs.jsonl").read_text().splitlines()]
    train_root, train = read_manifest(tiny["text"]["train"])
    _, valid = read_manifest(tiny["text"]["valid"])
    assert train and valid and not {r[0] for r in train} & {r[0] for r in valid}
    assert len(train) + len(valid) == len(meta)
    texts = []
    for rel, size in train + valid:
        data = (train_root / rel).read_bytes()
        assert len(data) == int(size) >= text.MIN_CHARS
        texts.append(data.decode("utf-8"))
    assert len(set(texts)) == len(texts)
    sources = {m["source"] for m in meta}
    assert sources <= set(text.TINY_MODULES) | {"pydoc_data.topics"}
    # textwrap.dedent's docstring is a document, exactly as ast reads it
    import ast
    import textwrap

    tree = ast.parse(Path(textwrap.__file__).read_text())
    node = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "dedent")
    assert ast.get_docstring(node) in texts


def test_text_corpus_leaves_out_labeled_test_modules(monkeypatch):
    held_out = sorted(m for m, s in text.module_splits().items() if s == "test" and "." not in m)[:3]
    monkeypatch.setattr(text, "TINY_MODULES", (*held_out, "textwrap"))
    docs = text.collect("tiny", 0, progress=False)
    assert {d.source for d in docs} == {"textwrap", "pydoc_data.topics"}


def test_labeled_text_splits_are_by_module_and_fixed(tiny, tmp_path):
    out = tiny["labeled_text"]["train"].parent
    meta = [json.loads(line) for line in (out / "docs.jsonl").read_text().splitlines()]
    modules = {s: {m["source"] for m in meta if m["split"] == s} for s in ("train", "valid", "test")}
    assert not modules["train"] & modules["test"] and not modules["valid"] & modules["test"]
    for m in meta:
        assert labeled_text.family(m["source"]) == m["label"]
        assert labeled_text.module_split(m["source"]) == m["split"]
    for split, manifest in tiny["labeled_text"].items():
        _, rows = read_manifest(manifest)
        assert {r[2] for r in rows} == set(labeled_text.FAMILIES), split
    # the test split does not depend on the seed
    other = labeled_text.generate(tmp_path / "seed1", size="tiny", seed=1)

    def test_texts(manifest):
        root, rows = read_manifest(manifest)
        return [((root / r[0]).read_text(), r[2]) for r in rows]

    assert test_texts(other["test"]) == test_texts(tiny["labeled_text"]["test"])


# ---------------------------------------------------------------------------------------------------- images


def test_labeled_digits_are_the_sklearn_digits(tiny):
    pixels, labels = labeled_images.load_digits_uint8()
    seen = {}
    for split, manifest in tiny["labeled_images"].items():
        root, rows = read_manifest(manifest)
        assert len(rows) == 10 * labeled_images.TINY_PER_CLASS[split]
        for rel, n, label in rows:
            index = int(Path(rel).stem)
            assert labels[index] == int(label) and int(n) == 64
            arr = np.asarray(Image.open(root / rel))
            assert arr.shape == (8, 8) and np.array_equal(arr, pixels[index])
            assert index not in seen
            seen[index] = split


def test_image_corpus_has_no_test_digit_and_real_photo_crops(tiny):
    _, labels = labeled_images.load_digits_uint8()
    test_idx = set(labeled_images.digit_splits(labels)["test"].tolist())
    out = tiny["images"]["train"].parent
    meta = [json.loads(line) for line in (out / "images.jsonl").read_text().splitlines()]
    digits = [m for m in meta if m["source"] == "sklearn:digits"]
    crops = [m for m in meta if m["source"] != "sklearn:digits"]
    assert len(digits) == 16 and len(crops) == 16
    assert not {m["index"] for m in digits} & test_idx
    root, rows = read_manifest(tiny["images"]["train"])
    _, vrows = read_manifest(tiny["images"]["valid"])
    assert len(rows) + len(vrows) == 32
    for m in crops:
        im = Image.open(out / m["path"])
        assert im.size == (images.CROP_SIZE, images.CROP_SIZE)
        left, top, right, bottom = m["box"]
        assert right > left and bottom > top
        assert np.asarray(im).std() > 1.0  # a real crop, not a flat image


# -------------------------------------------------------------------------------------------------- captions


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(x**2))) if len(x) else 0.0


def _seg(wave: np.ndarray, start: float, end: float, margin: float = 0.02) -> np.ndarray:
    sr = captions.SAMPLE_RATE
    return wave[int((start + margin) * sr):int((end - margin) * sr)]


def _check_clip(wave: np.ndarray, lab: dict) -> None:
    """The labels' factors are in the waveform and the caption describes exactly them."""
    sr = captions.SAMPLE_RATE
    assert len(wave) == lab["num_samples"] == round(lab["duration_s"] * sr)
    cap = lab["caption"].lower()
    positions = []
    for ev in lab["events"]:
        assert 0.0 <= ev["start_s"] < ev["end_s"] <= lab["duration_s"] + 1e-3
        seg = _seg(wave, ev["start_s"], ev["end_s"])
        assert _rms(seg) > 0.01, ev
        if ev["kind"] == "tone":
            word = f"{captions.pitch_word(ev['freq_hz'])} {ev['timbre']} tone"
            spec = np.abs(np.fft.rfft(seg * np.hanning(len(seg))))
            f = np.fft.rfftfreq(len(seg), 1 / sr)
            f0, tol = ev["freq_hz"], 0.03 * ev["freq_hz"] + 4 * sr / len(seg)
            peak = f[int(np.argmax(spec))]
            if ev["timbre"] == "pure":
                assert abs(peak - f0) < tol, (peak, ev)
            else:  # corpus v5: the strongest harmonic is any one, but the fundamental is there and lowest
                k = round(peak / f0)
                assert k >= 1 and abs(peak - k * f0) < k * tol, (peak, ev)
                assert spec[np.abs(f - f0) < tol].max() > 0.05 * spec.max(), ev
                if (lab["background"] or {}).get("kind") != "hum":  # (a mains hum has harmonics up to 180 Hz)
                    assert spec[(f > 100) & (f < 0.8 * f0)].max(initial=0.0) < 0.05 * spec.max(), ev
        elif ev["kind"] == "sweep":
            word = f"{ev['direction']} sweep"
            half = len(seg) // 2
            cross = lambda x: np.mean(np.abs(np.diff(np.sign(x))) > 0)  # noqa: E731  zero-crossing rate ~ pitch
            assert (cross(seg[half:]) > cross(seg[:half])) == (ev["direction"] == "rising")
            assert (ev["f1_hz"] > ev["f0_hz"]) == (ev["direction"] == "rising")
        elif ev["kind"] == "noise":
            word = f"{ev['color']} noise"
            spec = np.abs(np.fft.rfft(seg)) ** 2
            f = np.fft.rfftfreq(len(seg), 1 / sr)
            band = (f > 100) & (f < 6000)
            slope = np.polyfit(np.log(f[band]), np.log(spec[band] + 1e-20), 1)[0]
            if lab["background"] is None:  # (faint hiss rightly dominates brown noise's top octaves)
                assert abs(slope + captions.COLORS[ev["color"]]) < 0.3, (slope, ev)
        elif ev["kind"] == "speech":
            word = f'{ev["speaker"]} {"softly " if ev["level"] == "quiet" else ""}saying "{ev["word"]}"'
            assert ev["voice"].split("+")[1] in captions.SPEECH_VOICES[ev["speaker"]]
        else:
            word = "beeps" if ev["count"] > 1 else "single"
            assert ev["count"] == len(ev["beep_times_s"])
            if ev["count"] > 1:
                assert captions.NUMBERS[ev["count"]] + " " in cap
            env = np.abs(wave) > 0.5 * captions.PEAK[ev["level"]] * 0.5
            onsets = [t for t in ev["beep_times_s"]]
            for t in onsets:
                assert env[int(t * sr):int((t + ev["beep_s"]) * sr)].any()
        if ev["level"] == "quiet":
            assert "quiet" in cap or "softly" in cap
        assert word in cap, (word, cap)
        assert word in cap[positions[-1] + 1 if positions else 0:], (word, cap)  # described in time order
        positions.append(cap.index(word, positions[-1] + 1 if positions else 0))
    bg = lab["background"]
    assert ("hiss" in cap) == (bg is not None and bg["kind"] == "hiss")
    assert ("hum" in cap) == (bg is not None and bg["kind"] == "hum")
    # silence outside the events (less the background), so nothing undescribed is in the clip
    mask = np.ones(len(wave), dtype=bool)
    for ev in lab["events"]:
        mask[max(0, int((ev["start_s"] - 0.01) * sr)):int((ev["end_s"] + 0.01) * sr)] = False
    if mask.sum() > 0.05 * sr:
        limit = 0.03 if bg is not None else 1e-6
        assert _rms(wave[mask]) < limit


def test_caption_clips_match_their_factors():
    kinds = set()
    for i in range(80):
        wave, lab = captions.make_clip(seed=3, index=i, size="small")
        _check_clip(wave, lab)
        kinds.update(lab["kinds"])
    assert kinds == set(captions.KINDS) - {"speech"}


@pytest.mark.skipif(not captions.speech_available(), reason="espeakng-loader is not installed")
def test_spoken_words_match_their_captions():
    speaker = captions._speaker(0)
    words = captions.spoken_words(0)
    spoken = 0
    for i in range(40):
        wave, lab = captions.make_clip(seed=5, index=i, size="small", speaker=speaker, words=words)
        _check_clip(wave, lab)
        for ev in lab["events"]:
            if ev["kind"] == "speech":
                spoken += 1
                assert ev["word"] in words and 0.1 < ev["end_s"] - ev["start_s"] < 2.0
    assert spoken >= 3


def test_caption_corpus_files_match_labels(tiny):
    for split, manifest in tiny["captions"].items():
        root, rows = read_manifest(manifest)
        labels = [json.loads(line) for line in manifest.with_suffix(".labels.jsonl").read_text().splitlines()]
        assert len(rows) == len(labels) > 0
        for (rel, n, cap), lab in zip(rows, labels):
            assert lab["path"] == rel and lab["caption"] == cap and lab["num_samples"] == int(n)
            wave, sr = sf.read(root / rel, dtype="float64")
            assert sr == 16_000 and wave.ndim == 1
            _check_clip(wave, lab)
            assert re.fullmatch(r'[A-Z][a-z0-9 ,."-]+\.', cap)


def test_crop_drops_what_was_cut():
    scene = {"events": [
        {"kind": "tone", "level": "normal", "start_s": 0.0, "end_s": 1.0, "freq_hz": 440.0, "timbre": "pure"},
        {"kind": "beeps", "level": "normal", "start_s": 1.2, "end_s": 1.9, "freq_hz": 1000.0, "beep_s": 0.1,
         "beep_times_s": [1.2, 1.4, 1.6, 1.8]},
        {"kind": "sweep", "level": "normal", "start_s": 2.0, "end_s": 3.0, "direction": "rising",
         "f0_hz": 200.0, "f1_hz": 800.0},
    ], "end_s": 3.0}
    # window [0.85, 2.45): tone remnant 0.15 s < 0.25 s -> dropped; 4 beeps kept; sweep 0.45 s kept
    events = captions.crop_scene(scene, 0.85, 1.6)
    assert [e["kind"] for e in events] == ["beeps", "sweep"]
    assert events[0]["count"] == 4
    assert events[1]["start_s"] == pytest.approx(1.15) and events[1]["end_s"] == pytest.approx(1.6)
    assert events[1]["f0_hz"] == pytest.approx(200.0) and events[1]["f1_hz"] == pytest.approx(200 * 4**0.45)
    # window [1.45, 2.15): the beep at 1.4 is cut -> not counted; beeps at 1.6, 1.8 -> "two"
    events = captions.crop_scene(scene, 1.45, 0.7)
    assert [e["kind"] for e in events] == ["beeps"] and events[0]["count"] == 2
    rng = np.random.default_rng(0)
    assert captions.caption(events, None, rng).startswith("Two mid-pitched beeps")


def test_generation_never_replaces_a_foreign_folder(tmp_path):
    from omnissl.datamodules.common import cached_generation

    out = tmp_path / "mydata"
    out.mkdir()
    (out / "precious.wav").write_bytes(b"RIFF")
    with pytest.raises(FileExistsError, match="refusing to replace it"):
        cached_generation(out, {"kind": "x"}, lambda tmp, final: {})
    assert (out / "precious.wav").read_bytes() == b"RIFF"
