"""Fixtures shared by the datamodule tests.

`data_root`: a per-session OMNISSL_DATA (tokenizers, token caches, embedded corpora) so that a test run neither
reads nor fills ~/.cache/omnissl; a module opts in with `pytestmark = pytest.mark.usefixtures("data_root")`.

`corpus` and `make` serve the text tests: the requesting module sets
    DOCS: list[str]          the documents, one .txt file each (blank ones included, for the readers to drop)
    TEXT_SIZES: dict         its TextDataModule sizes (block_size, batch_size)
"""

from __future__ import annotations

from pathlib import Path

import pytest

from omnissl.datamodules.text import TextDataModule


@pytest.fixture()
def data_root(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("OMNISSL_DATA", str(tmp_path_factory.getbasetemp() / "omnissl-data"))


def module_setting(request, name: str):
    if not hasattr(request.module, name):
        pytest.fail(f"{request.module.__name__} requests the fixture {request.fixturename!r} but sets no {name} "
                    "(see tests/datamodules/conftest.py)", pytrace=False)
    return getattr(request.module, name)


@pytest.fixture()
def corpus(request, tmp_path) -> Path:
    """A folder `corpus` of NN.txt files, one per document of the module's DOCS, in order."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    for i, doc in enumerate(module_setting(request, "DOCS")):
        (folder / f"{i:02d}.txt").write_text(doc, encoding="utf-8")
    return folder


@pytest.fixture()
def make(request):
    """make(corpus, **kw): a TextDataModule over `corpus` with the module's TEXT_SIZES, prepared and set up for fit;
    `kw` override any argument."""
    sizes = module_setting(request, "TEXT_SIZES")

    def build(corpus: Path, **kw) -> TextDataModule:
        args = dict(train=str(corpus), valid_fraction=0.0, vocab_size=320, **sizes, num_workers=0, progress=False)
        args.update(kw)
        dm = TextDataModule(**args)
        dm.prepare_data()
        dm.setup("fit")
        return dm

    return build
