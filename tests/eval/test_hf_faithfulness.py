"""Imported Hugging Face models reproduce HF's hidden states at every layer (omnissl/eval/export.py).

Small random-weight HF models built from configs (nothing is downloaded), every parameter perturbed away
from HF's init (unit LayerNorm weights, zero biases would hide a swapped norm or a dropped bias), eval mode,
fp32. Outputs are compared at real (non-padded) positions to <= 1e-5 max abs difference.
"""

from __future__ import annotations

import os
import re

import pytest
import torch
from torch import Tensor, nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from omnissl.eval.hf.roberta import encoder_from_hf_roberta  # noqa: E402
from omnissl.eval.hf.wav2vec2 import encoder_from_hf_wav2vec2  # noqa: E402

ATOL = 1e-5


def _perturb(model: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def _assert_close(ours: Tensor, ref: Tensor, what: str) -> None:
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    diff = (ours - ref).abs().max().item()
    assert diff <= ATOL, f"{what}: max abs difference {diff:.3g} > {ATOL}"


# ---------------------------------------------------------------------------------------------------------
# RoBERTa


def _roberta_config(**overrides):
    # layer_norm_eps stays at HF's default 1e-12 (roberta-base ships 1e-5) to check that eps is carried over.
    kw = dict(vocab_size=200, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=128,
              max_position_embeddings=80, type_vocab_size=1)
    kw.update(overrides)
    return transformers.RobertaConfig(**kw)


@pytest.fixture(scope="module")
def roberta():
    torch.manual_seed(0)
    hf = _perturb(transformers.RobertaModel(_roberta_config()), seed=1)
    return hf, encoder_from_hf_roberta(hf).eval()


def test_roberta_every_layer_matches_hf_with_right_padding(roberta):
    hf, ours = roberta
    pad = hf.config.pad_token_id
    n = ours.positions.max_len  # one row uses every learned position
    assert n == hf.config.max_position_embeddings - pad - 1
    lengths = torch.tensor([n, 41, 6])
    valid = torch.arange(n)[None] < lengths[:, None]
    ids = torch.randint(3, hf.config.vocab_size, (3, n), generator=torch.Generator().manual_seed(2))
    ids[~valid] = pad
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=valid.long(), output_hidden_states=True)
        out = ours.encode(ours.embed(ids), return_layers=True)
    assert torch.equal(out.padding_mask, ~valid)
    assert len(out.layers) == len(ref.hidden_states) == hf.config.num_hidden_layers + 1
    for i, (mine, theirs) in enumerate(zip(out.layers, ref.hidden_states)):
        _assert_close(mine[valid], theirs[valid], f"layer {i}")
    _assert_close(out.last[valid], ref.last_hidden_state[valid], "last")


def test_roberta_import_copies_everything(roberta):
    hf, ours = roberta
    cfg, d = hf.config, hf.config.hidden_size
    # Everything but the pooler, the token-type table (folded into positions) and positions 0..pad (unused).
    expected = sum(p.numel() for p in hf.parameters()) - sum(p.numel() for p in hf.pooler.parameters())
    expected -= cfg.type_vocab_size * d + (cfg.pad_token_id + 1) * d
    assert sum(p.numel() for p in ours.parameters()) == expected + d  # + our (unused) mask embedding
    norms = [m for m in ours.modules() if isinstance(m, nn.LayerNorm)]
    assert len(norms) == 2 * cfg.num_hidden_layers + 1 and all(m.eps == cfg.layer_norm_eps for m in norms)
    assert ours.trunk.drop.p == cfg.hidden_dropout_prob
    assert ours.trunk.blocks[0].attn.dropout == cfg.attention_probs_dropout_prob


@pytest.mark.parametrize(
    "option, value",
    [("hidden_act", "relu"), ("is_decoder", True), ("position_embedding_type", "relative_key")],
)
def test_roberta_rejects_what_we_cannot_represent(option, value):
    hf = transformers.RobertaModel(_roberta_config(num_hidden_layers=1, **{option: value}))
    with pytest.raises(ValueError, match=option):
        encoder_from_hf_roberta(hf)


