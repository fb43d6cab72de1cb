"""Labeled image lists as users have them: `path<TAB>label` without a size column (issue 19)."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from omnissl.datamodules.labeled import LabeledImageDataModule


def write_png(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((6, 6), value, np.uint8)).save(path)


@pytest.mark.parametrize("form", ["path<TAB>label", "path<TAB>size<TAB>label", "manifest", "folders"])
def test_every_labeled_image_form_gives_the_same_items(tmp_path, form):
    labels = {"a.png": "cat", "b.png": "dog", "c.png": "cat"}
    for k, name in enumerate(labels):
        write_png(tmp_path / "img" / name, 40 * k)
        write_png(tmp_path / "classes" / labels[name] / name, 40 * k)
    lists = {
        "path<TAB>label": "".join(f"img/{n}\t{lab}\n" for n, lab in labels.items()),
        "path<TAB>size<TAB>label": "".join(f"img/{n}\t36\t{lab}\n" for n, lab in labels.items()),
        "manifest": f"{tmp_path / 'img'}\n" + "".join(f"{n}\t36\t{lab}\n" for n, lab in labels.items()),
    }
    source = tmp_path / "classes"
    if form in lists:
        source = tmp_path / "train.tsv"
        source.write_text(lists[form])
    dm = LabeledImageDataModule(train=str(source), image_size=4, num_workers=0, train_augment=False)
    dm.setup("fit")
    assert dm.classes == ["cat", "dog"]
    items = sorted((Path(f).name, y) for f, y in zip(dm.dataset("train").files, dm.dataset("train").labels))
    assert items == [("a.png", 0), ("b.png", 1), ("c.png", 0)]


def test_a_manifest_with_sizes_only_has_no_labels(tmp_path):
    write_png(tmp_path / "0.png", 0)
    (tmp_path / "nolabel.tsv").write_text(f"{tmp_path}\n0.png\t36\n")  # root line: the 2nd column is a size
    dm = LabeledImageDataModule(train=str(tmp_path / "nolabel.tsv"), image_size=4, num_workers=0)
    with pytest.raises(ValueError, match=r"0\.png has no label"):
        dm.setup("fit")
