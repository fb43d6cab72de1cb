import subprocess
import sys
from pathlib import Path

import pytest
import torch

from omnissl.batch import Batch

ROOT = Path(__file__).resolve().parents[1]


def test_ssl_is_stdlib_in_tests():
    import ssl

    assert "site-packages" not in ssl.__file__ and "omnissl" not in ssl.__file__
    assert Path(ssl.__file__).parent == Path(subprocess.__file__).parent


def test_ssl_is_stdlib_from_repo_root_and_omnissl_does_not_import_wandb():
    code = "import omnissl, omnissl.cli, omnissl.ssl.base, ssl, sys; print(ssl.__file__); print('wandb' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    ssl_file, wandb_loaded = out.stdout.split()
    assert Path(ssl_file).parent == Path(subprocess.__file__).parent
    assert wandb_loaded == "False"


def test_batch_validates_shapes_and_modalities():
    b = Batch({"audio": torch.zeros(2, 10)}, {"audio": torch.tensor([10, 7])}, ids=torch.tensor([3, 4]))
    assert b.batch_size == 2
    with pytest.raises(ValueError, match="unknown modality 'video'"):
        Batch({"video": torch.zeros(2, 3)})
    with pytest.raises(ValueError, match=r"lengths\['audio'\] has shape \(3,\), expected \(2,\)"):
        Batch({"audio": torch.zeros(2, 10)}, {"audio": torch.tensor([1, 2, 3])})
    with pytest.raises(ValueError, match="disagree on batch size"):
        Batch({"audio": torch.zeros(2, 10), "text": torch.zeros(3, 4, dtype=torch.long)})


def test_collate_pads_and_keeps_content():
    from omnissl.batch import IGNORE_INDEX
    from omnissl.datamodules.collate import Collate

    items = [
        {"id": 5, "audio": torch.arange(4.0), "text": torch.tensor([7, 8, 9]), "units": torch.tensor([1, 2]), "label": 1},
        {"id": 2, "audio": torch.arange(2.0), "text": torch.tensor([6]), "units": torch.tensor([3]), "label": 0},
    ]
    b = Collate(text_pad_id=1)(items)
    assert b.inputs["audio"].tolist() == [[0, 1, 2, 3], [0, 1, 0, 0]]
    assert b.lengths["audio"].tolist() == [4, 2] and b.lengths["text"].tolist() == [3, 1]
    assert b.inputs["text"].tolist() == [[7, 8, 9], [6, 1, 1]]
    assert b.targets["units"].tolist() == [[1, 2], [3, IGNORE_INDEX]]
    assert b.targets["label"].tolist() == [1, 0] and b.ids.tolist() == [5, 2]