# ---------------------------------------------------------------------------------------------------------
# wav2vec 2.0 / HuBERT


def _wav2vec2_config(stable: bool, cls=None, **overrides):
    cls = cls or transformers.Wav2Vec2Config
    kw = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
              conv_dim=(32,) * 7, conv_kernel=(10, 3, 3, 3, 3, 2, 2), conv_stride=(5, 2, 2, 2, 2, 2, 2),
              num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4, do_stable_layer_norm=stable,
              feat_extract_norm="layer" if stable else "group", conv_bias=stable,
              layer_norm_eps=1e-4)  # not the 1e-5 our LayerNorms default to, to check that eps is carried over
    kw.update(overrides)
    return cls(**kw)


def _hf_layers(ref) -> list[Tensor]:
    """HF's hidden_states in our convention: for a pre-LN trunk the last entry is after the final LayerNorm
    (HF records the last block's output before it and returns the normed one as last_hidden_state)."""
    return list(ref.hidden_states[:-1]) + [ref.last_hidden_state]


@pytest.fixture(scope="module", params=[False, True], ids=["post_ln_group", "pre_ln_layer"])
def wav2vec2(request):
    torch.manual_seed(0)
    hf = _perturb(transformers.Wav2Vec2Model(_wav2vec2_config(request.param)), seed=3)
    return hf, encoder_from_hf_wav2vec2(hf).eval()


def _audio(lengths: list[int], seed: int) -> tuple[Tensor, Tensor]:
    """Right-padded batch with *noise* in the padding, so anything that reads past a length shows up."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(lengths), max(lengths), generator=g)
    return x, torch.tensor(lengths)


def _assert_masked_batch_matches(hf, ours: Encoder, x: Tensor, spans: list[tuple[int, int, int]]):
    """Ours and HF on the unpadded batch `x` with the same frames masked (`spans`: (row, start, end)): the features
    and every layer agree. Returns (our tokens, our output, HF's output) for further checks."""
    with torch.no_grad():
        tokens = ours.embed(x)
        mask = torch.zeros(tokens.x.shape[:2], dtype=torch.bool)
        for row, start, end in spans:
            mask[row, start:end] = True
        ref = hf(x, mask_time_indices=mask, output_hidden_states=True)
        out = ours.encode(tokens, mask=mask, return_layers=True)
    _assert_close(tokens.features, ref.extract_features, "features")
    for i, (mine, theirs) in enumerate(zip(out.layers, _hf_layers(ref), strict=True)):
        _assert_close(mine, theirs, f"layer {i}")
    return tokens, out, ref


def _assert_each_utterance_matches(hf, out, x: Tensor, lengths: Tensor) -> None:
    """Our output `out` of the padded batch `x` against HF on each utterance alone: padding mask and every layer."""
    with torch.no_grad():
        for b, t in enumerate(lengths.tolist()):
            ref = hf(x[b : b + 1, :t], output_hidden_states=True)
            n = ref.last_hidden_state.shape[1]
            assert not out.padding_mask[b, :n].any() and out.padding_mask[b, n:].all()
            for i, (mine, theirs) in enumerate(zip(out.layers, _hf_layers(ref), strict=True)):
                _assert_close(mine[b, :n], theirs[0], f"utterance {b} layer {i}")


def _assert_padded_batch_matches(hf, out, x: Tensor, lengths: Tensor) -> None:
    """Our output `out` of the padded batch `x` against HF's own padded batch (its attention_mask), on the valid
    frames of every layer."""
    sample_mask = (torch.arange(x.shape[1])[None] < lengths[:, None]).long()
    with torch.no_grad():
        ref = hf(x, attention_mask=sample_mask, output_hidden_states=True)
    valid = ~out.padding_mask
    for i, (mine, theirs) in enumerate(zip(out.layers, _hf_layers(ref), strict=True)):
        _assert_close(mine[valid], theirs[valid], f"padded layer {i}")


def test_wav2vec2_unpadded_batch_matches_hf(wav2vec2):
    hf, ours = wav2vec2
    x, _ = _audio([4800, 4800], seed=4)
    # the masked frames exercise the imported mask embedding
    tokens, out, ref = _assert_masked_batch_matches(hf, ours, x, [(0, 3, 7), (1, 10, 12)])
    assert tokens.padding_mask is None
    _assert_close(out.last, ref.last_hidden_state, "last")


def test_wav2vec2_padded_batch_matches_hf_on_each_utterance_alone(wav2vec2):
    hf, ours = wav2vec2
    x, lengths = _audio([4800, 3300, 1700], seed=5)
    with torch.no_grad():
        out = ours.encode(ours.embed(x, lengths), return_layers=True)
    _assert_each_utterance_matches(hf, out, x, lengths)


def test_wav2vec2_layer_norm_extractor_matches_hf_padded_batch():
    """With the layer-norm extractor nothing depends on the padded length, so HF's own padded batch (with its
    attention_mask) must agree with ours too (the group-norm extractor deviates on purpose, frontends.py)."""
    torch.manual_seed(0)
    hf = _perturb(transformers.Wav2Vec2Model(_wav2vec2_config(stable=True)), seed=6)
    ours = encoder_from_hf_wav2vec2(hf).eval()
    x, lengths = _audio([4800, 3300, 1700], seed=7)
    with torch.no_grad():
        out = ours.encode(ours.embed(x, lengths), return_layers=True)
    sample_mask = (torch.arange(x.shape[1])[None] < lengths[:, None]).long()
    valid = ~out.padding_mask
    assert torch.equal(valid, hf._get_feature_vector_attention_mask(valid.shape[1], sample_mask))
    _assert_padded_batch_matches(hf, out, x, lengths)


def test_wav2vec2_import_copies_everything(wav2vec2):
    hf, ours = wav2vec2
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in hf.parameters())
    assert ours.trunk.pre_norm == hf.config.do_stable_layer_norm
    assert ours.frontend.mode == hf.config.feat_extract_norm
    trunk_norms = [m for m in ours.trunk.modules() if isinstance(m, nn.LayerNorm)]
    assert all(m.eps == hf.config.layer_norm_eps for m in trunk_norms + [ours.feature_norm])


