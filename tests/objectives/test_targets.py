"""data2vec v1 / 2.0 target definitions against a naive reference built from the teacher's intermediate tensors,
per modality (fairseq: v1 audio and text regress the FFN outputs before the last residual, v1 vision the raw
block outputs; data2vec 2.0 the FFN outputs in every modality), and the 2.0 student's details: decoder input
dropout, the teacher of `ema_encoder_only`, fairseq's 1-D block masks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from omnissl.backbones.builders import tiny
from omnissl.batch import Batch
from omnissl.ssl.data2vec import Data2Vec
from omnissl.ssl.data2vec2 import Data2Vec2
from omnissl.ssl.heads import ConvDecoder1d, ConvDecoder2d
from omnissl.ssl.masking import block_mask_1d, equal_keep


def inputs(modality: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    if modality == "audio":
        return torch.randn(2, 8000, generator=g) * 0.1, None
    if modality == "text":
        return torch.randint(4, 1024, (2, 24), generator=g), None
    return torch.randn(2, 3, 32, 32, generator=g), None


def naive_block(block, x, attn_mask=None):
    """A block by hand from its weights (eval: no dropout) -> (raw block output, FFN output before the residual)."""
    def attn(y):
        return block.attn(y, attn_mask)

    def ffn(y):
        return block.fc2(F.gelu(block.fc1(y)))

    if block.pre_norm:
        a = x + attn(block.norm1(x))
        h = ffn(block.norm2(a))
        return a + h, h
    a = block.norm1(x + attn(x))
    h = ffn(a)
    return block.norm2(a + h), h


def naive_norm(y, how, lengths=None):
    if how == "instance" and lengths is not None:  # over each row's valid frames only; padding zeroed
        return torch.stack([torch.cat([naive_norm(r[:t][None], how)[0], torch.zeros_like(r[t:])])
                            for r, t in zip(y, lengths.tolist())])
    if how == "instance":  # over time per channel
        mu, var = y.mean(1, keepdim=True), y.var(1, unbiased=False, keepdim=True)
        return (y - mu) / (var + 1e-5).sqrt()
    if how == "layer":  # over channels per position
        mu, var = y.mean(-1, keepdim=True), y.var(-1, unbiased=False, keepdim=True)
        return (y - mu) / (var + 1e-5).sqrt()
    return y


def naive_targets(model, source, norm, final_norm, lengths=None):
    """Capture each teacher block's input (and attention mask), recompute it by hand, pick the FFN or raw block
    outputs, drop the CLS, normalize each (instance norm over each row's valid frames), average the top K,
    normalize the average."""
    blocks = model.teacher.module.trunk.blocks
    seen = []
    hooks = [b.register_forward_pre_hook(lambda m, args: seen.append(args)) for b in blocks]
    return seen, hooks, lambda: _finish(model, blocks, seen, source, norm, final_norm, lengths)


def _finish(model, blocks, seen, source, norm, final_norm, lengths=None):
    outs = [naive_block(b, *args) for b, args in zip(blocks, seen)]
    layers = [o[0] if source == "layers" else o[1] for o in outs][-model.top_k:]
    p = model.encoder.num_prefix
    avg = sum(naive_norm(y[:, p:].float(), norm, lengths) for y in layers) / model.top_k
    return naive_norm(avg, final_norm, lengths)


CASES = {
    # (objective, modality): constructor arguments of the recipe's target definition on a tiny encoder,
    # and the expected (source, norm, final_norm)
    ("data2vec", "audio"): (dict(target_source="ffn", target_norm="instance"), ("ffn", "instance", None)),
    ("data2vec", "text"): (dict(target_source="ffn", target_norm="layer"), ("ffn", "layer", None)),
    ("data2vec", "image"): (dict(target_source="layers", target_norm=None, final_target_norm="layer"),
                            ("layers", None, "layer")),
    ("data2vec2", "audio"): (dict(), ("ffn", "instance", None)),
    ("data2vec2", "text"): (dict(ema_blocks_only=True, block_adjust=0.0, mask_length=1, mask_prob=0.48),
                            ("ffn", "instance", None)),
    ("data2vec2", "image"): (dict(teacher_embeds=True, final_target_norm="layer", mask_prob=0.8, mask_length=2,
                                  block_adjust=0.07), ("ffn", "instance", "layer")),
}


def build(which, modality, pre_norm=False, **kw):
    enc = tiny(modality, depth=3, pre_norm=pre_norm)
    if which == "data2vec":
        return Data2Vec(enc, modality=modality, **{"top_k": 2, **kw})
    dec = (ConvDecoder2d(in_dim=enc.dim, dim=32, layers=1, kernel=3, groups=4) if modality == "image"
           else ConvDecoder1d(in_dim=enc.dim, dim=32, layers=1, groups=4))
    return Data2Vec2(enc, modality=modality, decoder=dec, **{"top_k": 2, "clone_batch": 2, **kw})


def teacher_targets(model, x, lengths):
    tokens = model.encoder.embed(x, lengths)
    if isinstance(model, Data2Vec2):
        return model.targets(tokens, x, lengths)
    return model.targets(tokens)


@pytest.mark.parametrize("pre_norm", [False, True])
@pytest.mark.parametrize("which,modality", list(CASES))
def test_targets_match_a_naive_reference_from_the_teachers_blocks(which, modality, pre_norm):
    torch.manual_seed(0)
    kw, (source, norm, final_norm) = CASES[(which, modality)]
    model = build(which, modality, pre_norm=pre_norm, **kw)
    # the teacher differs from the student (as after some training), so that whose weights run matters
    with torch.no_grad():
        for p in model.teacher.module.trunk.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.train()
    x, lengths = inputs(modality)
    seen, hooks, finish = naive_targets(model, source, norm, final_norm)
    with torch.no_grad():
        got = teacher_targets(model, x, lengths)
        for h in hooks:
            h.remove()
        want = finish()
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    if source == "ffn":  # and not the block outputs (a different quantity: the test can tell them apart)
        other = _finish(model, model.teacher.module.trunk.blocks, seen, "layers", norm, final_norm)
        assert (got - other).abs().max() > 0.1


@pytest.mark.parametrize("which", ["data2vec", "data2vec2"])
def test_padded_audio_targets_match_the_naive_reference_and_the_row_alone(which):
    """A padded audio batch (the usual case): attention and instance-norm statistics over each row's valid frames
    (fairseq never pads in pretraining), so the short row's targets are those of the row run alone."""
    torch.manual_seed(0)
    kw, (source, norm, final_norm) = CASES[(which, "audio")]
    model = build(which, "audio", **kw)
    with torch.no_grad():
        for p in model.teacher.module.trunk.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.train()
    x, _ = inputs("audio")
    lengths = torch.tensor([8000, 5000])
    x[1, 5000:] = 0.0
    frames = (~model.encoder.embed(x, lengths).padding_mask).sum(1)
    assert frames.tolist()[0] > frames.tolist()[1]
    seen, hooks, finish = naive_targets(model, source, norm, final_norm, lengths=frames)
    with torch.no_grad():
        got = teacher_targets(model, x, lengths)
        for h in hooks:
            h.remove()
        want = finish()
        alone = teacher_targets(model, x[1:, :5000], lengths[1:])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    t = int(frames[1])
    torch.testing.assert_close(got[1, :t], alone[0], rtol=1e-4, atol=1e-4)
    assert (got[1, t:] == 0).all()


def test_pre_ln_block_targets_are_taken_before_the_final_layer_norm():
    """fairseq data2vec_vision appends each block's output before `norm`: the top target layer of a pre-LN trunk
    is the raw residual stream, not the final LayerNorm's output (which has its own scale and affine)."""
    torch.manual_seed(0)
    model = build("data2vec", "image", pre_norm=True, target_source="layers", target_norm=None, top_k=1)
    with torch.no_grad():
        model.teacher.module.trunk.norm.weight.mul_(3.0)
    x, _ = inputs("image")
    with torch.no_grad():
        got = teacher_targets(model, x, None)
        out = model.teacher.module.encode(model.encoder.embed(x), return_layers="blocks")
        normed = model.teacher.module.encode(model.encoder.embed(x), return_layers=True)
    torch.testing.assert_close(got, out.layers[-1][:, 1:])
    assert (normed.layers[-1] - out.layers[-1]).abs().max() > 0.1  # the two differ, so the test can fail
    torch.testing.assert_close(normed.layers[-1], normed.last)  # probes still see the final LN's output


def test_text_teacher_averages_only_the_blocks_and_embeds_with_the_students_weights():
    """fairseq `ema_encoder_only` (data2vec 2.0 text): the EMA covers the blocks; the teacher is fed the student's
    current embeddings, positions and embedding LayerNorm. data2vec v1 text (`ema_transformer_layers_only`)
    copies the embedding LayerNorm too."""
    for model in (build("data2vec2", "text", ema_blocks_only=True, mask_length=1, mask_prob=0.48, block_adjust=0.0),
                  build("data2vec", "text", target_source="ffn", target_norm="layer")):
        with torch.no_grad():
            for p in model.encoder.parameters():
                p.add_(1.0)
        model.train()
        model.teacher.set_num_updates(1)
        student, teacher = dict(model.encoder.named_parameters()), dict(model.teacher.module.named_parameters())
        for name in ("positions.weight", "trunk.norm.weight", "trunk.norm.bias"):
            torch.testing.assert_close(teacher[name], student[name], msg=name)
        blk = "trunk.blocks.0.fc1.weight"
        assert (teacher[blk] - student[blk]).abs().min() > 0.5  # averaged at decay 0.999: still ~1 behind
        if isinstance(model, Data2Vec2):  # the teacher is fed the student's token embeddings
            x, _ = inputs("text")
            with torch.no_grad():
                emb = model.teacher.module.frontend.embed.weight.clone()
                model.teacher.module.frontend.embed.weight.zero_()
                a = teacher_targets(model, x, None)
                model.teacher.module.frontend.embed.weight.copy_(emb)
                torch.testing.assert_close(a, teacher_targets(model, x, None))


def test_decoder_input_dropout_drops_the_students_visible_outputs():
    """fairseq `decoder.input_dropout` (0.1 audio and text): dropout on the student's outputs before they are
    scattered into the noise; masked slots (noise) untouched; off in eval."""
    torch.manual_seed(0)
    fulls = []

    def run(p, train=True):
        model = build("data2vec2", "audio", decoder_input_dropout=p)
        model.load_state_dict(base.state_dict())
        model.train(train)
        model.decoder.register_forward_pre_hook(lambda m, args: fulls.append(args[0].detach()))
        torch.manual_seed(1)
        x, _ = inputs("audio")
        model.step(Batch({"audio": x}, {}))

    base = build("data2vec2", "audio", decoder_input_dropout=0.0)
    run(0.0)
    run(0.5)
    run(0.5, train=False)
    clean, dropped, evaluated = fulls
    kept = clean.abs().mean(-1) > 0.1  # visible outputs (the noise has std 0.01)
    zero = (dropped == 0) & kept[..., None]
    frac = zero.float().sum() / (kept.sum() * clean.shape[-1])
    assert 0.4 < frac < 0.6, frac
    torch.testing.assert_close(dropped[~zero & kept[..., None]], 2 * clean[~zero & kept[..., None]])
    torch.testing.assert_close(dropped[~kept], clean[~kept])
    torch.testing.assert_close(evaluated, clean)


def test_block_mask_1d_masks_exactly_the_reference_rate():
    """fairseq compute_block_mask_1d(require_same_masks): exactly int(T·p) masked per row (the span masks with
    same-count trimming covered 44-47.5 % at p 0.65); padded rows masked in proportion to their length, never
    at padding; span 1 reaches every position, the last included."""
    g = torch.Generator().manual_seed(0)
    for b, n in [(24, 1000), (64, 250), (8, 51)]:
        m = block_mask_1d((b, n), mask_prob=0.5, span=5, adjust=0.05, generator=g)
        assert m.sum(1).tolist() == [int(n * 0.5)] * b
    pad = torch.arange(100)[None] >= torch.tensor([100, 61, 7])[:, None]
    m = block_mask_1d((3, 100), padding_mask=pad, mask_prob=0.5, span=5, generator=g)
    assert m.sum(1).tolist() == [50, 30, 3] and not (m & pad).any()
    keep = equal_keep(m, pad)
    assert keep.sum(1).tolist() == [50, 50, 50] and not (keep & m).any()
    assert (keep | m | pad).all() and (keep & ~pad).sum(1).tolist() == [50, 31, 4]
    m = block_mask_1d((4000, 10), mask_prob=0.5, span=1, adjust=0.0, generator=g)
    assert m.sum(1).eq(5).all() and (m.float().mean(0) - 0.5).abs().max() < 0.05  # uniform, last included
    # spans: contiguous runs (the blocks), not scattered frames
    m = block_mask_1d((64, 400), mask_prob=0.5, span=5, adjust=0.05, generator=g)
    runs = (m[:, 1:] & ~m[:, :-1]).sum() + m[:, 0].sum()
    assert m.sum() / runs > 3.0


def test_data2vec2_masks_half_of_the_frames():
    model = build("data2vec2", "audio")
    model.train()
    out = model.step(Batch({"audio": inputs("audio")[0]}, {}))
    assert float(out.metrics["masked_frac"]) == pytest.approx(0.5, abs=0.02)


# fairseq's settings per base recipe (configs: audio/pretraining/base_librispeech, text/pretraining/base,
# vision/pretraining/base_imagenet, v2/base_{audio,text,images}_only_task): what the naive references above
# are built with, and the 2.0 student's settings the audit found missing
RECIPES = {
    ("data2vec", "audio"): dict(target_source="ffn", target_norm="instance", top_k=8),
    ("data2vec", "text"): dict(target_source="ffn", target_norm="layer", top_k=10, head_layers=2),
    ("data2vec", "image"): dict(target_source="layers", target_norm=None, final_target_norm="layer"),
    ("data2vec2", "audio"): dict(target_source="ffn", target_norm="instance", top_k=8, decoder_input_dropout=0.1),
    ("data2vec2", "text"): dict(target_source="ffn", target_norm="instance", top_k=12, decoder_input_dropout=0.1,
                                ema_blocks_only=True, teacher_embeds=False, loss_scale=1.0),
    ("data2vec2", "image"): dict(target_source="ffn", target_norm="instance", final_target_norm="layer", top_k=10,
                                 decoder_input_dropout=0.0, teacher_embeds=True, loss_scale=None),
}


@pytest.mark.parametrize("which,modality", list(RECIPES))
def test_base_recipes_define_the_targets_the_references_are_checked_for(which, modality):
    """The naive-reference cases above use each base recipe's target definition, and the recipes hold fairseq's
    values (before the audit: 2.0 block outputs, v1 text `layers`, no decoder input dropout, image loss_scale 1,
    a text teacher with averaged embeddings, a pre-LN image model)."""
    from pathlib import Path

    import yaml

    root = Path(__file__).resolve().parents[2]
    recipe = yaml.safe_load((root / f"recipes/{modality}/{which}_base.yaml").read_text())["model"]["init_args"]
    for key, want in RECIPES[(which, modality)].items():
        assert recipe.get(key) == want, (key, recipe.get(key), want)
    source, norm, final_norm = CASES[(which, modality)][1]
    assert (recipe.get("target_source"), recipe.get("target_norm"), recipe.get("final_target_norm")) == (
        source, norm, final_norm)
    if (which, modality) == ("data2vec2", "image"):  # fairseq's image model is post-LN (layer_norm_first false)
        assert recipe["encoder"]["init_args"]["pre_norm"] is False
