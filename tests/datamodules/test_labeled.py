"""Labeled DataModules: fixed splits, class indices from the train split, labels in Batch.targets."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from omnissl.datamodules.audio import AudioDataModule
from omnissl.datamodules.common import class_index, read_manifest
from omnissl.datamodules.corpora import embedded_corpus, labeled_text
from omnissl.datamodules.labeled import LabeledImageDataModule, LabeledTextDataModule
from omnissl.datamodules.tokenizers import load_tokenizer

pytestmark = pytest.mark.usefixtures("data_root")  # tests/datamodules/conftest.py


def write_png(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((6, 6), value, np.uint8)).save(path)


# ---------------------------------------------------------------------------------------------------- images


def test_embedded_digits_labels_and_pixels():
    dm = LabeledImageDataModule(embedded_size="tiny", image_size=8, batch_size=16, num_workers=0,
                                mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), eval_crop_pct=1.0)
    dm.prepare_data()
    dm.setup("fit")
    assert dm.classes == [str(c) for c in range(10)] and dm.num_classes == 10
    assert {s: len(d) for s, d in dm.datasets.items()} == {"train": 100, "valid": 20, "test": 40}
    root, rows = read_manifest(embedded_corpus("embedded:labeled_images", size="tiny")["test"])
    batch = next(iter(dm.test_dataloader()))
    assert batch.targets["label"].dtype == torch.int64
    for i, x, y in zip(batch.ids, batch.inputs["image"], batch.targets["label"]):
        rel, _, label = rows[int(i)]
        assert int(label) == int(y)
        pixels = torch.from_numpy(np.asarray(Image.open(root / rel), dtype=np.float32) / 255)
        # an 8x8 digit at image_size 8 with crop_pct 1: the eval transform is the identity up to scaling
        assert torch.allclose(x, pixels.expand(3, 8, 8), atol=1e-5)


def test_class_subfolders_and_unseen_test_label(tmp_path):
    for cls, v in (("cat", 10), ("dog", 200), ("emu", 90)):
        for k in range(2):
            write_png(tmp_path / "train" / cls / f"{k}.png", v)
    write_png(tmp_path / "test" / "dog" / "0.png", 200)
    dm = LabeledImageDataModule(train=str(tmp_path / "train"), test=str(tmp_path / "test"), image_size=4,
                                num_workers=0, batch_size=8, train_augment=False)
    dm.setup("fit")
    assert dm.classes == ["cat", "dog", "emu"]
    batch = next(iter(dm.test_dataloader()))
    assert batch.targets["label"].tolist() == [1]
    write_png(tmp_path / "test" / "zebra" / "0.png", 0)
    with pytest.raises(ValueError, match=r"test.*label 'zebra' does not occur in the training split"):
        dm.setup("fit")


def test_labeled_image_list_and_missing_label(tmp_path):
    for k, v in enumerate((0, 100, 255)):
        write_png(tmp_path / f"{k}.png", v)
    (tmp_path / "train.tsv").write_text(f"{tmp_path}\n0.png\t36\t10\n1.png\t36\t2\n2.png\t36\t2\n")
    (tmp_path / "nolabel.tsv").write_text(f"{tmp_path}\n0.png\t36\n")
    dm = LabeledImageDataModule(train=str(tmp_path / "train.tsv"), image_size=4, num_workers=0)
    dm.setup("fit")
    assert dm.classes == ["2", "10"]  # integer labels sort as numbers
    assert [dm.dataset("train")[i]["label"] for i in range(3)] == [1, 0, 0]
    dm = LabeledImageDataModule(train=str(tmp_path / "nolabel.tsv"), image_size=4, num_workers=0)
    with pytest.raises(ValueError, match=r"0\.png has no label"):
        dm.setup("fit")


# ------------------------------------------------------------------------------------------------------ text


def test_embedded_docstring_task():
    dm = LabeledTextDataModule(embedded_size="tiny", vocab_size=512, batch_size=8, max_tokens=4096)
    dm.prepare_data()
    dm.setup("fit")
    assert dm.classes == sorted(labeled_text.FAMILIES)
    tok = load_tokenizer(dm.tokenizer_path)
    manifests = embedded_corpus("embedded:labeled_text", size="tiny", seed=0)
    root, rows = read_manifest(manifests["test"])
    batch = next(iter(dm.test_dataloader()))
    for i, ids, n, y in zip(batch.ids, batch.inputs["text"], batch.lengths["text"], batch.targets["label"]):
        rel, _, label = rows[int(i)]
        assert dm.classes[int(y)] == label
        assert tok.decode(ids[:n].tolist()) == (root / rel).read_text()
        assert ids[0] == dm.bos_id and ids[n - 1] == dm.eos_id and (ids[n:] == dm.pad_id).all()


def test_text_manifest_truncation_unseen_label_and_non_utf8(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    texts = {"a.txt": "Parse the command line arguments." * 20, "b.txt": "Open a socket to the server.",
             "c.txt": "Join the path components.", "d.txt": "Send an e-mail message."}
    for name, t in texts.items():
        (docs / name).write_text(t)
    (tmp_path / "train.tsv").write_text(f"{docs}\na.txt\t1\ttext\nb.txt\t1\tnet\nc.txt\t1\tos\n")
    (tmp_path / "test.tsv").write_text(f"{docs}\nd.txt\t1\tnet\n")
    dm = LabeledTextDataModule(train=str(tmp_path / "train.tsv"), test=str(tmp_path / "test.tsv"),
                               vocab_size=320, max_tokens=16, batch_size=4)
    dm.prepare_data()
    dm.setup("fit")
    assert dm.classes == ["net", "os", "text"]
    assert len(dm.dataset("train")[0]["text"]) == 16 and dm.dataset("train")[0]["label"] == 2
    assert dm.dataset("test")[0]["label"] == 0
    (tmp_path / "test.tsv").write_text(f"{docs}\nd.txt\t1\tmail\n")
    with pytest.raises(ValueError, match=r"test\.tsv: label 'mail' does not occur in the training split"):
        dm.setup("fit")
    (tmp_path / "test.tsv").write_text(f"{docs}\nd.txt\t1\tnet\ne.txt\t1\tos\n")
    (docs / "e.txt").write_bytes(b"caf\xe9")
    with pytest.raises(ValueError, match=r"e\.txt: not valid UTF-8"):
        dm.setup("fit")
    dm = LabeledTextDataModule(train=str(tmp_path / "train.tsv"), test=str(tmp_path / "test.tsv"),
                               vocab_size=320, on_error="skip")
    with pytest.warns(UserWarning, match=r"skipping text file .*e\.txt"):
        dm.setup("fit")
    assert len(dm.dataset("test")) == 1 and list(dm.skipped) == [str(docs / "e.txt")]


def test_inline_jsonl(tmp_path):
    rows = [{"text": f"sample number {i} about {'cats' if i % 2 else 'dogs'}", "label": "odd" if i % 2 else "even"}
            for i in range(10)]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    dm = LabeledTextDataModule(train=str(tmp_path / "train.jsonl"), valid=str(tmp_path / "train.jsonl"),
                               vocab_size=320, batch_size=10)
    dm.prepare_data()
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))
    assert sorted(batch.targets["label"].tolist()) == [0] * 5 + [1] * 5
    assert dm.classes == ["even", "odd"]


def test_flat_typed_arguments_parse_from_yaml():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(LabeledImageDataModule, "img")
    parser.add_class_arguments(LabeledTextDataModule, "txt")
    cfg = parser.parse_string("img:\n  image_size: 32\n  mean: [0.5, 0.5, 0.5]\ntxt:\n  max_tokens: 128\n")
    assert cfg.img.image_size == 32 and tuple(cfg.img.mean) == (0.5, 0.5, 0.5) and cfg.txt.max_tokens == 128


def test_one_label_order_in_audio_text_and_images(tmp_path):
    """Numeric labels "2", "10", "1" get the same class order in every modality: 1 < 2 < 10 (numeric-aware),
    taken from the train split."""
    labels = ["2", "10", "1"]
    want = ["1", "2", "10"]
    assert class_index(labels, "x") == want
    rows = []
    for i, lab in enumerate(labels):
        sf.write(tmp_path / f"{i}.wav", 0.1 * np.sin(np.arange(16_000) / 10.0), 16_000, subtype="PCM_16")
        write_png(tmp_path / f"{i}.png", 50 * i)
        rows.append((i, lab))
    (tmp_path / "audio.tsv").write_text(f"{tmp_path}\n" + "".join(f"{i}.wav\t16000\t{lab}\n" for i, lab in rows))
    (tmp_path / "images.tsv").write_text(f"{tmp_path}\n" + "".join(f"{i}.png\t36\t{lab}\n" for i, lab in rows))
    (tmp_path / "text.jsonl").write_text("".join(json.dumps({"text": f"text number {i}", "label": lab}) + "\n"
                                                 for i, lab in rows))
    audio = AudioDataModule(train=str(tmp_path / "audio.tsv"), min_samples=0, max_samples=None, max_tokens=None,
                            batch_size=3, num_workers=0)
    images = LabeledImageDataModule(train=str(tmp_path / "images.tsv"), image_size=4, num_workers=0)
    text = LabeledTextDataModule(train=str(tmp_path / "text.jsonl"), vocab_size=320, batch_size=3)
    for dm in (audio, images, text):
        dm.prepare_data()
        dm.setup("fit")
        assert dm.classes == want and dm.num_classes == 3, type(dm).__name__
        ds = dm.dataset("train")
        assert [ds[i]["label"] for i in range(3)] == [1, 2, 0], type(dm).__name__
