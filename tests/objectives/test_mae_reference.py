"""MAE against naive re-implementations of the reference (models_mae.py): MAE's init, the shuffle / restore of
`random_masking` and the decoder, norm-pix targets, and a loss that covers removed patches only."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from omnissl.backbones import builders
from omnissl.batch import Batch
from omnissl.ssl.mae import MAE
from omnissl.ssl.masking import random_keep


def _mae(modality="image", **kw):
    enc = builders.tiny("image" if modality == "image" else "spectrogram", dim=64)
    return MAE(enc, modality=modality, decoder_dim=32, decoder_depth=1, decoder_heads=4, **kw)


def _xavier_bound(fan_in, fan_out):
    return math.sqrt(6.0 / (fan_in + fan_out))


@pytest.mark.parametrize("modality", ["image", "audio"])
def test_init_is_mae_xavier(modality):
    torch.manual_seed(0)
    model = _mae(modality)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(linears) >= 8  # qkv, out, fc1, fc2 per block, decoder embed and output
    for m in linears:
        w = m.weight.detach()
        bound = _xavier_bound(w.shape[1], w.shape[0])
        # uniform on [-bound, bound]: nothing outside, the edges reached, std bound / sqrt(3)
        assert float(w.abs().max()) <= bound + 1e-7 and float(w.abs().max()) > 0.95 * bound, m
        assert abs(float(w.std()) - bound / math.sqrt(3)) < 0.1 * bound
        assert m.bias is None or not m.bias.detach().any()
    conv = model.encoder.frontend.proj.weight.detach()  # initialized as a Linear over its flattened weight
    fan_in = conv[0].numel()
    bound = _xavier_bound(fan_in, conv.shape[0])
    assert float(conv.abs().max()) <= bound + 1e-7 and float(conv.abs().max()) > 0.9 * bound
    for norm in (m for m in model.modules() if isinstance(m, nn.LayerNorm)):
        assert bool((norm.weight == 1).all()) and not norm.bias.detach().any()
    cls = model.encoder.cls_token.detach()
    assert cls.abs().max() > 0 and 0.01 < float(cls.std()) < 0.03  # N(0, 0.02), not zeros
    assert 0.01 < float(model.decoder.mask_token.detach().std()) < 0.03


def test_init_keep_leaves_the_encoder_alone():
    torch.manual_seed(0)
    enc = builders.tiny("image", dim=64)
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    MAE(enc, decoder_dim=32, decoder_depth=1, decoder_heads=4, init="keep")
    assert all(torch.equal(before[k], v) for k, v in enc.state_dict().items())
    with pytest.raises(ValueError, match="init must be one of"):
        MAE(builders.tiny("image"), init="bert")


def test_restore_inverts_the_shuffle():
    """MAE's random_masking keeps ids_shuffle[:K] (ids_shuffle = argsort(noise)) and its decoder appends mask
    tokens and un-shuffles with ids_restore = argsort(ids_shuffle). Our keep mask + scatter must put every
    visible token, and only those, back at its own position."""
    torch.manual_seed(0)
    model = _mae("image")
    b, n, k = 3, 64, 16  # 32x32 images, 4x4 patches, mask 0.75
    noise = torch.rand(b, n, generator=torch.Generator().manual_seed(5))
    keep = random_keep((b, n), mask_ratio=0.75, generator=torch.Generator().manual_seed(5))
    ids_shuffle = noise.argsort(dim=1)
    ids_restore = ids_shuffle.argsort(dim=1)
    assert torch.equal(ids_shuffle.gather(1, ids_restore), torch.arange(n).expand(b, n))  # restore inverts
    ids_keep = ids_shuffle[:, :k]
    ref_keep = torch.zeros(b, n, dtype=torch.bool).scatter(1, ids_keep, True)
    assert torch.equal(keep, ref_keep)
    # every position carries a distinct feature; the encoder's visible tokens (ours: in sequence order)
    feats = torch.randn(b, n, model.encoder.dim)
    ours_visible = feats[keep].view(b, k, -1)
    cls = torch.randn(b, 1, model.encoder.dim)
    seen = {}
    hook = model.decoder.positions.register_forward_pre_hook(lambda mod, args: seen.update(x=args[0]))
    with torch.no_grad():
        model.decoder(torch.cat([cls, ours_visible], 1), keep, (8, 8), num_prefix=1)
    hook.remove()
    # the reference: visible tokens in shuffle order, mask tokens appended, then gathered with ids_restore
    with torch.no_grad():
        ref_visible = model.decoder.embed(feats.gather(1, ids_keep[..., None].expand(-1, -1, feats.shape[-1])))
        mask_tokens = model.decoder.mask_token.expand(b, n - k, -1)
        ref = torch.cat([ref_visible, mask_tokens], 1)
        ref = ref.gather(1, ids_restore[..., None].expand(-1, -1, ref.shape[-1]))
    torch.testing.assert_close(seen["x"], ref)


def _naive_norm_pix(img: np.ndarray, p: int) -> np.ndarray:
    """(C, H, W) -> (N, p*p*C) patches row by row, pixels in (row, col, channel) order, each normalized by its
    own mean and unbiased variance + 1e-6 (models_mae.py forward_loss)."""
    c, h, w = img.shape
    out = []
    for i in range(h // p):
        for j in range(w // p):
            patch = [img[ch, i * p + y, j * p + x] for y in range(p) for x in range(p) for ch in range(c)]
            v = np.array(patch, dtype=np.float64)
            out.append((v - v.mean()) / math.sqrt(v.var(ddof=1) + 1e-6))
    return np.stack(out)


def test_norm_pix_targets_match_a_naive_reference():
    torch.manual_seed(0)
    model = _mae("image")
    x = torch.randn(2, 3, 32, 32)
    target, _, _ = model.targets(x)
    for i in range(2):
        np.testing.assert_allclose(target[i].double().numpy(), _naive_norm_pix(x[i].double().numpy(), 4),
                                   rtol=1e-4, atol=1e-4)
    raw = _mae("image", norm_pix_loss=False).targets(x)[0]
    assert torch.equal(raw, model.encoder.frontend.patchify(x))


def test_audio_targets_are_time_major_log_mel_patches():
    torch.manual_seed(0)
    model = _mae("audio")
    front = model.encoder.frontend  # 64 mels, patches of 4 frames x 16 bins
    x = torch.randn(2, 16_000)
    spec = front.spectrogram(x)  # (B, frames, 64)
    target, _, _ = model.targets(x)
    t = spec.shape[1] // 4
    assert target.shape == (2, t * 4, 64)
    for tp, fp in [(0, 0), (0, 3), (5, 1), (t - 1, 2)]:
        block = spec[1, tp * 4:(tp + 1) * 4, fp * 16:(fp + 1) * 16].reshape(-1).double()
        ref = (block - block.mean()) / (block.var() + 1e-6).sqrt()
        torch.testing.assert_close(target[1, tp * 4 + fp].double(), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("modality", ["image", "audio"])
def test_loss_covers_removed_patches_only(modality):
    torch.manual_seed(0)
    model = _mae(modality)
    x = torch.randn(2, 3, 32, 32) if modality == "image" else torch.randn(2, 16_000)
    batch = Batch({modality: x})
    pred, target, _, _, removed, _ = model.forward_masked(batch, torch.Generator().manual_seed(3))
    pred.retain_grad()
    from omnissl.ssl.losses import masked_mse
    loss_sum, count = masked_mse(pred, target, removed)
    (loss_sum / count).backward()
    per_patch_grad = pred.grad.abs().sum(-1)
    assert bool((per_patch_grad[~removed] == 0).all())  # kept patches get no gradient
    assert bool((per_patch_grad[removed] > 0).all())
    # naive: the mean over removed patches of each patch's mean squared error
    naive = np.mean([float(((pred[b, i] - target[b, i]) ** 2).mean().detach())
                     for b in range(2) for i in range(pred.shape[1]) if removed[b, i]])
    assert math.isclose(float(loss_sum / count), naive, rel_tol=1e-5)
    assert int(removed.sum()) == 2 * (pred.shape[1] - int(pred.shape[1] * (1 - model.mask_ratio)))
    # and the objective's step computes that loss: step() with the same mask gives the same value
    model.generator = lambda device=None: torch.Generator().manual_seed(3)
    assert math.isclose(float(model.step(batch).loss), naive, rel_tol=1e-5)


def test_reconstruct_returns_pictures_with_the_removed_patches_blank():
    torch.manual_seed(0)
    model = _mae("image")
    model.train()
    x = torch.randn(2, 3, 32, 32)
    pics = model.reconstruct(Batch({"image": x}))
    assert model.training  # mode restored
    assert pics["input"].shape == pics["masked"].shape == pics["reconstruction"].shape == x.shape
    torch.testing.assert_close(pics["input"], x, rtol=1e-4, atol=1e-4)  # norm-pix undone: the input again
    removed = pics["removed"]
    blank = torch.isnan(model.encoder.frontend.patchify(pics["masked"])).all(-1)
    assert torch.equal(blank, removed)
    # visible patches of the reconstruction are the input's; removed ones are predictions
    rec = model.encoder.frontend.patchify(pics["reconstruction"])
    torch.testing.assert_close(rec[~removed], model.encoder.frontend.patchify(x)[~removed], rtol=1e-4, atol=1e-4)
    assert not torch.isnan(rec).any()
    again = model.reconstruct(Batch({"image": x}))
    assert torch.equal(again["removed"], removed)  # the same fixed mask every call
    spec = _mae("audio").reconstruct(Batch({"audio": torch.randn(2, 16_000)}))
    assert spec["input"].dim() == 3 and spec["input"].shape[2] == 64