def test_hubert_without_feature_norm_matches_hf():
    torch.manual_seed(0)
    cfg = _wav2vec2_config(stable=False, cls=transformers.HubertConfig, feat_proj_layer_norm=False)
    hf = _perturb(transformers.HubertModel(cfg), seed=8)
    ours = encoder_from_hf_wav2vec2(hf).eval()
    assert isinstance(ours.feature_norm, nn.Identity)
    x, _ = _audio([4000, 4000], seed=9)
    with torch.no_grad():
        ref = hf(x, output_hidden_states=True)
        out = ours(x)
    for i, (mine, theirs) in enumerate(zip(out.layers, _hf_layers(ref), strict=True)):
        _assert_close(mine, theirs, f"layer {i}")


@pytest.mark.parametrize(
    "option, value",
    [("hidden_act", "relu"), ("feat_extract_activation", "relu"), ("add_adapter", True)],
)
def test_wav2vec2_rejects_what_we_cannot_represent(option, value):
    hf = transformers.Wav2Vec2Model(_wav2vec2_config(stable=False, num_hidden_layers=1, **{option: value}))
    with pytest.raises(ValueError, match=option):
        encoder_from_hf_wav2vec2(hf)


# ---------------------------------------------------------------------------------------------------------
# Export (ours -> HF): every family is saved with save_pretrained, loaded back offline with from_pretrained,
# and must reproduce our hidden states; weights survive ours -> HF -> ours and HF -> ours -> HF.

