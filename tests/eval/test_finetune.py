"""Fine-tuning: layer-wise lr decay groups, frozen extractor / encoder schedules, masking, pretrained weights,
bad configs, and a short real fine-tune on the embedded keywords that lowers the training loss."""

from functools import partial

import lightning as L
import pytest
import torch

from omnissl.backbones import builders
from omnissl.datamodules.synthetic import SyntheticDataModule
from omnissl.eval.finetune import UtteranceClassifier, layer_id
from omnissl.ops import mean_pool
from omnissl.train.schedules import WarmupPolynomial


def _sgd(lr=1.0):
    return partial(torch.optim.AdamW, lr=lr, weight_decay=0.0)


def _trainer(steps, callbacks=(), **kw):
    kw.setdefault("limit_val_batches", 0)
    return L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, callbacks=list(callbacks), **kw)


@pytest.mark.parametrize("pre_norm", [False, True])
def test_llrd_groups_have_the_exact_lr_of_every_block(pre_norm):
    enc = builders.tiny("audio", dim=32, depth=3, pre_norm=pre_norm)  # 32 != 64 channels: a projection
    model = UtteranceClassifier(enc, num_classes=4, layer_decay=0.5, freeze_frontend_steps=0, mask_prob=0.5,
                                weight_decay=0.05, optimizer=_sgd(2.0))
    opt = model.configure_optimizers()
    lr_of, wd_of = {}, {}
    for g in opt.param_groups:
        for p in g["params"]:
            assert id(p) not in lr_of, "a parameter sits in two groups"
            lr_of[id(p)], wd_of[id(p)] = g["lr"], g["weight_decay"]
    # L = 3: embeddings 2 * 0.5^4, block i 2 * 0.5^(3 - i), head 2 * 0.5^0 (BEiT: decay^(L + 1 - id))
    expected = {"encoder.frontend.convs.0.weight": 0.125, "encoder.feature_norm.weight": 0.125,
                "encoder.proj.weight": 0.125, "encoder.positions.conv.bias": 0.125, "encoder.mask_emb": 0.125,
                "encoder.trunk.blocks.0.fc1.weight": 0.25, "encoder.trunk.blocks.1.attn.qkv.bias": 0.5,
                "encoder.trunk.blocks.2.norm2.weight": 1.0, "head.weight": 2.0, "head.bias": 2.0,
                "encoder.trunk.norm.weight": 2.0 if pre_norm else 0.125}
    named = dict(model.named_parameters())
    assert set(lr_of) == {id(p) for p in named.values()}  # every parameter, once
    for name, lr in expected.items():
        assert lr_of[id(named[name])] == pytest.approx(lr), name
    for name, p in named.items():  # weight decay kept: matrices decay; biases, norms, positions, mask embedding do not
        decays = p.ndim > 1 and "mask_emb" not in name and "positions" not in name
        assert wd_of[id(p)] == (0.05 if decays else 0.0), name
    # the schedule scales each group's own lr
    sched = WarmupPolynomial(opt, warmup_steps=4, total_steps=10)
    for _ in range(6):
        opt.step()
        sched.step()
    factor = sched.factor(6)
    for g in opt.param_groups:
        assert g["lr"] == pytest.approx(2.0 * g["lr_scale"] * factor)


def test_layer_ids_follow_beit():
    assert layer_id("frontend.convs.3.weight", num_layers=12, pre_norm=False) == 0
    assert layer_id("cls_token", num_layers=12, pre_norm=True) == 0
    assert layer_id("trunk.blocks.11.fc2.bias", num_layers=12, pre_norm=False) == 12
    assert layer_id("trunk.norm.bias", num_layers=12, pre_norm=True) == 13
    assert layer_id("trunk.norm.bias", num_layers=12, pre_norm=False) == 0


