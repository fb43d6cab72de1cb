"""TimmViT with timm's pretrained options and local weights (issue 19: `pretrained=True` used to fail with
"got multiple values for keyword argument 'pretrained'"). Nothing is downloaded: the weights are a file saved
here from a timm model."""

import pytest
import timm
import torch
from safetensors.torch import save_file

from omnissl.backbones.timm_adapter import TimmViT

NAME = "vit_tiny_patch16_224"


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A timm ViT with a 10-class head (as published weights have one) and its weights in two formats."""
    torch.manual_seed(3)
    model = timm.create_model(NAME, pretrained=False, num_classes=10, img_size=32)
    folder = tmp_path_factory.mktemp("timm")
    save_file(model.state_dict(), folder / "w.safetensors")
    torch.save(model.state_dict(), folder / "w.pth")
    return model, folder


def same_trunk(vit: TimmViT, model) -> bool:
    ours = vit.vit.state_dict()
    return all(torch.equal(ours[k], v) for k, v in model.state_dict().items() if not k.startswith("head"))


@pytest.mark.parametrize("file", ["w.safetensors", "w.pth"])
def test_local_weights_load_without_the_head(source, file):
    model, folder = source
    vit = TimmViT(NAME, img_size=32, weights=str(folder / file))
    assert same_trunk(vit, model)
    assert isinstance(vit.vit.head, torch.nn.Identity)  # the classifier is dropped: features only
    out = vit(torch.randn(2, 3, 32, 32))
    assert out.last.shape == (2, 5, 192) and len(out.layers) == 13


def test_pretrained_true_and_timm_options_pass_through(source):
    model, folder = source
    vit = TimmViT(NAME, img_size=32, pretrained=True, drop_path_rate=0.1,
                  pretrained_cfg_overlay={"file": str(folder / "w.safetensors")})
    assert same_trunk(vit, model)
    assert vit.vit.blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)
    fresh = TimmViT(NAME, img_size=32)  # pretrained=False: timm's random init, not the file
    assert not same_trunk(fresh, model)


def test_missing_weights_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.safetensors is not a file"):
        TimmViT(NAME, img_size=32, weights=str(tmp_path / "nope.safetensors"))