from omnissl.backbones.builders import tiny  # noqa: E402
from omnissl.backbones.encoder import Encoder  # noqa: E402
from omnissl.backbones.frontends import ConvFeatureExtractor  # noqa: E402
from omnissl.backbones.transformer import ConvPositions, SinCosPositions, Transformer  # noqa: E402
from omnissl.eval.hf import encoder_from_hf, encoder_to_hf  # noqa: E402
from omnissl.eval.hf.roberta import encoder_to_hf_roberta, lm_head_from_hf_roberta  # noqa: E402
from omnissl.eval.hf.vit import encoder_from_hf_vit, encoder_to_hf_vit  # noqa: E402
from omnissl.eval.hf.wav2vec2 import encoder_to_hf_wav2vec2, wav2vec2_heads_from_hf  # noqa: E402
from omnissl.ssl.heads import MaskedLMHead  # noqa: E402
from omnissl.ssl.quantizer import GumbelQuantizer  # noqa: E402

CONV = ((32, 10, 5),) + ((32, 3, 2),) * 4 + ((32, 2, 2),) * 2


def _reload(model, tmp_path, cls=None):
    """save_pretrained, then from_pretrained offline (what a user of the exported directory does)."""
    model.save_pretrained(tmp_path / "hf")
    return (cls or type(model)).from_pretrained(tmp_path / "hf", local_files_only=True).eval()


def _assert_state_equal(a: dict, b: dict, skip: tuple[str, ...] = ()) -> None:
    keys = {k for k in a if not k.startswith(skip)}
    assert keys == {k for k in b if not k.startswith(skip)}, set(a) ^ set(b)
    for k in sorted(keys):
        assert torch.equal(a[k], b[k]), k


def _our_audio(stable: bool, *, feature_norm: bool = True, dim: int = 48) -> Encoder:
    trunk = Transformer(dim=dim, depth=2, heads=4, ffn_dim=96, pre_norm=stable, dropout=0.1, attn_dropout=0.05,
                        act_dropout=0.02, layerdrop=0.1, eps=1e-4)  # eps and dropouts must reach the HF config
    enc = Encoder(ConvFeatureExtractor(layers=CONV, mode="layer" if stable else "group", bias=stable), trunk,
                  positions=ConvPositions(dim, kernel=16, groups=4), feature_norm=feature_norm,
                  feature_norm_eps=1e-4, dropout_input=0.07)
    return _perturb(enc, seed=11)


@pytest.mark.parametrize("stable", [False, True], ids=["post_ln_group", "pre_ln_layer"])
def test_wav2vec2_export_loads_offline_and_matches(stable, tmp_path):
    ours = _our_audio(stable).eval()
    hf = _reload(encoder_to_hf_wav2vec2(ours), tmp_path, transformers.Wav2Vec2Model)
    cfg = hf.config
    assert (cfg.do_stable_layer_norm, cfg.feat_extract_norm, cfg.conv_bias) == (stable, ours.frontend.mode, stable)
    assert (cfg.layer_norm_eps, cfg.hidden_dropout, cfg.attention_dropout, cfg.activation_dropout, cfg.layerdrop,
            cfg.feat_proj_dropout) == (1e-4, 0.1, 0.05, 0.02, 0.1, 0.07)
    x, _ = _audio([4800, 4800], seed=20)
    _assert_masked_batch_matches(hf, ours, x, [(0, 2, 6), (1, 9, 11)])  # the exported masked_spec_embed is ours

    x, lengths = _audio([4800, 3300, 1700], seed=21)
    with torch.no_grad():
        out = ours.encode(ours.embed(x, lengths), return_layers=True)
    if stable:  # nothing depends on the padded length: HF's own padded batch must agree
        _assert_padded_batch_matches(hf, out, x, lengths)
    else:  # group norm over valid frames (frontends.py NOTE(ref)): HF on each utterance alone
        _assert_each_utterance_matches(hf, out, x, lengths)
    _assert_state_equal(encoder_from_hf_wav2vec2(hf).state_dict(), ours.state_dict())


def test_wav2vec2_import_export_round_trip_is_lossless(wav2vec2):
    hf, ours = wav2vec2
    _assert_state_equal(encoder_to_hf_wav2vec2(ours).state_dict(), hf.state_dict())


