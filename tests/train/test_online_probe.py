"""Online probe and kNN monitor during pretraining: metrics in the CSV log of a real (short) wav2vec 2.0 fit,
state restored exactly from the checkpoint, the pretraining run unchanged by the probe, kNN against hand-computed
answers, feature merging across ranks, and bad configs failing at set-up."""

import copy
from pathlib import Path

import pytest
import torch

from omnissl.eval.online_probe import OnlineProbe, knn_predict, unique_by_id

ROOT = Path(__file__).resolve().parents[2]
DEBUG = str(ROOT / "recipes/trainer/debug.yaml")
W2V = str(ROOT / "recipes/audio/wav2vec2_tiny_cpu.yaml")
PROBE = ROOT / "recipes/trainer/online_probe_keywords.yaml"
KW = "embedded:keywords:tiny"  # 48 train / 12 valid clips of 1 s, 12 keywords

# pretraining data: the same tiny clips (labels unused by wav2vec 2.0), so only one small corpus is generated
# and 0.5 s crops: the conv extractor dominates the time of these CPU runs
PRETRAIN = [f"--data.init_args.train={KW}", f"--data.init_args.valid={KW}",
            "--data.init_args.min_samples=0", "--data.init_args.num_workers=0", "--data.init_args.max_samples=8000",
            "--data.init_args.batch_size=4", "--model.init_args.num_distractors=10",
            "--model.init_args.lr_scheduler.init_args.warmup_steps=2"]  # the schedule follows max_steps (a few)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("OMNISSL_DATA", str(tmp_path_factory.getbasetemp() / "omnissl-data"))
    mp.setenv("WANDB_MODE", "offline")
    yield tmp_path_factory
    mp.undo()


def _probe_recipe(folder: Path, *, train=KW, every=2) -> str:
    """The shipped probe recipe, pointed at the tiny keywords and probing every 2 steps."""
    text = PROBE.read_text().replace("embedded:keywords:small", KW).replace("every_n_steps: 100", f"every_n_steps: {every}")
    text = text.replace("knn_k: 20", "knn_k: 5").replace(f"train: {KW}", f"train: {train}")
    text = text.replace("max_samples: null", "max_samples: 8000")
    assert f"every_n_steps: {every}" in text and "knn_k: 5" in text and "max_samples: 8000" in text
    path = folder / "probe.yaml"
    path.write_text(text)
    return str(path)


def _fit(folder: Path, *, probe: bool, steps: int = 4, ckpt: str | None = None, train=KW):
    from omnissl.cli import lightning_cli

    folder.mkdir(parents=True, exist_ok=True)
    args = ["fit", "-c", DEBUG] + (["-c", _probe_recipe(folder, train=train)] if probe else []) + ["-c", W2V]
    args += PRETRAIN + [f"--trainer.max_steps={steps}", f"--trainer.default_root_dir={folder}",
                        f"--trainer.logger.init_args.save_dir={folder}"]
    if ckpt:
        args += [f"--ckpt_path={ckpt}"]
    cli = lightning_cli(args)
    probes = [c for c in cli.trainer.callbacks if isinstance(c, OnlineProbe)]
    return cli, (probes[0] if probes else None)


@pytest.fixture(scope="module")
def probed_run(env):
    folder = env.mktemp("probed")
    cli, cb = _fit(folder, probe=True)
    ckpt = next(folder.glob("**/last.ckpt"))
    return folder, cli, cb, copy.deepcopy(cb.state_dict()), ckpt


def test_probe_metrics_are_logged_beside_the_pretraining_loss(probed_run):
    import csv

    folder, _, cb, _, _ = probed_run
    rows = list(csv.DictReader(next(folder.glob("**/metrics.csv")).open()))
    probe_rows = [r for r in rows if r.get("probe/acc")]
    assert [int(r["step"]) for r in probe_rows] == [1, 3]  # after optimizer steps 2 and 4 (Lightning's step axis)
    for r in probe_rows:
        for key in ("probe/acc", "probe/knn_acc", "probe/loss", "probe/train_acc", "probe/train_loss"):
            assert 0.0 <= float(r[key]) < 10.0, key
        hits = float(r["probe/acc"]) * 12  # 12 valid clips
        assert abs(hits - round(hits)) < 1e-4
    assert any(r.get("train/loss") for r in rows)
    assert cb.num_probes == 2 and cb.last_step == 4
    # the classifier trained: the second probe fits the train split better than chance
    assert float(probe_rows[-1]["probe/train_acc"]) > 1 / 12


