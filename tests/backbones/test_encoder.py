"""Contract tests over every builder, and the semantics of mask= / keep= / layers / layerdrop."""

import pytest
import torch

from omnissl.backbones import builders
from omnissl.backbones.protocol import Backbone, BackboneOutput, Tokens
from omnissl.backbones.timm_adapter import TimmViT


def _input(modality: str, b: int = 2):
    if modality in ("audio", "spectrogram"):
        return torch.randn(b, 8000), torch.tensor([8000, 6000][:b])
    if modality == "text":
        x = torch.randint(4, 1000, (b, 24))
        x[1, 20:] = 1
        return x, torch.tensor([24, 20][:b])
    return torch.randn(b, 3, 32, 32), None


TINY = ["audio", "spectrogram", "text", "image"]


@pytest.mark.parametrize("modality", TINY)
def test_tiny_contract(modality):
    enc = builders.tiny(modality).eval()
    assert isinstance(enc, Backbone)
    x, lengths = _input(modality)
    tok = enc.embed(x, lengths)
    assert isinstance(tok, Tokens) and tok.x.shape[-1] == enc.dim
    out = enc.encode(tok, return_layers=True)
    assert isinstance(out, BackboneOutput)
    assert len(out.layers) == enc.num_layers + 1
    assert all(h.shape == out.last.shape for h in out.layers)
    assert out.last.shape[1] == tok.x.shape[1] + enc.num_prefix
    assert torch.isfinite(out.last).all()
    if modality in ("audio", "text"):
        assert tok.padding_mask is not None and tok.padding_mask[1].any() and not tok.padding_mask[0].any()


@pytest.mark.parametrize(
    "build,modality,expect",
    [
        (builders.audio_base, "audio", (768, 12, 320)),
        (builders.audio_large, "audio", (1024, 24, 320)),
        (builders.text_base, "text", (768, 12, None)),
        (builders.vit_base16, "image", (768, 12, None)),
        (builders.audio_patch_base, "spectrogram", (768, 12, 160 * 16)),
    ],
)
def test_published_sizes(build, modality, expect):
    enc = build().eval()
    assert (enc.dim, enc.num_layers, enc.samples_per_token) == expect
    n_params = sum(p.numel() for p in enc.parameters())
    # wav2vec 2.0 BASE 95 M, LARGE 317 M, RoBERTa-base 125 M, ViT-B 86 M (papers' tables)
    published = {builders.audio_base: 95e6, builders.audio_large: 317e6, builders.text_base: 125e6,
                 builders.vit_base16: 86e6, builders.audio_patch_base: 86e6}[build]
    assert abs(n_params - published) / published < 0.05, n_params
    if modality == "image":
        x, lengths = torch.randn(1, 3, 64, 64), None
    elif modality == "text":
        x, lengths = torch.randint(4, 1000, (1, 16)), None
    else:
        x, lengths = torch.randn(1, 6400), None
    with torch.no_grad():
        out = enc(x, lengths)
    assert out.last.shape[-1] == expect[0] and len(out.layers) == expect[1] + 1


def test_mask_replaces_tokens_by_mask_embedding_before_positions():
    enc = builders.tiny("text").eval()
    x, lengths = _input("text")
    tok = enc.embed(x, lengths)
    mask = torch.zeros(tok.x.shape[:2], dtype=torch.bool)
    mask[:, 3:7] = True
    masked = enc.encode(tok, mask=mask).last
    manual = tok._replace(x=torch.where(mask[..., None], enc.mask_emb, tok.x))
    assert torch.equal(masked, enc.encode(manual).last)
    # positions are still added at masked positions: two masked tokens get different outputs
    assert not torch.allclose(masked[0, 3], masked[0, 4])


@pytest.mark.parametrize("modality", ["text", "image"])
def test_keep_runs_only_kept_tokens_with_their_positions(modality):
    enc = builders.tiny(modality).eval()
    x, _ = _input(modality)
    tok = enc.embed(x)
    b, n, _ = tok.x.shape
    keep = torch.zeros(b, n, dtype=torch.bool)
    keep[0, [1, 5, 9]] = True
    keep[1, [0, 2, 3]] = True
    out = enc.encode(tok, keep=keep)
    assert out.last.shape == (b, 3 + enc.num_prefix, enc.dim)
    # reference: add positions to the full sequence, gather, then run the trunk
    full = enc.positions(tok.x, None, tok.grid)
    gathered = torch.stack([full[i][keep[i]] for i in range(b)])
    if enc.cls_token is not None:
        gathered = torch.cat([enc.cls_token.expand(b, -1, -1), gathered], 1)
    ref, _, _ = enc.trunk(gathered, None)
    torch.testing.assert_close(out.last, ref)


def test_keep_with_relative_positions_sees_dropped_tokens_as_zeros():
    enc = builders.tiny("audio").eval()
    x, _ = torch.randn(1, 8000), None
    tok = enc.embed(x)
    n = tok.x.shape[1]
    keep = torch.zeros(1, n, dtype=torch.bool)
    keep[0, ::2] = True
    a = enc.encode(tok, keep=keep).last
    changed = tok._replace(x=torch.where(keep[..., None], tok.x, torch.randn_like(tok.x)))
    assert torch.equal(a, enc.encode(changed, keep=keep).last)  # dropped content never leaks