def test_audio_encoder_without_projection_exports_an_exact_identity(tmp_path):
    ours = _perturb(tiny("audio", dim=64), seed=12).eval()  # conv width 64 == trunk width: no projection
    assert isinstance(ours.proj, nn.Identity)
    hf = _reload(encoder_to_hf_wav2vec2(ours), tmp_path)
    x, _ = _audio([4000, 4000], seed=22)
    with torch.no_grad():
        out, ref = ours(x), hf(x, output_hidden_states=True)
    for i, (mine, theirs) in enumerate(zip(out.layers, ref.hidden_states, strict=True)):
        _assert_close(mine, theirs, f"layer {i}")


def _our_wav2vec2_heads(enc: Encoder) -> dict[str, nn.Module]:
    q = GumbelQuantizer(in_dim=enc.frontend.out_dim, vq_dim=24, groups=2, entries=10)
    q.temperature = 1.25
    heads = {"quantizer": q, "project_q": nn.Linear(24, 20), "final_proj": nn.Linear(enc.dim, 20)}
    return {k: _perturb(m, seed=13 + i) for i, (k, m) in enumerate(heads.items())}


def test_wav2vec2_pretraining_export_matches_our_heads(tmp_path):
    ours = _our_audio(False).eval()
    heads = _our_wav2vec2_heads(ours)
    hf = encoder_to_hf_wav2vec2(ours, heads=heads, extra_config={"num_negatives": 7, "feat_quantizer_dropout": 0.0})
    hf = _reload(hf, tmp_path, transformers.Wav2Vec2ForPreTraining)
    assert (hf.config.omnissl_gumbel_temperature, hf.config.num_negatives) == (1.25, 7)
    assert (hf.config.num_codevector_groups, hf.config.num_codevectors_per_group, hf.config.codevector_dim,
            hf.config.proj_codevector_dim) == (2, 10, 24, 20)
    x, _ = _audio([4800, 4800], seed=23)
    with torch.no_grad():
        ref = hf(x)
        tokens = ours.embed(x)
        out = ours.encode(tokens)
        q = heads["quantizer"].eval()(tokens.features)  # eval: argmax codes, as HF in eval mode
        _assert_close(heads["final_proj"](out.last), ref.projected_states, "project_hid")
        _assert_close(heads["project_q"](q.quantized), ref.projected_quantized_states, "project_q(quantized)")
    back = wav2vec2_heads_from_hf(hf)
    assert back["quantizer"].temperature == 1.25
    for name, module in heads.items():
        _assert_state_equal(back[name].state_dict(), module.state_dict())
    # and HF -> ours -> HF is lossless, heads included
    again = encoder_to_hf_wav2vec2(encoder_from_hf_wav2vec2(hf), heads=back)
    _assert_state_equal(again.state_dict(), hf.state_dict())


@pytest.mark.parametrize("feature_norm", [False, True])
def test_hubert_export_matches(feature_norm, tmp_path):
    ours = _our_audio(False, feature_norm=feature_norm).eval()
    hf = _reload(encoder_to_hf_wav2vec2(ours, hubert=True), tmp_path, transformers.HubertModel)
    assert hf.config.feat_proj_layer_norm is feature_norm
    x, _ = _audio([4000, 4000], seed=24)
    with torch.no_grad():
        out, ref = ours(x), hf(x, output_hidden_states=True)
    for i, (mine, theirs) in enumerate(zip(out.layers, _hf_layers(ref), strict=True)):
        _assert_close(mine, theirs, f"layer {i}")
    _assert_state_equal(encoder_from_hf_wav2vec2(hf).state_dict(), ours.state_dict())


def _our_text() -> tuple[Encoder, MaskedLMHead]:
    enc = tiny("text", vocab_size=200, dim=48, heads=4, dropout=0.1)
    head = MaskedLMHead(dim=48, vocab_size=200)
    return _perturb(enc, seed=14).eval(), _perturb(head, seed=15).eval()


