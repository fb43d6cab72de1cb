"""Imported Hugging Face models reproduce HF's hidden states at every layer (omnissl/eval/export.py).

Small random-weight HF models built from configs (nothing is downloaded), every parameter perturbed away
from HF's init (unit LayerNorm weights, zero biases would hide a swapped norm or a dropped bias), eval mode,
fp32. Outputs are compared at real (non-padded) positions to <= 1e-5 max abs difference.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch import Tensor, nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from omnissl.eval.export import encoder_from_hf_roberta, encoder_from_hf_wav2vec2  # noqa: E402

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


def test_wav2vec2_unpadded_batch_matches_hf(wav2vec2):
    hf, ours = wav2vec2
    x, _ = _audio([4800, 4800], seed=4)
    with torch.no_grad():
        tokens = ours.embed(x)
        mask = torch.zeros(tokens.x.shape[:2], dtype=torch.bool)
        mask[0, 3:7] = mask[1, 10:12] = True  # exercises the imported mask embedding
        ref = hf(x, mask_time_indices=mask, output_hidden_states=True)
        out = ours.encode(tokens, mask=mask, return_layers=True)
    assert tokens.padding_mask is None
    _assert_close(tokens.features, ref.extract_features, "features")
    for i, (mine, theirs) in enumerate(zip(out.layers, _hf_layers(ref), strict=True)):
        _assert_close(mine, theirs, f"layer {i}")
    _assert_close(out.last, ref.last_hidden_state, "last")


def test_wav2vec2_padded_batch_matches_hf_on_each_utterance_alone(wav2vec2):
    hf, ours = wav2vec2
    x, lengths = _audio([4800, 3300, 1700], seed=5)
    with torch.no_grad():
        out = ours.encode(ours.embed(x, lengths), return_layers=True)
        for b, t in enumerate(lengths.tolist()):
            ref = hf(x[b : b + 1, :t], output_hidden_states=True)
            n = ref.last_hidden_state.shape[1]
            assert not out.padding_mask[b, :n].any() and out.padding_mask[b, n:].all()
            for i, (mine, theirs) in enumerate(zip(out.layers, _hf_layers(ref), strict=True)):
                _assert_close(mine[b, :n], theirs[0], f"utterance {b} layer {i}")


def test_wav2vec2_layer_norm_extractor_matches_hf_padded_batch():
    """With the layer-norm extractor nothing depends on the padded length, so HF's own padded batch (with its
    attention_mask) must agree with ours too (the group-norm extractor deviates on purpose, frontends.py)."""
    torch.manual_seed(0)
    hf = _perturb(transformers.Wav2Vec2Model(_wav2vec2_config(stable=True)), seed=6)
    ours = encoder_from_hf_wav2vec2(hf).eval()
    x, lengths = _audio([4800, 3300, 1700], seed=7)
    sample_mask = (torch.arange(x.shape[1])[None] < lengths[:, None]).long()
    with torch.no_grad():
        ref = hf(x, attention_mask=sample_mask, output_hidden_states=True)
        out = ours.encode(ours.embed(x, lengths), return_layers=True)
    valid = ~out.padding_mask
    assert torch.equal(valid, hf._get_feature_vector_attention_mask(valid.shape[1], sample_mask))
    for i, (mine, theirs) in enumerate(zip(out.layers, _hf_layers(ref), strict=True)):
        _assert_close(mine[valid], theirs[valid], f"layer {i}")


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
