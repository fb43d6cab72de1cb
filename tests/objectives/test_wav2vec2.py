"""wav2vec 2.0: quantizer, distractors and contrastive loss against naive references; feature penalty and
gradient scale; Gumbel temperature per optimizer step in a real Trainer; short utterances; collapse guard;
loss goes down."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from omnissl.backbones.builders import tiny
from omnissl.batch import Batch
from omnissl.datamodules.synthetic import SyntheticDataModule
from omnissl.ssl.base import NonFiniteLossError
from omnissl.ssl.losses import contrastive_with_distractors, sample_distractors
from omnissl.ssl.losses import feature_penalty
from omnissl.ssl.monitors import CollapseError, CollapseGuard
from omnissl.ssl.quantizer import GumbelQuantizer
from omnissl.ssl.wav2vec2 import Wav2Vec2


def small_model(**kw) -> Wav2Vec2:
    kw = {"final_dim": 32, "codebook_entries": 16, "num_distractors": 10, **kw}
    return Wav2Vec2(tiny("audio"), **kw)


def audio_batch(lengths, ids=None, seed=0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    t = max(lengths)
    x = torch.randn(len(lengths), t, generator=g) * 0.1
    lens = torch.tensor(lengths)
    x = x.masked_fill(torch.arange(t)[None] >= lens[:, None], 0.0)
    ids = torch.arange(len(lengths)) if ids is None else torch.tensor(ids)
    return Batch({"audio": x}, {"audio": lens}, ids=ids)


def trainer(**kw) -> L.Trainer:
    kw = {"accelerator": "cpu", "devices": 1, "logger": False, "enable_checkpointing": False,
          "enable_progress_bar": False, "enable_model_summary": False, "limit_val_batches": 0, **kw}
    return L.Trainer(**kw)


# --- distractors and the contrastive loss ----------------------------------------------------------------


def test_distractors_never_the_positive_and_uniform_over_the_rest():
    idx = sample_distractors(3, 7, 2000, generator=torch.Generator().manual_seed(0))
    assert idx.shape == (3, 7, 2000) and idx.min() >= 0 and idx.max() < 7
    assert not (idx == torch.arange(7)[None, :, None]).any()
    counts = torch.stack([torch.bincount(idx[0, i], minlength=7).float() for i in range(7)])
    expected = 2000 / 6
    off = ~torch.eye(7, dtype=torch.bool)
    assert ((counts[off] - expected).abs() < 5 * math.sqrt(expected)).all()  # 5 sigma


def naive_contrastive(pred, target, idx, temp):
    """fairseq compute_preds: gather (K, B, M, D) negatives, cosine per pair, -inf where a negative equals
    the positive, CE with target 0, summed."""
    b, m, k = idx.shape
    negs = torch.stack([target[bi][idx[bi]] for bi in range(b)]).permute(2, 0, 1, 3)  # (K, B, M, D)
    targets = torch.cat([target[None], negs], 0)  # (K+1, B, M, D)
    logits = F.cosine_similarity(pred.float()[None], targets.float(), dim=-1) / temp
    neg_is_pos = (target[None] == negs).all(-1)
    logits[1:][neg_is_pos] = float("-inf")
    logits = logits.permute(1, 2, 0).reshape(-1, k + 1)
    return F.cross_entropy(logits, torch.zeros(b * m, dtype=torch.long), reduction="sum")


def test_contrastive_loss_and_gradient_match_naive_reference():
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(2, 9, 16, generator=g, requires_grad=True)
    target = torch.randn(2, 9, 16, generator=g)
    target[0, 3] = target[0, 5]  # identical targets: must get -inf as each other's distractor
    target = target.requires_grad_()
    idx = sample_distractors(2, 9, 6, generator=g)
    idx[0, 3, 0] = 5
    loss, count, correct = contrastive_with_distractors(pred, target, distractors=idx, temperature=0.1)
    ref = naive_contrastive(pred, target, idx, 0.1)
    assert count.item() == 18 and 0 <= correct.item() <= 18
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    gp, gt = torch.autograd.grad(loss, (pred, target))
    rp, rt = torch.autograd.grad(ref, (pred, target))
    torch.testing.assert_close(gp, rp, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gt, rt, rtol=1e-4, atol=1e-6)


def test_contrastive_logits_fp32_under_bf16_autocast():
    pred, target = torch.randn(2, 8, 16), torch.randn(2, 8, 16)
    idx = sample_distractors(2, 8, 5, generator=torch.Generator().manual_seed(0))
    ref, _, _ = contrastive_with_distractors(pred, target, distractors=idx)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _, _ = contrastive_with_distractors(pred, target, distractors=idx)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref)


# --- quantizer ---------------------------------------------------------------------------------------------


def test_perplexity_of_uniform_logits_is_groups_times_entries():
    q = GumbelQuantizer(in_dim=8, vq_dim=16, groups=2, entries=320)
    with torch.no_grad():
        q.weight_proj.weight.zero_()
        q.weight_proj.bias.zero_()
    out = q(torch.randn(2, 50, 8))
    assert out.prob_perplexity.item() == pytest.approx(640.0, rel=1e-4)
    assert out.quantized.shape == (2, 50, 16) and out.codes.shape == (2, 50, 2)


def test_weight_proj_init_and_straight_through_gradient():
    q = GumbelQuantizer(in_dim=512)
    w = q.weight_proj.weight
    assert w.shape == (640, 512) and abs(w.std().item() - 1.0) < 0.02 and q.weight_proj.bias.abs().max() == 0
    assert q.codebook.min() >= 0 and q.codebook.max() <= 1  # uniform init
    x = torch.randn(2, 10, 512, requires_grad=True)
    out = q.train()(x, generator=torch.Generator().manual_seed(0))
    # forward values are codebook entries exactly (hard), gradients reach the logits (soft)
    picked = torch.cat([q.codebook[g][out.codes[..., g]] for g in range(2)], -1)
    torch.testing.assert_close(out.quantized, picked, atol=1e-6, rtol=0)
    out.quantized.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0 and q.weight_proj.weight.grad.abs().sum() > 0


def test_gumbel_path_is_fp32_under_bf16_autocast_and_eval_is_argmax():
    q = GumbelQuantizer(in_dim=32, vq_dim=16, groups=2, entries=20)
    x = torch.randn(2, 30, 32)
    seen = {}
    orig = q.gumbel_hard

    def spy(logits, generator=None):
        seen["dtype"] = logits.dtype
        out = orig(logits, generator)
        seen["out"] = out.dtype
        return out

    q.gumbel_hard = spy
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = q.train()(x, generator=torch.Generator().manual_seed(0))
        ev = q.eval()(x)
    assert seen == {"dtype": torch.float32, "out": torch.float32}
    assert out.prob_perplexity.dtype == torch.float32
    ref = q.eval()(x)
    assert torch.equal(ev.codes, ref.codes) and torch.equal(ev.codes[..., 0], q.logits(x).argmax(-1)[:, 0].view(2, 30))
    torch.testing.assert_close(ev.prob_perplexity, ref.prob_perplexity)


def test_gumbel_sampling_survives_uniform_zero(monkeypatch):
    q = GumbelQuantizer(in_dim=8, vq_dim=8, groups=2, entries=4).train()
    monkeypatch.setattr(torch, "rand", lambda shape, **kw: torch.zeros(shape, dtype=kw.get("dtype")))
    out = q(torch.randn(1, 5, 8))
    assert torch.isfinite(out.quantized).all()


def test_temperature_schedule():
    q = GumbelQuantizer()
    for n, want in [(0, 2.0), (1000, 2.0 * 0.999995**1000), (100_000, 2.0 * 0.999995**100_000), (300_000, 0.5)]:
        q.set_num_updates(n)
        assert q.temperature == pytest.approx(want)
    # REFERENCE §B.2: the floor is reached after ~277 k updates
    q.set_num_updates(277_258)
    assert q.temperature > 0.5
    q.set_num_updates(277_259)
    assert q.temperature == 0.5


class _Record(L.Callback):
    def __init__(self) -> None:
        self.temps, self.steps, self.losses = [], [], []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.temps.append(module.quantizer.temperature)
        self.steps.append(trainer.global_step)
        self.losses.append(float(outputs["loss"]))


def test_temperature_advances_per_optimizer_step_with_accumulation():
    model = small_model(max_temp=2.0, min_temp=0.1, temp_decay=0.5)
    rec = _Record()
    trainer(max_steps=3, accumulate_grad_batches=2, callbacks=[rec]).fit(
        model, SyntheticDataModule(modality="audio", batch_size=2, train_size=16))
    assert rec.temps == [2.0, 2.0, 1.0, 1.0, 0.5, 0.5]


# --- feature penalty, gradient scale ----------------------------------------------------------------------


def test_feature_penalty_is_mean_square_of_prenorm_features_over_valid_frames():
    raw = torch.randn(2, 5, 3)
    pad = torch.tensor([[False] * 5, [False, False, True, True, True]])
    want = torch.cat([raw[0], raw[1, :2]]).pow(2).mean()
    torch.testing.assert_close(feature_penalty(raw, pad), want)
    torch.testing.assert_close(feature_penalty(raw, None), raw.pow(2).mean())


def test_feature_penalty_enters_the_loss_with_weight_times_masked_frames():
    batch = audio_batch([8000, 8000])
    base = small_model(feature_penalty_weight=0.0, diversity_weight=0.0).eval()
    torch.manual_seed(0)
    pen = small_model(feature_penalty_weight=10.0, diversity_weight=0.0).eval()
    pen.load_state_dict(base.state_dict())
    a, b = base.step(batch), pen.step(batch)
    # loss = (contrastive_sum + 10 * pen * S) / S
    torch.testing.assert_close(b.loss - a.loss, 10 * b.metrics["feature_pen"], rtol=1e-4, atol=1e-5)


def test_grad_scale_scales_the_frontend_gradient_exactly():
    enc = tiny("audio")
    x = torch.randn(2, 4000)

    def grads(scale):
        enc.zero_grad()
        tok = enc.embed(x, grad_scale=scale)
        (tok.x.pow(2).sum() + tok.raw.pow(2).sum()).backward()
        front = {n: p.grad.clone() for n, p in enc.frontend.named_parameters()}
        rest = {n: p.grad.clone() for n, p in enc.proj.named_parameters()}
        return front, rest

    f1, r1 = grads(1.0)
    f01, r01 = grads(0.1)
    for n in f1:  # exact up to fp32 rounding of the (linear) backward pass
        torch.testing.assert_close(f01[n], 0.1 * f1[n], rtol=1e-4, atol=1e-5 * f1[n].abs().max().item())
    for n in r1:
        torch.testing.assert_close(r01[n], r1[n])


def test_conv_extractor_matches_conv1d_forward_and_backward():
    """The channels-last GEMM convolution of ConvFeatureExtractor (frontends._Windows) against nn.Conv1d."""
    from omnissl.backbones.frontends import ConvFeatureExtractor, _Windows

    h = torch.randn(2, 23, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: _Windows.apply(v, 3, 2), (h,))
    for mode in ("group", "layer"):
        torch.manual_seed(0)
        fe = ConvFeatureExtractor(layers=((8, 10, 5), (8, 3, 2), (8, 2, 2)), mode=mode, bias=mode == "layer")
        x = torch.randn(2, 3000)

        def reference(x):
            z = x[:, None]
            for conv, norm in zip(fe.convs, fe.norms):
                z = conv(z)
                if isinstance(norm, torch.nn.GroupNorm):
                    z = F.group_norm(z, norm.num_groups, norm.weight, norm.bias, norm.eps)
                elif isinstance(norm, torch.nn.LayerNorm):
                    z = norm(z.transpose(1, 2)).transpose(1, 2)
                z = F.gelu(z)
            return z.transpose(1, 2)

        ours, _, _ = fe(x)
        ref = reference(x)
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)
        g = torch.randn_like(ref)
        go = torch.autograd.grad(ours, list(fe.parameters()), g)
        gr = torch.autograd.grad(ref, list(fe.parameters()), g)
        for a, b in zip(go, gr):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item())


# --- the objective ------------------------------------------------------------------------------------------


def test_step_metrics_and_masking():
    model = small_model()
    out = model.step(audio_batch([16000, 12000, 9000]))
    keys = {"contrastive_bits", "accuracy", "diversity", "code_perplexity", "prob_perplexity", "temp",
            "masked_frac", "feature_pen"}
    assert keys <= set(out.metrics)
    assert 0.2 < float(out.metrics["masked_frac"]) < 0.7 and out.metrics["temp"] == 2.0
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_short_utterances_are_dropped_or_named():
    batch = audio_batch([16000, 300, 2000, 12000], ids=[10, 11, 12, 13])  # 300: < receptive field; 2000: 6 frames
    out = small_model().step(batch)
    assert out.metrics["dropped_short"] == 2.0 and out.batch_size == 2
    with pytest.raises(ValueError, match=r"samples \[11, 12\]"):
        small_model(short_utterances="raise").step(batch)
    with pytest.raises(ValueError, match=r"samples \[21, 22\]"):
        small_model().step(audio_batch([300, 2000], ids=[21, 22]))


def test_nonfinite_loss_names_step_and_ids():
    batch = audio_batch([8000, 8000], ids=[7, 9])
    batch.inputs["audio"][1, 100] = float("nan")
    with pytest.raises(NonFiniteLossError, match=r"step 0 on samples \[7, 9\]"):
        small_model().training_step(batch, 0)


def test_collapse_guard():
    g = CollapseGuard(name="prob_perplexity", threshold=4.0, patience=3, remedies="lower the learning rate")
    for step, value in [(0, 2.0), (1, 2.0), (2, 5.0), (3, 2.0), (4, 2.0), (5, 2.0)]:
        g.update(value, step)  # reset at step 2, so 3 consecutive low steps are not reached yet
    with pytest.raises(CollapseError, match="prob_perplexity.*since step 3.*lower the learning rate"):
        g.update(2.0, 6)


def test_collapse_guard_stops_a_trainer_run():
    model = small_model(min_code_perplexity=1e9, collapse_patience_steps=2)
    with pytest.raises(CollapseError, match="code_perplexity"):
        trainer(max_steps=5).fit(model, SyntheticDataModule(modality="audio", batch_size=2, train_size=16))


def test_collapse_guard_fires_on_all_silent_input():
    """All-zero audio: every frame picks one code per group (code perplexity = G = 2) while prob_perplexity
    stays near its maximum, so a guard on prob_perplexity never fired (reliability review, item 8)."""
    silent = Batch({"audio": torch.zeros(2, 16000)}, {"audio": torch.tensor([16000, 16000])}, ids=torch.arange(2))
    loader = torch.utils.data.DataLoader([silent] * 8, batch_size=None, collate_fn=lambda b: b)
    model = small_model(collapse_patience_steps=2)
    with pytest.raises(CollapseError,
                       match=r"code_perplexity .* below 4\.0 since step 0 \(now 2\.\d+ at step 2\).*silent"):
        trainer(max_steps=6).fit(model, train_dataloaders=loader)


def test_num_distractors_zero_is_refused():
    with pytest.raises(ValueError, match="num_distractors must be >= 1, got 0"):
        small_model(num_distractors=0)


def test_loss_goes_down_on_synthetic_audio():
    torch.manual_seed(0)
    model = small_model(optimizer=lambda p: torch.optim.AdamW(p, lr=2e-3))
    rec = _Record()
    trainer(max_steps=40, callbacks=[rec]).fit(
        model, SyntheticDataModule(modality="audio", batch_size=8, train_size=64))
    first, last = sum(rec.losses[:5]) / 5, sum(rec.losses[-5:]) / 5
    assert last < first - 0.3, (first, last)


@pytest.mark.slow
def test_loss_goes_down_on_embedded_speech():
    """The real embedded speech corpus (espeak-ng, generated on first use) through AudioDataModule."""
    from omnissl.datamodules.audio import AudioDataModule

    torch.manual_seed(0)
    model = small_model(optimizer=lambda p: torch.optim.AdamW(p, lr=2e-3), codebook_entries=32)
    dm = AudioDataModule(train="embedded:small", valid=None, max_samples=48000,
                         min_samples=16000, max_tokens=None, batch_size=8, num_workers=0)
    rec = _Record()
    trainer(max_steps=60, callbacks=[rec]).fit(model, dm)
    first, last = sum(rec.losses[:10]) / 10, sum(rec.losses[-10:]) / 10
    assert last < first - 0.2, (first, last)
