"""AudioTextDataModule: captioned audio pairs, caption tokenization, decoding and cropping."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from omnissl.batch import Batch
from omnissl.datamodules.audio_io import AudioDataError, load_clip
from omnissl.datamodules.audio_text import AudioTextDataModule
from omnissl.datamodules.common import read_manifest
from omnissl.datamodules.corpora import embedded_corpus
from omnissl.datamodules.tokenizers import load_tokenizer

pytestmark = pytest.mark.usefixtures("data_root")  # tests/datamodules/conftest.py

CAPTIONS = ["A dog barks twice.", "Rain on a tin roof.", "A dog barks, then a car passes.", "Wind over faint hiss."]


@pytest.fixture()
def pairs(tmp_path) -> Path:
    """Four 16 kHz wavs (0.5-2 s, a distinct ramp each) and a caption manifest."""
    root = tmp_path / "clips"
    root.mkdir()
    rows = []
    for i, cap in enumerate(CAPTIONS):
        n = 8000 * (i + 1)
        wave = (np.arange(n) % 100) / 100.0 * 0.5 * (i + 1) / 4
        sf.write(root / f"{i}.wav", wave, 16_000, subtype="FLOAT")
        rows.append(f"{i}.wav\t{n}\t{cap}")
    manifest = tmp_path / "train.tsv"
    manifest.write_text(f"{root}\n" + "\n".join(rows) + "\n")
    return manifest


def make(manifest, **kw) -> AudioTextDataModule:
    args = dict(train=str(manifest), valid_fraction=0.0, vocab_size=320, batch_size=4, num_workers=0,
                max_samples=16_000)
    args.update(kw)
    dm = AudioTextDataModule(**args)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def test_items_pair_the_audio_with_its_caption(pairs):
    dm = make(pairs)
    tok = load_tokenizer(dm.tokenizer_path)
    root, rows = read_manifest(pairs)
    batch = next(iter(dm.train_dataloader()))
    assert isinstance(batch, Batch) and set(batch.inputs) == {"audio", "text"}
    for i, audio, n, text, m in zip(batch.ids, batch.inputs["audio"], batch.lengths["audio"], batch.inputs["text"],
                                    batch.lengths["text"]):
        rel, num, cap = rows[int(i)]
        ids = text[:m].tolist()
        assert ids[0] == dm.bos_id and ids[-1] == dm.eos_id and (text[m:] == dm.pad_id).all()
        assert tok.decode(ids) == cap
        full, _ = sf.read(root / rel, dtype="float32")
        assert int(n) == min(int(num), 16_000)
        window = audio[:n].numpy()
        # the (random) crop is a contiguous window of the file
        starts = [s for s in range(len(full) - len(window) + 1) if np.allclose(full[s:s + 5], window[:5])]
        assert any(np.allclose(full[s:s + len(window)], window) for s in starts)


def test_eval_crop_is_centred_and_captions_truncate(pairs, tmp_path):
    valid = tmp_path / "valid.tsv"
    valid.write_text(pairs.read_text())
    dm = make(pairs, valid=str(valid), max_samples=4000, max_text_tokens=5)
    root, rows = read_manifest(valid)
    for i in range(len(dm.dataset("valid"))):
        item = dm.dataset("valid")[i]
        full, _ = sf.read(root / rows[i][0], dtype="float32")
        start = (len(full) - 4000) // 2
        assert torch.allclose(item["audio"], torch.from_numpy(full[start:start + 4000]))
        assert len(item["text"]) == 5 and item["text"][-1] == dm.eos_id


def test_resamples_and_mixes_down(tmp_path):
    t = np.arange(8000) / 8000
    stereo = np.stack([np.sin(2 * np.pi * 440 * t), np.sin(2 * np.pi * 440 * t)], axis=1) * 0.5
    sf.write(tmp_path / "s.wav", stereo, 8000)
    x = load_clip(tmp_path / "s.wav", 0, random=False)
    assert x.dtype == torch.float32 and x.ndim == 1 and abs(len(x) - 16_000) <= 1
    spec = torch.fft.rfft(x).abs()
    assert abs(int(spec.argmax()) * 16_000 / len(x) - 440) < 2
    torch.manual_seed(1)
    window = load_clip(tmp_path / "s.wav", 4000, random=True)
    assert len(window) == 4000
    # a window of the full clip (away from its edges, where resampling a span sees less context)
    inner = window[200:-200]
    assert any(torch.allclose(x[s + 200:s + 3800], inner, atol=1e-2) for s in range(len(x) - 4000 + 1))


@pytest.mark.parametrize("content", [b"", b"RIFF\x00\x00\x00\x00WAVEjunk"], ids=["empty", "bad-header"])
def test_undecodable_audio_is_named_or_skipped(pairs, content):
    root, _ = read_manifest(pairs)
    (root / "1.wav").write_bytes(content)
    dm = make(pairs)
    with pytest.raises(AudioDataError, match=r"1\.wav: "):
        dm.dataset("train")[1]
    dm = make(pairs, on_error="skip")
    with pytest.warns(UserWarning, match=r"skipping audio file .*1\.wav"):
        ids = [int(i) for b in dm.train_dataloader() for i in b.ids]
    assert 1 not in ids and len(ids) == 4 and len(dm.skipped) == 1


def test_missing_caption_is_named(tmp_path, pairs):
    bad = tmp_path / "bad.tsv"
    root, _ = read_manifest(pairs)
    bad.write_text(f"{root}\n0.wav\t8000\tA caption.\n1.wav\t16000\n")
    with pytest.raises(ValueError, match=r"bad\.tsv: line 3 has no caption"):
        make(bad)


def test_given_tokenizer_and_embedded_captions():
    dm = make("embedded:captions", embedded_size="tiny", valid_fraction=0.01)
    manifests = embedded_corpus("embedded:captions", size="tiny", seed=0)
    dm2 = make("embedded:captions", embedded_size="tiny", tokenizer=str(dm.tokenizer_path))
    assert dm2.tokenizer_path == dm.tokenizer_path and dm2.vocab_size == dm.vocab_size
    tok = load_tokenizer(dm.tokenizer_path)
    root, rows = read_manifest(manifests["train"].with_name("train.captions.tsv"))
    every: dict[str, list[str]] = {}
    for rel, _, cap in rows:
        every.setdefault(str(root / rel), []).append(cap)
    batch = next(iter(dm.train_dataloader()))
    for i, text in zip(batch.ids, batch.inputs["text"]):
        # a training item pairs a clip with one of its 5 captions
        assert tok.decode(text.tolist()) in every[dm.dataset("train").files[int(i)]]
    assert all(len(c) == 5 for c in every.values())
    assert batch.inputs["audio"].shape[1] <= 16_000 and len(dm.dataset("valid")) == 1
    assert len(dm.dataset("test")) == 3 and len(dm.dataset("zeroshot")) == 14
    # eval items carry the first caption; eval_captions gives all 5
    item = dm.dataset("valid")[0]
    caps = dm.eval_captions("valid", [0])[0]
    assert len(caps) == 5 and torch.equal(item["text"], caps[0])


def test_several_captions_per_clip_are_grouped_and_drawn(pairs, tmp_path):
    root, rows = read_manifest(pairs)
    multi = tmp_path / "multi.tsv"
    lines = [f"{rel}\t{n}\t{cap}" for rel, n, cap in rows] + [f"{rows[0][0]}\t{rows[0][1]}\tAnother caption."]
    multi.write_text(f"{root}\n" + "\n".join(lines) + "\n")
    dm = make(multi)
    ds = dm.dataset("train")
    assert len(ds) == 4 and [len(t) for t in ds.token_ids] == [2, 1, 1, 1]
    tok = load_tokenizer(dm.tokenizer_path)
    torch.manual_seed(0)
    drawn = {tok.decode(ds[0]["text"].tolist()) for _ in range(30)}
    assert drawn == {CAPTIONS[0], "Another caption."}
    assert [tok.decode(t.tolist()) for t in dm.eval_captions("train", [0])[0]] == [CAPTIONS[0], "Another caption."]


def test_zeroshot_manifest_labels_and_classes(pairs, tmp_path):
    root, rows = read_manifest(pairs)
    zs = tmp_path / "zs.tsv"
    zs.write_text(f"{root}\n" + "\n".join(f"{rel}\t{n}\t{'dog' if i % 2 else 'rain'}"
                                          for i, (rel, n, _) in enumerate(rows)) + "\n")
    dm = make(pairs, zeroshot=str(zs))
    loader, classes, tokenize, heldout = dm.zeroshot_data()
    assert classes == ["dog", "rain"] and heldout is None
    batch = next(iter(loader))
    assert batch.targets["label"].tolist() == [1, 0, 1, 0] and "text" not in batch.inputs
    assert tokenize(["a dog"])[0][0] == dm.bos_id
    (tmp_path / "zs.classes.json").write_text('{"classes": ["cat", "dog", "rain"], "heldout": ["cat"]}')
    dm = make(pairs, zeroshot=str(zs))
    _, classes, _, heldout = dm.zeroshot_data()
    assert classes == ["cat", "dog", "rain"] and heldout == [True, False, False]
    assert make(pairs).zeroshot_data() is None


def test_embedded_held_out_combinations_never_train():
    """The held-out classes are absent from every train and valid clip, present in every test clip, and the
    zero-shot clips are single events of their class."""
    import json

    from omnissl.datamodules.corpora import captions as corpus

    found = embedded_corpus("embedded:captions", size="tiny", seed=0)
    for split in ("train", "valid", "test"):
        labs = [json.loads(x) for x in found[split].with_suffix(".labels.jsonl").read_text().splitlines()]
        for lab in labs:
            held = [c for c in lab["classes"] if c in corpus.HELD_OUT]
            assert bool(held) == (split == "test"), (split, lab["classes"])
            assert len(lab["captions"]) == corpus.NUM_CAPTIONS == len(set(lab["captions"]))
            assert lab["captions"][0] == lab["caption"]
    zs = [json.loads(x) for x in found["train"].with_name("zeroshot.labels.jsonl").read_text().splitlines()]
    assert sorted(z["label"] for z in zs) == sorted(corpus.CLASSES)
    for z in zs:
        assert z["classes"] == [z["label"]] and z["heldout"] == (z["label"] in corpus.HELD_OUT)
    # the rule holds over many draws, not only the tiny corpus: 300 training scenes, none held out
    for i in range(300):
        scene = corpus.draw_scene(np.random.default_rng([5, i]))
        assert not {corpus.event_class(e) for e in scene["events"]} & set(corpus.HELD_OUT)


def test_held_out_classes_are_new_combinations_of_trained_words():
    """Compositional zero-shot: every word of a held-out class names a factor that trains in at least two other
    classes (a Latin square over pitch x sound), and occurs in training captions; the small corpus has enough
    held-out zero-shot clips for a binomial standard error of about 0.02."""
    from omnissl.datamodules.corpora import captions as corpus

    seen = [c for c in corpus.CLASSES if c not in corpus.HELD_OUT]
    for held in corpus.HELD_OUT:
        pitch, sound = held.split(" ", 1)
        assert sum(c.startswith(pitch + " ") for c in seen) >= 2, held
        assert sum(c.endswith(" " + sound) for c in seen) >= 2, held
    words = set()
    for i in range(300):
        rng = np.random.default_rng([5, i])
        scene = corpus.draw_scene(rng)
        events = corpus.crop_scene(scene, 0.0, scene["end_s"])
        text = corpus.caption(events, None, rng)
        words |= set(text.lower().replace(",", " ").replace(".", " ").split())
        assert not any(h in text.lower() for h in corpus.HELD_OUT), text
    for held in corpus.HELD_OUT:
        assert set(held.split()) <= words, held
    labels = corpus.zeroshot_labels("small")
    n_held = sum(label in corpus.HELD_OUT for label in labels)
    assert n_held >= 600 and math.sqrt(0.25 / n_held) <= 0.021
    assert set(labels) == set(corpus.CLASSES)


def test_coarse_captions_name_one_factor_of_train_events_only():
    """coarse_captions=k adds to each train clip with a tone or beeps event up to k captions that name each such
    event by its pitch or by its sound, never both (so no caption holds a pitch x sound combination, seen or held
    out); valid and test clips keep their 5 captions; a corpus without factor labels is refused."""
    from omnissl.datamodules.corpora import captions as corpus

    plain = make("embedded:captions", embedded_size="tiny")
    dm = make("embedded:captions", embedded_size="tiny", coarse_captions=2)
    before, after = plain.manifests(), dm.manifests()
    assert after["valid"] == before["valid"] and after["test"] == before["test"]
    combos = [c for c in corpus.CLASSES if c.endswith((" tone", " beeps"))]
    labels = {json.loads(x)["path"]: json.loads(x) for x in embedded_corpus("embedded:captions", size="tiny")["train"]
              .with_suffix(".labels.jsonl").read_text().splitlines()}
    added = 0
    for f, old, new in zip(after["train"][0], before["train"][1], after["train"][1]):
        assert new[:len(old)] == old
        extra = new[len(old):]
        kinds = {e["kind"] for e in labels[f"clips/{f.parent.name}/{f.name}"]["events"]}
        assert len(extra) <= 2 and (bool(extra) <= bool(kinds & {"tone", "beeps"}))
        for c in extra:
            low = c.lower()
            assert not any(k in low for k in combos) and not any(k[:-1] in low for k in combos if k.endswith("s")), c
        added += len(extra)
    assert added > 0
    # the coarse phrases themselves: one factor each
    ev = {"kind": "tone", "level": "normal", "freq_hz": 200.0, "timbre": "buzzy"}
    rng = np.random.default_rng(0)
    assert {corpus.coarse_phrase(ev, rng) for _ in range(20)} == {"a low sound", "a buzzy tone"}
    beeps = {"kind": "beeps", "level": "quiet", "freq_hz": 2000.0, "count": 3}
    assert {corpus.coarse_phrase(beeps, rng) for _ in range(20)} == {"three short quiet high-pitched sounds",
                                                                      "three quiet beeps"}
    with pytest.raises(ValueError, match="coarse_captions needs the embedded captions corpus"):
        AudioTextDataModule(train="x.tsv", coarse_captions=2)