def test_shape_errors_name_expected_and_given():
    enc = builders.tiny("text")
    tok = enc.embed(torch.randint(4, 100, (2, 10)))
    with pytest.raises(ValueError, match=r"mask must be a bool tensor of shape \(2, 10\), got \(2, 9\)"):
        enc.encode(tok, mask=torch.zeros(2, 9, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"keep must be a bool tensor of shape \(2, 10\)"):
        enc.encode(tok, keep=torch.zeros(2, 10))
    uneven = torch.zeros(2, 10, dtype=torch.bool)
    uneven[0, :3] = True
    uneven[1, :4] = True
    with pytest.raises(ValueError, match=r"same number of tokens in every row, got \[3, 4\]"):
        enc.encode(tok, keep=uneven)
    with pytest.raises(ValueError, match=r"lengths must have shape \(2,\), got \(3,\)"):
        enc.embed(torch.randint(4, 100, (2, 10)), torch.tensor([1, 2, 3]))
    audio = builders.tiny("audio")
    with pytest.raises(ValueError, match="shorter than the receptive field"):
        audio.embed(torch.randn(2, 300))


def test_layerdrop_same_for_a_step_and_keeps_layer_count():
    enc = builders.tiny("text", depth=8, layerdrop=0.5).train()
    trunk = enc.trunk
    trunk.set_num_updates(7)
    a = trunk.dropped_layers()
    twin = builders.tiny("text", depth=8, layerdrop=0.5).trunk.train()  # another "rank"
    twin.set_num_updates(7)
    assert torch.equal(a, twin.dropped_layers()) and a.any()
    patterns = set()
    for step in range(20):
        trunk.set_num_updates(step)
        patterns.add(tuple(trunk.dropped_layers().tolist()))
    assert len(patterns) > 5
    out = enc.encode(enc.embed(torch.randint(4, 100, (2, 10))), return_layers=True)
    assert len(out.layers) == 9
    assert not enc.eval().trunk.dropped_layers().any()


def test_activation_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    enc = builders.tiny("text")
    x = torch.randint(4, 100, (2, 12))
    enc.train()
    enc.encode(enc.embed(x)).last.pow(2).sum().backward()
    ref = [p.grad.clone() for p in enc.parameters() if p.grad is not None]
    enc.zero_grad()
    enc.trunk.checkpoint_activations = True
    enc.encode(enc.embed(x)).last.pow(2).sum().backward()
    got = [p.grad for p in enc.parameters() if p.grad is not None]
    for r, g in zip(ref, got):
        torch.testing.assert_close(r, g)


def test_ffn_outputs_are_pre_residual():
    enc = builders.tiny("text").eval()
    tok = enc.embed(torch.randint(4, 100, (1, 8)))
    out = enc.encode(tok, return_layers="ffn")
    block = enc.trunk.blocks[0]
    x0 = out.layers[0]
    h = block.norm1(x0 + block.attn(x0, None))
    torch.testing.assert_close(out.ffn[0], block.ffn(h))
    torch.testing.assert_close(out.layers[1], block.norm2(h + out.ffn[0]))


def test_grad_scale_scales_frontend_gradient_only():
    enc = builders.tiny("audio")
    x = torch.randn(1, 4000)
    grads = []
    for scale in (1.0, 0.1):
        enc.zero_grad()
        enc.encode(enc.embed(x, grad_scale=scale)).last.sum().backward()
        grads.append((enc.frontend.convs[0].weight.grad.clone(), enc.feature_norm.weight.grad.clone()))
    torch.testing.assert_close(grads[1][0], 0.1 * grads[0][0])
    torch.testing.assert_close(grads[1][1], grads[0][1])


def test_timm_vit_behind_the_protocol():
    vit = TimmViT("vit_tiny_patch16_224", img_size=32, patch_size=16).eval()
    x = torch.randn(2, 3, 32, 32)
    tok = vit.embed(x)
    assert tok.x.shape == (2, 4, vit.dim)
    full = vit.encode(tok, return_layers=True)
    assert len(full.layers) == vit.num_layers + 1 and full.last.shape == (2, 5, vit.dim)
    torch.testing.assert_close(full.last[:, 0], vit.vit.forward_features(x)[:, 0])
    keep = torch.tensor([[True, False, True, False], [False, True, True, False]])
    assert vit.encode(tok, keep=keep).last.shape == (2, 3, vit.dim)


@pytest.mark.parametrize("modality", ["spectrogram", "image"])
def test_patch_dim_is_the_width_of_patchify(modality):
    """MAE sizes its decoder output by `frontend.patch_dim`: it must be what `patchify` returns per patch."""
    frontend = builders.tiny(modality).frontend
    x, _ = _input(modality)
    assert frontend.patchify(x).shape[-1] == frontend.patch_dim