def test_resume_restores_the_probe_state_exactly(probed_run, env):
    _, _, cb, saved, ckpt = probed_run
    stored = torch.load(ckpt, map_location="cpu", weights_only=False)["callbacks"][cb.state_key]
    assert stored["last_step"] == 4 and stored["num_probes"] == 2
    # a fresh run resumed from the checkpoint for one more step (no probe due at step 5: the state is the restored one;
    # a run already at max_steps is not started at all, omnissl/train/runs.py)
    _, again = _fit(env.mktemp("resumed"), probe=True, steps=5, ckpt=str(ckpt))
    assert again is not cb and again.last_step == 4 and again.num_probes == 2
    clf = again._ensure_classifier(torch.device("cpu"))
    for k, v in saved["classifier"].items():
        assert torch.equal(clf.state_dict()[k], v), k
    opt_now, opt_saved = again.optimizer.state_dict(), saved["optimizer"]
    assert opt_now["param_groups"] == opt_saved["param_groups"]
    for i, state in opt_saved["state"].items():
        for name, value in state.items():
            assert torch.equal(torch.as_tensor(opt_now["state"][i][name]), torch.as_tensor(value)), (i, name)
    assert again.metrics == saved["metrics"]


def test_the_probe_never_changes_the_pretraining_run(probed_run, env):
    """Same seed, same steps, with and without the probe: bit-identical weights (no gradient reaches the model
    from the probe, and the probe leaves the run's random state alone)."""
    _, with_probe, _, _, _ = probed_run
    without, none = _fit(env.mktemp("unprobed"), probe=False)
    assert none is None
    a, b = with_probe.model.state_dict(), without.model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_probe_features_carry_no_gradient(probed_run):
    _, cli, cb, _, _ = probed_run
    enc = cli.model.encoder
    enc.train()
    feats, labels = cb.features(cli.trainer, enc, cb.data.train_dataloader(), torch.device("cpu"))
    assert not feats.requires_grad and feats.grad_fn is None
    assert feats.shape == (48, enc.dim) and labels.shape == (48,) and labels.unique().numel() == 12
    assert enc.training  # back in the mode it was in


def test_knn_on_separable_features_is_perfect():
    g = torch.Generator().manual_seed(0)
    centers = torch.eye(4) * 10
    labels = torch.arange(4).repeat_interleave(10)
    memory = centers[labels] + torch.randn(40, 4, generator=g)
    queries = centers[torch.arange(4).repeat(5)] + torch.randn(20, 4, generator=g)
    for temperature in (0.07, None):
        pred = knn_predict(memory, labels, queries, k=5, num_classes=4, temperature=temperature)
        assert torch.equal(pred, torch.arange(4).repeat(5))


def test_knn_matches_a_hand_computed_case():
    # memory on the unit circle at 0, 10, 20 degrees (class 0) and 30, 60 degrees (class 1); query at 45 degrees
    deg = torch.tensor([0.0, 10.0, 20.0, 30.0, 60.0]) * torch.pi / 180
    memory = torch.stack([deg.cos(), deg.sin()], 1) * torch.tensor([[1.0], [2.0], [3.0], [0.5], [4.0]])  # norms ignored
    labels = torch.tensor([0, 0, 0, 1, 1])
    q = torch.tensor([[1.0, 1.0]])
    # k = 3 nearest by angle: 30 (cls 1), 60 (cls 1), 20 (cls 0) -> majority: class 1
    assert knn_predict(memory, labels, q, k=3, num_classes=2, temperature=None).item() == 1
    # k = 5, majority: 3 x class 0 vs 2 x class 1 -> class 0
    assert knn_predict(memory, labels, q, k=5, num_classes=2, temperature=None).item() == 0
    # k = 5 weighted by exp(cos / T): class 1 gets exp(cos 15 / T) * 2 > class 0's three weaker votes at T = 0.1
    cos = torch.cos(torch.tensor([45.0, 35.0, 25.0, 15.0, 15.0]) * torch.pi / 180)
    w = (cos / 0.1).exp()
    assert w[3:].sum() > w[:3].sum()
    assert knn_predict(memory, labels, q, k=5, num_classes=2, temperature=0.1).item() == 1
    # a tie goes to the smaller class index
    tie = knn_predict(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([1, 0]), q, k=2, num_classes=2,
                      temperature=None)
    assert tie.item() == 0
    with pytest.raises(ValueError, match="k=6"):
        knn_predict(memory, labels, q, k=6, num_classes=2)