class _Watch(L.Callback):
    """Snapshots of chosen parameters before every optimizer step, and which of them had gradients."""

    def __init__(self, names):
        self.names, self.before, self.had_grad = names, [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        params = dict(pl_module.named_parameters())
        self.before.append({n: params[n].detach().clone() for n in self.names})

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        params = dict(pl_module.named_parameters())
        self.had_grad.append({n: params[n].grad is not None for n in self.names})


def _fit_watch(model, steps, names):
    watch = _Watch(names)
    dm = SyntheticDataModule(modality="audio", train_size=32, batch_size=8, min_samples=8000, max_samples=8000)
    _trainer(steps, [watch]).fit(model, dm)
    after = {n: p.detach().clone() for n, p in model.named_parameters() if n in names}
    return watch, [*watch.before, after]  # states[i] = weights after i optimizer steps


def test_frozen_extractor_gets_no_update_for_n_steps_then_does():
    names = ["encoder.frontend.convs.0.weight", "encoder.frontend.norms.0.weight", "encoder.proj.weight",
             "encoder.trunk.blocks.0.fc1.weight"]
    model = UtteranceClassifier(builders.tiny("audio", dim=32), num_classes=4, freeze_frontend_steps=2,
                                weight_decay=0.1, optimizer=_sgd(1e-2))
    watch, states = _fit_watch(model, 4, names)
    front, trunk = names[0], names[3]
    assert [g[front] for g in watch.had_grad] == [False, False, True, True]
    assert all(g[trunk] and g[names[2]] for g in watch.had_grad)  # projection after the extractor trains
    for n in names[:2]:  # weight decay would move a zero-gradient weight: None gradients leave it untouched
        assert torch.equal(states[0][n], states[1][n]) and torch.equal(states[1][n], states[2][n])
        assert not torch.equal(states[2][n], states[3][n])
    assert not torch.equal(states[0][trunk], states[1][trunk])


def test_extractor_frozen_for_the_whole_run_by_default_and_encoder_frozen_first():
    model = UtteranceClassifier(builders.tiny("audio", dim=32), num_classes=4, freeze_encoder_steps=2,
                                optimizer=_sgd(1e-2))
    assert not any(p.requires_grad for p in model.encoder.frontend.parameters())  # fairseq feature_grad_mult 0
    names = ["encoder.frontend.convs.0.weight", "encoder.trunk.blocks.1.fc2.weight", "encoder.proj.weight",
             "head.weight"]
    watch, states = _fit_watch(model, 3, names)
    assert [g["encoder.trunk.blocks.1.fc2.weight"] for g in watch.had_grad] == [False, False, True]
    assert all(g["head.weight"] for g in watch.had_grad)
    for k in range(3):
        assert torch.equal(states[k]["encoder.frontend.convs.0.weight"], states[0]["encoder.frontend.convs.0.weight"])
    assert torch.equal(states[0]["encoder.proj.weight"], states[2]["encoder.proj.weight"])
    assert not torch.equal(states[2]["encoder.proj.weight"], states[3]["encoder.proj.weight"])
    assert not torch.equal(states[0]["head.weight"], states[1]["head.weight"])


def test_masking_applies_in_training_only():
    enc = builders.tiny("audio")
    model = UtteranceClassifier(enc, num_classes=4, mask_prob=0.5, mask_length=4)
    batch = next(iter(SyntheticDataModule(modality="audio", batch_size=4).train_dataloader()))
    model.eval()
    plain = model.features(batch).last
    torch.testing.assert_close(plain, enc.encode(enc.embed(batch.inputs["audio"], batch.lengths["audio"])).last)
    model.train()
    assert not torch.allclose(model.features(batch).last, plain)
    assert not UtteranceClassifier(builders.tiny("audio"), num_classes=4).encoder.mask_emb.requires_grad


def test_mean_pool_ignores_padding_and_prefix():
    x = torch.arange(2 * 4 * 1, dtype=torch.float32).view(2, 4, 1)
    pad = torch.tensor([[False, False, True, True], [False, False, False, False]])
    torch.testing.assert_close(mean_pool(x, pad), torch.tensor([[0.5], [5.5]]))
    torch.testing.assert_close(mean_pool(x, pad, prefix=1), torch.tensor([[1.0], [6.0]]))


def test_pretrained_encoder_weights_are_loaded(tmp_path):
    from omnissl.ssl.wav2vec2 import Wav2Vec2

    pre = Wav2Vec2(builders.tiny("audio"), final_dim=16, codebook_entries=8, num_distractors=4)
    path = tmp_path / "pre.ckpt"
    torch.save({"state_dict": pre.state_dict()}, path)
    model = UtteranceClassifier(builders.tiny("audio"), num_classes=3, pretrained=str(path))
    for name, p in pre.encoder.state_dict().items():
        assert torch.equal(model.encoder.state_dict()[name], p), name
    with pytest.raises(FileNotFoundError):
        UtteranceClassifier(builders.tiny("audio"), num_classes=3, pretrained=str(tmp_path / "missing.ckpt"))


@pytest.mark.parametrize("kwargs,needle", [
    (dict(layer_decay=0.0), "layer_decay"), (dict(layer_decay=1.5), "layer_decay"),
    (dict(freeze_frontend_steps=-1), "freeze_frontend_steps"), (dict(freeze_encoder_steps=-2), "freeze_encoder_steps"),
    (dict(mask_prob=1.0), "mask_prob"), (dict(num_classes=1), "num_classes"), (dict(layer=5), "layer 5"),
])
def test_bad_settings_fail_at_construction(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        UtteranceClassifier(builders.tiny("audio"), **{"num_classes": 4, **kwargs})


@pytest.fixture(scope="module")
def keywords_root(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("OMNISSL_DATA", str(tmp_path_factory.getbasetemp() / "omnissl-data"))
    yield
    mp.undo()


def _keywords(**kw):
    from omnissl.datamodules.audio import AudioDataModule

    spec = "embedded:keywords:tiny"
    return AudioDataModule(train=spec, valid=spec, max_samples=None, min_samples=0,
                           max_tokens=None, batch_size=16, num_workers=0, **kw)


def test_num_classes_mismatch_fails_at_setup_naming_the_key(keywords_root):
    model = UtteranceClassifier(builders.tiny("audio"), num_classes=10)
    with pytest.raises(ValueError, match=r"model.init_args.num_classes=10 but the data has 12 classes"):
        _trainer(2).fit(model, _keywords())
    assert model.global_step == 0


def test_short_finetune_on_keywords_lowers_the_training_loss(keywords_root):
    losses = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    torch.manual_seed(0)
    model = UtteranceClassifier(builders.tiny("audio"), num_classes=12, layer_decay=0.75, optimizer=_sgd(3e-3))
    _trainer(16, [Record()]).fit(model, _keywords())
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    print(f"fine-tune loss: first 4 steps {first:.3f}, last 4 steps {last:.3f}")  # measured 2.52 -> 2.16
    assert first > 2.3  # about log(12) = 2.48 at the start
    assert last < first - 0.2


# ------------------------------------------------------------------------------------------------------ CTC


def test_ctc_error_rates_are_corpus_level_over_batches():
    from omnissl.eval.finetune import CTCRecognizer

    model = CTCRecognizer(builders.tiny("audio"), alphabet="|AB")  # ids: 0 blank, 1 "|", 2 "A", 3 "B"

    def lp_of(paths):  # (B, N) frame labels -> log-probs whose best path is exactly them
        return torch.nn.functional.one_hot(torch.tensor(paths), 4).float().log_softmax(-1) * 10

    # batch 1: "AB" read as "AB" (0 char edits / 2; 0 word edits / 1)
    model.score(lp_of([[2, 0, 3, 3, 0]]), torch.tensor([5]), ["AB"], "valid")
    # batch 2: "A B BA" read as "A BB" ("A B BA" -> "A BB": 2 char edits / 6; 2 word edits / 3) and "B" as ""
    model.score(lp_of([[2, 1, 3, 0, 3, 0], [0, 0, 0, 0, 0, 0]]), torch.tensor([6, 6]), ["A B BA", "B"], "valid")
    edits, chars, word_edits, words = model._errors["valid"].tolist()
    assert (edits, chars, word_edits, words) == (3, 9, 3, 5)  # CER 3/9 over the split, not the mean of 0 and 3/7


@pytest.fixture(scope="module")
def speech_tiny(keywords_root):
    from omnissl.datamodules.audio import AudioDataModule

    spec = "embedded:speech:tiny"  # 6 train / 2 valid sentences of 2-5 s, with .ltr / .wrd transcripts
    return AudioDataModule(train=spec, valid=spec, max_samples=None, min_samples=0,
                           max_tokens=None, batch_size=3, num_workers=0)


def test_short_ctc_finetune_lowers_the_loss_and_reports_cer(speech_tiny):
    from omnissl.eval.finetune import CTCRecognizer

    losses = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    torch.manual_seed(0)
    model = CTCRecognizer(builders.tiny("audio"), optimizer=_sgd(2e-3))
    trainer = _trainer(6, [Record()], limit_val_batches=1.0, val_check_interval=6, check_val_every_n_epoch=None)
    trainer.fit(model, speech_tiny)
    print(f"CTC loss per step: {[round(v, 2) for v in losses]}")  # measured 6.14 -> 3.36 in 6 steps
    assert losses[0] > 5.0 and losses[-1] < 0.7 * losses[0]
    cer = float(trainer.callback_metrics["val/cer"])
    assert 0.0 <= cer <= 1.0 and "val/wer" in trainer.callback_metrics
    # transcripts were attached by sample id: dataset index i -> manifest row rows[i] -> that line of train.wrd
    ds = speech_tiny.dataset("train")
    wrd = open(ds.source.replace(".tsv", ".wrd")).read().splitlines()
    assert model._texts["train"] == [wrd[int(r)] for r in ds.rows]


def test_ctc_alphabet_must_cover_the_training_transcripts(speech_tiny):
    from omnissl.eval.finetune import CTCRecognizer

    model = CTCRecognizer(builders.tiny("audio"), alphabet="|ABC")
    with pytest.raises(ValueError, match=r"characters \[.*'D'.*\] are not in model.init_args.alphabet='\|ABC'"):
        _trainer(1).fit(model, speech_tiny)
    with pytest.raises(ValueError, match="alphabet"):
        CTCRecognizer(builders.tiny("audio"), alphabet="AAB")


def test_temporary_freezing_under_ddp_needs_find_unused_parameters():
    from types import SimpleNamespace

    from torch.nn.parallel import DistributedDataParallel

    model = UtteranceClassifier(builders.tiny("audio"), num_classes=4, freeze_encoder_steps=2)
    ddp = DistributedDataParallel.__new__(DistributedDataParallel)  # the wrapped model, as the strategy holds it
    ddp.__dict__["find_unused_parameters"] = False
    model._trainer = SimpleNamespace(world_size=2, strategy=SimpleNamespace(model=ddp))
    with pytest.raises(ValueError, match="freeze_encoder_steps=2 .* ddp_find_unused_parameters_true"):
        model.on_fit_start()
    ddp.__dict__["find_unused_parameters"] = True
    model.on_fit_start()
    model._trainer = SimpleNamespace(world_size=2, strategy=SimpleNamespace(model=model))  # not DDP (e.g. FSDP)
    model.on_fit_start()
