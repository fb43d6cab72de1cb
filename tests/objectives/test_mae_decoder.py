"""MAE's decoder: the training step predicts only the removed patches (the last decoder block, the final
LayerNorm and the output Linear skip the kept rows) and must give the loss and gradients of the full decoder;
in a padded batch the decoder does not attend to padding, so a clip's predictions do not depend on what its
padding holds."""

from __future__ import annotations

import pytest
import torch

from omnissl.backbones import builders
from omnissl.batch import Batch
from omnissl.ssl.losses import masked_mse
from omnissl.ssl.mae import MAE


def _mae(modality: str) -> MAE:
    torch.manual_seed(0)
    enc = builders.tiny("image" if modality == "image" else "spectrogram", dim=64)
    return MAE(enc, modality=modality, decoder_dim=32, decoder_depth=2, decoder_heads=4)


def _batch(modality: str) -> Batch:
    g = torch.Generator().manual_seed(0)
    if modality == "image":
        return Batch({"image": torch.randn(3, 3, 32, 32, generator=g)})
    return Batch({"audio": torch.randn(3, 16_000, generator=g)}, {"audio": torch.tensor([16_000, 9_000, 12_000])})


@pytest.mark.parametrize("modality", ["image", "audio"])
def test_step_on_removed_patches_equals_the_full_decoder(modality):
    model, batch = _mae(modality), _batch(modality)
    results = []
    for full in (True, False):
        model.zero_grad(set_to_none=True)
        gen = torch.Generator().manual_seed(7)
        if full:
            pred, target, _, _, removed, _ = model.forward_masked(batch, gen)
            loss_sum, count = masked_mse(pred, target, removed)
            loss, frac = loss_sum / count, count / removed.numel()
        else:
            model.generator = lambda device=None: gen
            out = model.step(batch)
            loss, frac = out.loss, out.metrics["masked_frac"]
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((loss.detach(), frac, grads))
    (l_full, f_full, g_full), (l_step, f_step, g_step) = results
    torch.testing.assert_close(l_step, l_full, rtol=1e-5, atol=1e-6)
    assert float(f_step) == float(f_full)
    assert g_step.keys() == g_full.keys() and len(g_full) > 10
    for name, g in g_full.items():
        torch.testing.assert_close(g_step[name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_decoder_ignores_what_padding_holds():
    model = _mae("audio").eval()
    batch = _batch("audio")
    noisy = batch.inputs["audio"].clone()
    noisy[1, 9_000:] = 10.0 * torch.randn(7_000, generator=torch.Generator().manual_seed(1))
    preds = []
    for x in (batch.inputs["audio"], noisy):
        with torch.no_grad():
            pred, _, _, _, removed, pad = model.forward_masked(Batch({"audio": x}, batch.lengths),
                                                               torch.Generator().manual_seed(3))
        preds.append(pred)
    assert pad is not None and bool(pad[1].any()) and not bool(pad[0].any())
    valid = ~pad
    torch.testing.assert_close(preds[1][valid], preds[0][valid], rtol=1e-5, atol=1e-5)
