"""The non-learned audio baseline of `omnissl probe --baseline` and the statistics of the learning benches."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch
import torchaudio

from omnissl.batch import Batch
from omnissl.eval.upstream import LogMelStates, baseline_states, extract

ROOT = Path(__file__).resolve().parents[2]


def audio_batch(lengths: list[int], seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(len(lengths), max(lengths))
    for i, n in enumerate(lengths):
        t = torch.arange(n) / 16_000
        x[i, :n] = 0.3 * torch.sin(2 * math.pi * (200 + 300 * i) * t * (1 + t)) + 0.01 * torch.randn(n, generator=g)
    return Batch({"audio": x}, lengths={"audio": torch.tensor(lengths)}, targets={"label": torch.arange(len(lengths))},
                 ids=torch.arange(len(lengths)))


def test_audio_baseline_pools_log_mel_mean_and_std_per_utterance():
    """Mean pooling of the baseline's frames gives each utterance's log-mel mean and standard deviation over
    its own frames; padding in a batch changes nothing."""
    states = baseline_states("audio")
    assert isinstance(states, LogMelStates) and states.dim == 128 and states.samples_per_token == 160
    lengths = [16_000, 9_000, 12_345]
    pooled = extract(states, [audio_batch(lengths)]).x  # (3, 1, 128)
    mel = torchaudio.transforms.MelSpectrogram(16_000, n_fft=400, hop_length=160, n_mels=64, center=False)
    for i, n in enumerate(lengths):
        m = torch.log(mel(audio_batch(lengths).inputs["audio"][i, :n]) + 1e-6)  # (64, frames)
        assert m.shape[1] == (n - 400) // 160 + 1
        expected = torch.cat([m.mean(1), m.std(1, unbiased=False)])
        torch.testing.assert_close(pooled[i, 0], expected, atol=1e-4, rtol=1e-4)
        alone = Batch({"audio": audio_batch(lengths).inputs["audio"][i:i + 1, :n]},
                      targets={"label": torch.tensor([i])}, ids=torch.tensor([i]))
        torch.testing.assert_close(extract(states, [alone]).x[0], pooled[i], atol=1e-4, rtol=1e-4)


def test_mfcc_and_delta_variants_have_the_declared_width_and_bad_settings_fail():
    batch = audio_batch([8_000, 6_000])
    for states, dim in ((LogMelStates(64, std=False), 64), (LogMelStates(64, deltas=1), 256),
                        (LogMelStates(64, n_mfcc=20, deltas=2), 120), (LogMelStates(80), 160)):
        hs, valid = states(batch)
        assert states.dim == dim and hs.shape[-1] == dim and hs.shape[2] == 1
        assert valid.sum(1).tolist() == [(8_000 - 400) // 160 + 1, (6_000 - 400) // 160 + 1]
    with pytest.raises(ValueError, match="deltas must be 0, 1 or 2"):
        LogMelStates(deltas=3)
    with pytest.raises(ValueError, match="n_mfcc must be in 1..n_mels=64"):
        LogMelStates(n_mfcc=65)
    with pytest.raises(ValueError, match="shorter than one 25 ms frame"):
        LogMelStates()(audio_batch([16_000, 300]))


@pytest.fixture(scope="module")
def learning():
    spec = importlib.util.spec_from_file_location("learning", ROOT / "bench" / "learning.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_t_interval_and_welch_comparison(learning):
    ci = learning.t_interval([0.3, 0.4, 0.5])
    assert ci["n"] == 3 and ci["mean"] == pytest.approx(0.4) and ci["std"] == pytest.approx(0.1)
    half = 4.302652729911275 * 0.1 / math.sqrt(3)  # t(0.975, 2 degrees of freedom)
    assert (ci["lo"], ci["hi"]) == pytest.approx((0.4 - half, 0.4 + half))
    one = learning.t_interval([0.7])
    assert one["lo"] == -math.inf and one["hi"] == math.inf and "no interval" in learning.fmt(one)
    assert learning.fmt(ci) == "0.400 ± 0.100 [0.152, 0.648] (n=3)"
    assert learning.binomial_se(0.5, 1100) <= 0.0151
    far = learning.compare([0.50, 0.51, 0.52], [0.30, 0.31, 0.29])
    near = learning.compare([0.50, 0.41, 0.60], [0.45, 0.55, 0.40])
    assert far["significant"] and far["diff"] == pytest.approx(0.21) and not near["significant"]
    with pytest.raises(ValueError, match="no values"):
        learning.t_interval([])


def test_learning_curve_skips_fresh_results_redoes_stale_ones_and_reports(tmp_path, monkeypatch, capsys):
    """Resumability across sessions: a result made with the current configuration is kept, one made with
    another recipe/steps/corpus is redone and left out of the report; the report draws the table and PNG."""
    import json
    import sys

    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    sys.modules.pop("learning_curve", None)
    import learning_curve as lc

    monkeypatch.setattr(lc, "RESULTS", tmp_path)
    steps = lc.steps_for("wav2vec2", 5)
    assert steps == 4840 and lc.steps_for("data2vec2", 5) == 2050  # the budgets the README states
    key = lc.config_hash("wav2vec2", steps, [])
    assert key != lc.config_hash("wav2vec2", steps, ["--model.init_args.mask_prob=0.5"])
    assert key != lc.config_hash("wav2vec2", steps + 10, [])

    def record(seed, minutes, acc, config):
        return {"objective": "wav2vec2", "seed": seed, "minutes": minutes, "steps": steps if minutes else 0,
                "planned_steps": steps, "extra": [], "config": config, "task": "keywords", "wall_s": 600.0,
                "probe": {"test": acc, "valid": acc, "per_layer_test": [acc, acc - 0.01], "best_layer": 0,
                          "n_test": 1152}}

    path = lc.result_path("t", "wav2vec2", 5, 0, "keywords")
    assert not lc.fresh(path, key)  # missing
    lc.write_json(path, record(0, 5, 0.40, "0123456789ab"))
    assert not lc.fresh(path, key) and "redoing it" in capsys.readouterr().out  # stale
    for seed, acc in enumerate([0.40, 0.42, 0.44]):
        lc.write_json(lc.result_path("t", "wav2vec2", 5, seed, "keywords"), record(seed, 5, acc, key))
        lc.write_json(lc.result_path("t", "wav2vec2", 0, seed, "keywords"),
                      record(seed, 0, 0.15, lc.config_hash("wav2vec2", 0, [])))
    lc.write_json(lc.result_path("t", "wav2vec2", 10, 0, "keywords"), record(0, 10, 0.9, "stale0000000"))
    assert lc.fresh(path, key)
    lc.write_json(tmp_path / "t" / "baseline-keywords.json",
                  {"config": lc.baseline_key(), "probe": {"test": 0.34, "se": 0.014, "n_test": 1152,
                                                          "chance": 1 / 12, "seeds": [0, 1, 2]}})
    points = lc.collect("t")
    assert sorted(points) == [("keywords", "wav2vec2", 0), ("keywords", "wav2vec2", 5)]  # the stale 10 min left out
    lc.report("t", ["keywords"], commit=False)
    out = capsys.readouterr().out
    assert "RESULT name=learning_curve task=keywords objective=wav2vec2 minutes=5 steps=4840 mean=0.4200" in out
    assert "0.420 ± 0.020 [0.370, 0.470] (n=3)" in (tmp_path / "t" / "results.md").read_text()
    assert (tmp_path / "t" / "learning_curve.png").stat().st_size > 10_000
    assert json.loads(path.read_text())["config"] == key


def test_hubert_iteration_one_is_pretrained_again_for_iteration_two_when_only_its_jsons_are_here(tmp_path,
                                                                                               monkeypatch):
    """Iteration 2 needs iteration 1's checkpoint: JSONs copied from another checkout (no run folder here) must
    not count as done for it, while a plain iteration-1 point with the same JSONs is done."""
    import sys

    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    sys.modules.pop("learning_curve", None)
    import learning_curve as lc

    monkeypatch.setattr(lc, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(lc, "RUNS", tmp_path / "runs")
    for minutes in (0, 5):
        key = lc.config_hash("hubert", lc.steps_for("hubert", minutes), [])
        for task in ("keywords", "speakers"):
            lc.write_json(lc.result_path("t", "hubert", minutes, 0, task), {"config": key})
    calls = []

    def fake_pretrain(objective, steps, seed, run_dir, extra):
        calls.append((objective, steps, seed))
        raise SystemExit("pretrain called")

    monkeypatch.setattr(lc.learning, "pretrain", fake_pretrain)
    lc.run_point("hubert", 5, 0, ["keywords", "speakers"], "t", [], commit=False)
    assert calls == []
    with pytest.raises(SystemExit, match="pretrain called"):
        lc.run_point("hubert", 5, 0, ["keywords", "speakers"], "t", [], commit=False, keep_run=True)
    assert calls == [("hubert", lc.steps_for("hubert", 5), 0)]