def test_roberta_masked_lm_export_matches_with_right_padding(tmp_path):
    ours, head = _our_text()
    hf = _reload(encoder_to_hf_roberta(ours, lm_head=head), tmp_path, transformers.RobertaForMaskedLM)
    assert hf.config.max_position_embeddings == ours.positions.max_len + hf.config.pad_token_id + 1
    lengths = torch.tensor([30, 17, 5])
    valid = torch.arange(30)[None] < lengths[:, None]
    ids = torch.randint(3, 200, (3, 30), generator=torch.Generator().manual_seed(25))
    ids[~valid] = ours.frontend.pad_id
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=valid.long(), output_hidden_states=True)
        out = ours(ids)
        logits = head(out.last, ours.frontend.embed.weight)
    for i, (mine, theirs) in enumerate(zip(out.layers, ref.hidden_states, strict=True)):
        _assert_close(mine[valid], theirs[valid], f"layer {i}")
    _assert_close(logits[valid], ref.logits[valid], "MLM logits")
    # our mask_emb has no RoBERTa counterpart (RoBERTa masks with a <mask> token id)
    _assert_state_equal(encoder_from_hf_roberta(hf).state_dict(), ours.state_dict(), skip=("mask_emb",))
    _assert_state_equal(lm_head_from_hf_roberta(hf).state_dict(), head.state_dict())


def test_roberta_import_export_round_trip_keeps_all_but_the_folded_rows(roberta):
    hf, ours = roberta
    again = encoder_to_hf_roberta(ours)
    emb = "embeddings.position_embeddings", "embeddings.token_type_embeddings"
    _assert_state_equal(again.state_dict(), hf.state_dict(), skip=emb + ("pooler.",))
    pad = hf.config.pad_token_id
    folded = hf.embeddings.position_embeddings.weight[pad + 1 :] + hf.embeddings.token_type_embeddings.weight[0]
    assert torch.equal(again.embeddings.position_embeddings.weight[pad + 1 :], folded)


def test_roberta_masked_lm_import_refuses_an_untied_decoder():
    hf = transformers.RobertaForMaskedLM(_roberta_config(num_hidden_layers=1, tie_word_embeddings=False))
    with torch.no_grad():
        hf.lm_head.decoder.weight.add_(1.0)
    with pytest.raises(ValueError, match="tie_word_embeddings"):
        lm_head_from_hf_roberta(hf)


def _our_image(**kw) -> Encoder:
    return _perturb(tiny("image", pre_norm=True, dim=48, heads=4, **kw), seed=16).eval()


def test_vit_export_matches_on_a_non_square_image(tmp_path):
    ours = _our_image()
    hf = _reload(encoder_to_hf_vit(ours, image_size=(16, 24)), tmp_path, transformers.ViTModel)
    x = torch.randn(2, 3, 16, 24, generator=torch.Generator().manual_seed(26))
    with torch.no_grad():
        out, ref = ours(x), hf(x, output_hidden_states=True)
    for i, (mine, theirs) in enumerate(zip(out.layers, _hf_layers(ref), strict=True)):
        _assert_close(mine, theirs, f"layer {i}")
    back = encoder_from_hf_vit(hf)
    assert isinstance(back.positions, SinCosPositions) and not back.positions.cols_first
    _assert_state_equal(back.state_dict(), ours.state_dict(), skip=("mask_emb",))  # ViTModel has no mask token


def test_vitmae_export_matches_with_identity_noise(tmp_path):
    ours = _our_image()
    hf = _reload(encoder_to_hf_vit(ours, image_size=16, mae=True), tmp_path, transformers.ViTMAEModel)
    assert hf.config.mask_ratio == 0.0
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(27))
    with torch.no_grad():
        out = ours(x)
        ref = hf(x, noise=torch.arange(16.0).expand(2, -1), output_hidden_states=True)
        shuffled = hf(x, output_hidden_states=True)  # without noise HF permutes the tokens at random
    for i, (mine, theirs) in enumerate(zip(out.layers, _hf_layers(ref), strict=True)):
        _assert_close(mine, theirs, f"layer {i}")
    assert not torch.allclose(out.last, shuffled.last_hidden_state, atol=1e-3)
    _assert_state_equal(encoder_from_hf_vit(hf).state_dict(), ours.state_dict(), skip=("mask_emb",))


