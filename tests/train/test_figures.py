"""save_figure: a PNG in the run folder named by the picture and the step; only rank 0 writes; closed always."""

from __future__ import annotations

from types import SimpleNamespace

import matplotlib.pyplot as plt
from PIL import Image

from omnissl.train.figures import figure_path, new_figure, save_figure


def _trainer(tmp_path, rank0=True):
    return SimpleNamespace(is_global_zero=rank0, global_step=17, default_root_dir=str(tmp_path), loggers=[])


def test_save_figure_writes_a_png_in_the_run_folder_and_closes_it(tmp_path):
    fig, ax = new_figure(1, 1, figsize=(2, 2))
    ax.plot([0, 1], [1, 0])
    path = save_figure(_trainer(tmp_path), fig, "mae/reconstructions")
    assert path == tmp_path / "figures" / "mae-reconstructions-step17.png"
    assert Image.open(path).format == "PNG" and Image.open(path).size[0] > 50
    assert not plt.fignum_exists(fig.number)
    assert figure_path(tmp_path, "summary", None) == tmp_path / "figures" / "summary.png"


def test_only_rank_zero_writes(tmp_path):
    fig, _ = new_figure()
    assert save_figure(_trainer(tmp_path, rank0=False), fig, "x") is None
    assert not (tmp_path / "figures").exists() and not plt.fignum_exists(fig.number)