def test_features_from_several_ranks_merge_by_id():
    # two ranks' shards, the second padded with a repeat of item 0 (as DistributedSampler / bucketing pad)
    ids = torch.tensor([4, 0, 2, 1, 3, 0])
    feats = torch.tensor([[4.0], [0.0], [2.0], [1.0], [3.0], [0.0]])
    labels = ids % 2
    u_ids, u_feats, u_labels = unique_by_id(ids, feats, labels)
    assert u_ids.tolist() == [0, 1, 2, 3, 4]
    assert u_feats.flatten().tolist() == [0.0, 1.0, 2.0, 3.0, 4.0] and u_labels.tolist() == [0, 1, 0, 1, 0]


def test_bad_settings_fail_at_construction():
    from omnissl.datamodules.audio import AudioDataModule

    dm = AudioDataModule(train=KW, valid=KW)
    for kwargs, needle in [(dict(every_n_steps=0), "every_n_steps must be > 0, got 0"),
                           (dict(every_n_steps=-5), "every_n_steps"), (dict(knn_k=0), "knn_k"),
                           (dict(knn_temperature=0.0), "knn_temperature"), (dict(lr=0.0), "lr")]:
        with pytest.raises(ValueError, match=needle):
            OnlineProbe(dm, **kwargs)


def test_unlabeled_probe_data_fails_at_setup_before_any_step(env):
    from omnissl.datamodules.corpora import embedded_corpus

    labeled = embedded_corpus(KW, size="default")["train"]
    folder = env.mktemp("unlabeled")
    lines = labeled.read_text().splitlines()
    unlabeled = folder / "train.tsv"
    unlabeled.write_text("\n".join([lines[0]] + ["\t".join(ln.split("\t")[:2]) for ln in lines[1:]]) + "\n")
    with pytest.raises(ValueError, match=r"OnlineProbe data \(AudioDataModule\) has no labels"):
        _fit(folder, probe=True, train=str(unlabeled))
    assert not list(folder.glob("**/*.ckpt")) and not list(folder.glob("**/metrics.csv"))


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_probe_on_two_processes_merges_the_shards(strategy, env, tmp_path):
    """2 CPU processes, the probe data sharded by its loader: the merged features are every clip once, equal to
    per-clip features, and both ranks end with the same classifier (~25 s each on 2 cores)."""
    import json
    import os
    import subprocess
    import sys

    out = tmp_path / "summary.json"
    script = Path(__file__).with_name("probe_ddp_run.py")
    proc = subprocess.run([sys.executable, str(script), strategy, str(out)], capture_output=True, text=True,
                          timeout=600, cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = json.loads(out.read_text())
    assert s["shard_items"] == [24, 24] and s["items"] == s["dataset"] == 48
    assert s["max_feature_diff"] < 1e-4 and s["labels_equal"] and s["ranks_equal"] and s["num_probes"] == 1


def test_probes_once_per_n_optimizer_steps_under_gradient_accumulation(monkeypatch):
    from types import SimpleNamespace

    from omnissl.datamodules.audio import AudioDataModule

    cb = OnlineProbe(AudioDataModule(train=KW, valid=KW), every_n_steps=2)
    ran = []
    monkeypatch.setattr(cb, "run", lambda trainer, pl_module: ran.append(trainer.global_step) or {})
    for step in [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]:  # global_step seen after each of 10 micro-batches (accumulate 2)
        cb.on_train_batch_end(SimpleNamespace(global_step=step, loggers=[]), None, None, None, 0)
    assert ran == [2, 4] and cb.num_probes == 2 and cb.last_step == 4