@pytest.mark.parametrize("mae", [False, True], ids=["vit", "vitmae"])
def test_vit_import_matches_hf(mae, tmp_path):
    kw = dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96, image_size=16,
              patch_size=4, layer_norm_eps=1e-7)
    if mae:
        hf = _perturb(transformers.ViTMAEModel(transformers.ViTMAEConfig(mask_ratio=0.0, **kw)), seed=17)
    else:
        hf = _perturb(transformers.ViTModel(transformers.ViTConfig(**kw), add_pooling_layer=False), seed=17)
    ours = encoder_from_hf_vit(hf).eval()
    # perturbed tables are not sin-cos: learned, frozen where HF froze them (ViTMAE)
    assert ours.positions.grid == (4, 4) and ours.positions.weight.requires_grad is not mae
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(28))
    with torch.no_grad():
        ref = hf(x, output_hidden_states=True, **({"noise": torch.arange(16.0).expand(2, -1)} if mae else {}))
        out = ours(x)
    for i, (mine, theirs) in enumerate(zip(out.layers, _hf_layers(ref), strict=True)):
        _assert_close(mine, theirs, f"layer {i}")
    again = encoder_to_hf_vit(ours, image_size=16, mae=mae).state_dict()
    # the perturbed CLS row of the table is folded into our cls_token (for an unperturbed ViTMAE it is zero)
    cls = "embeddings.cls_token", "embeddings.position_embeddings"
    _assert_state_equal(again, hf.state_dict(), skip=cls)
    table = hf.embeddings.position_embeddings
    assert torch.equal(again["embeddings.position_embeddings"][0, 1:], table[0, 1:])
    assert torch.equal(again["embeddings.cls_token"], hf.embeddings.cls_token + table[:, :1])


def test_vitmae_sincos_table_imports_as_fixed_sincos_and_round_trips(tmp_path):
    """A ViTMAE whose table is HF's own sin-cos init (MAE's column-first layout) becomes
    SinCosPositions(cols_first=True), and HF -> ours -> HF is lossless."""
    cfg = transformers.ViTMAEConfig(hidden_size=48, num_hidden_layers=1, num_attention_heads=4,
                                    intermediate_size=96, image_size=16, patch_size=4, mask_ratio=0.0)
    hf = transformers.ViTMAEModel(cfg)
    from transformers.models.vit_mae.modeling_vit_mae import build_2d_sinusoidal_position_embedding

    # HF's ViTMAEEmbeddings.initialize_weights: its sin-cos table with the halves rotated (MAE's layout). A
    # fresh transformers 5.24 model leaves the table at zeros, so it is written here as released checkpoints
    # hold it.
    table = build_2d_sinusoidal_position_embedding(height=4, width=4, embed_dim=48, cls_token=True)
    table = torch.cat([table[..., 24:], table[..., :24]], dim=-1)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name == "embeddings.position_embeddings":
                p.copy_(table[None])
            else:
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(29)))
    hf = _reload(hf, tmp_path).eval()
    ours = encoder_from_hf(str(tmp_path / "hf")).eval()  # the recipe entry point, through AutoModel
    assert isinstance(ours.positions, SinCosPositions) and ours.positions.cols_first
    _assert_state_equal(encoder_to_hf_vit(ours, image_size=16, mae=True).state_dict(), hf.state_dict())


def test_encoder_from_hf_needs_a_local_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a local transformers model directory"):
        encoder_from_hf(str(tmp_path / "facebook/wav2vec2-base"))


def _with(enc: Encoder, **changes) -> Encoder:
    for path, value in changes.items():
        obj = enc
        *parents, leaf = path.split("__")
        for p in parents:
            obj = getattr(obj, p)
        setattr(obj, leaf, value)
    return enc


def _sincos_audio() -> Encoder:
    return Encoder(ConvFeatureExtractor(layers=CONV), Transformer(dim=48, depth=1, heads=4, ffn_dim=96),
                   positions=SinCosPositions(48))


