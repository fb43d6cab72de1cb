"""The embedded shapes task: generated, labeled, balanced, held-out hues in test, reachable by name."""

import json

import numpy as np
from PIL import Image

from omnissl.datamodules.common import read_manifest
from omnissl.datamodules.corpora import CORPORA, embedded_corpus
from omnissl.datamodules.corpora.shapes import HUES, SHAPES, SIZE, draw, shape_mask


def test_tiny_shapes_corpus_by_its_registered_name(monkeypatch, tmp_path):
    monkeypatch.setenv("OMNISSL_DATA", str(tmp_path))
    assert CORPORA["shapes"].labeled and CORPORA["shapes"].modality == "image"
    manifests = embedded_corpus("embedded:shapes:tiny")
    assert str(tmp_path) in str(manifests["test"])
    assert set(manifests) == {"train", "valid", "test"}
    for split, per_class in {"train": 8, "valid": 2, "test": 4}.items():
        root, rows = read_manifest(manifests[split])
        labels = [r[2] for r in rows]
        assert sorted(set(labels)) == sorted(SHAPES) and all(labels.count(s) == per_class for s in SHAPES)
        im = Image.open(root / rows[0][0])
        assert im.mode == "RGB" and im.size == (SIZE, SIZE) and int(rows[0][1]) == SIZE * SIZE
    meta = [json.loads(line) for line in open(manifests["train"].parent / "shapes.jsonl")]
    for m in meta:  # the held-out factor: test hues never occur in train or valid
        lo, hi = HUES[m["split"]]
        assert lo <= m["hue"] <= hi
    assert max(m["hue"] for m in meta if m["split"] != "test") < min(m["hue"] for m in meta if m["split"] == "test")
    # each image is drawn from a generator seeded by (seed, split, class, index): the same pixels again
    root = manifests["train"].parent
    saved = np.asarray(Image.open(root / "train" / "star" / "00003.png"))
    c = SHAPES.index("star")
    assert np.array_equal(draw(np.random.default_rng([0, 0, c, 3]), "star", HUES["train"])[0], saved)
    assert not np.array_equal(draw(np.random.default_rng([1, 0, c, 3]), "star", HUES["train"])[0], saved)


def test_shapes_are_distinct_masks():
    yy, xx = np.mgrid[-16:16, -16:16] + 0.5
    masks = {s: shape_mask(s, xx, yy, 12.0) for s in SHAPES}
    for s, m in masks.items():
        assert 20 < m.sum() < 32 * 32 / 2, s
        for t, n in masks.items():
            if s < t:
                assert (m ^ n).sum() > 20, (s, t)