@pytest.mark.parametrize(
    "make, kwargs, needle",
    [
        (lambda: tiny("spectrogram"), {}, "frontend=LogMelPatches has no Hugging Face equivalent"),
        (lambda: Encoder(ConvFeatureExtractor(layers=CONV), Transformer(dim=48, depth=1, heads=4, ffn_dim=96),
                         positions=ConvPositions(48, kernel=16, groups=4), cls_token=True), {}, "cls_token=True"),
        (_sincos_audio, {}, "positions='SinCosPositions'"),
        (lambda: _our_audio(False, feature_norm=False), {}, "feature_norm=False"),
        (lambda: Encoder(ConvFeatureExtractor(layers=CONV), Transformer(dim=48, depth=1, heads=4, ffn_dim=96),
                         positions=ConvPositions(48, kernel=16, groups=4), feature_norm_eps=1e-6), {},
         "feature_norm_eps=1e-06"),
        (lambda: _our_audio(False), {"hubert": True, "heads": {"final_proj": nn.Linear(48, 4)}}, "heads"),
        (lambda: tiny("text"), {"image_size": 16}, "image_size=16 only applies to ImagePatches"),
        (lambda: tiny("text"), {"hubert": True}, "hubert=True only applies to ConvFeatureExtractor"),
        (lambda: tiny("text", pre_norm=True), {}, "trunk pre_norm=True"),
        (lambda: _with(tiny("text"), trunk__blocks__0__act_drop=nn.Dropout(0.1)), {}, "trunk act_dropout=0.1"),
        (lambda: tiny("text", layerdrop=0.1), {}, "trunk layerdrop=0.1"),
        (lambda: Encoder(tiny("text").frontend, Transformer(dim=64, depth=1, heads=4, ffn_dim=96),
                         positions=SinCosPositions(64), feature_norm=False), {}, "positions='SinCosPositions'"),
        (lambda: Encoder(tiny("text").frontend, Transformer(dim=64, depth=1, heads=4, ffn_dim=96),
                         positions=tiny("text").positions, feature_norm=True), {}, "feature_norm=True"),
        (lambda: tiny("text"), {"heads": {"lm_head": MaskedLMHead(dim=64, vocab_size=1024, eps=1e-6)}},
         "lm_head eps=1e-06"),
        (lambda: tiny("image"), {"image_size": 16}, "trunk pre_norm=False"),
        (lambda: tiny("image", pre_norm=True), {}, "image_size is required"),
        (lambda: tiny("image", pre_norm=True), {"image_size": 18}, "not divisible by the patch size"),
        (lambda: tiny("image", pre_norm=True, dropout=0.1), {"image_size": 16, "mae": True}, "trunk dropout=0.1"),
        (lambda: Encoder(tiny("image").frontend, Transformer(dim=64, depth=1, heads=4, ffn_dim=96, pre_norm=True),
                         positions=ConvPositions(64, kernel=4, groups=4), feature_norm=False, cls_token=True),
         {"image_size": 16}, "positions='ConvPositions'"),
        (lambda: Encoder(tiny("image").frontend, Transformer(dim=64, depth=1, heads=4, ffn_dim=96, pre_norm=True),
                         positions=SinCosPositions(64, two_d=True), feature_norm=False), {"image_size": 16},
         "cls_token=False"),
    ],
)
def test_export_refuses_what_hf_cannot_represent(make, kwargs, needle):
    with pytest.raises(ValueError, match=re.escape(needle)):
        encoder_to_hf(make(), **kwargs)


@pytest.mark.parametrize("option, value", [("hidden_act", "relu"), ("qkv_bias", False)])
def test_vit_import_rejects_what_we_cannot_represent(option, value):
    cfg = transformers.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                                 image_size=16, patch_size=4, **{option: value})
    with pytest.raises(ValueError, match=option):
        encoder_from_hf_vit(transformers.ViTModel(cfg, add_pooling_layer=False))
