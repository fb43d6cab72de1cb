"""The statistics of the learning benches (bench/learning.py): seed intervals, and the binomial interval that
marks a one-seed point (make demo)."""

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import learning  # noqa: E402


def test_t_interval_matches_student_t():
    ci = learning.t_interval([0.40, 0.45, 0.50])
    # mean 0.45, std 0.05, t(0.975, 2) = 4.302653
    assert ci["n"] == 3 and ci["mean"] == pytest.approx(0.45) and ci["std"] == pytest.approx(0.05)
    assert ci["hi"] - ci["mean"] == pytest.approx(4.302653 * 0.05 / math.sqrt(3), rel=1e-5)
    assert learning.fmt(ci) == "0.450 ± 0.050 [0.326, 0.574] (n=3)"


def test_one_seed_gets_the_binomial_interval_marked_as_such():
    ci = learning.seed_interval([0.4], n_test=1152)
    half = 1.959964 * math.sqrt(0.4 * 0.6 / 1152)
    assert ci["binomial"] and ci["lo"] == pytest.approx(0.4 - half, rel=1e-5)
    assert ci["hi"] == pytest.approx(0.4 + half, rel=1e-5)
    assert learning.fmt(ci) == "0.400 [0.372, 0.428] (n=1: binomial 95 %)"
    # without a test-set size there is no interval at all, and several seeds keep the t-interval
    assert learning.fmt(learning.seed_interval([0.4])) == "0.400 (n=1, no interval)"
    several = learning.seed_interval([0.40, 0.45, 0.50], n_test=1152)
    assert "binomial" not in several and several == learning.t_interval([0.40, 0.45, 0.50])


def test_learning_curve_hash_ignores_drawing_only_callbacks():
    """Adding the Pictures callback to recipes/trainer/cpu.yaml must not make the committed curve points stale;
    any other change of the trainer recipe must."""
    import learning_curve

    text = (Path(__file__).resolve().parents[1] / "recipes/trainer/cpu.yaml").read_text()
    stripped = learning_curve.without_drawing_callbacks(text)
    assert "omnissl.train.pictures.Pictures" in text and "Pictures" not in stripped
    assert "LearningRateMonitor" in stripped and "every_n_train_steps: 50" in stripped
    assert "seed_everything: 0" in stripped and len(text.splitlines()) - len(stripped.splitlines()) == 3


def test_hubert_units_follow_the_recipe_its_corpus_and_its_cluster_count(monkeypatch):
    """The learning benches make HuBERT's iteration-1 units that the recipe (and --extra) names: features,
    cmvn and K from the units name, the training corpus's own file extension for a corpus other than `small`,
    and a clear stop when the model's class count disagrees with the units'."""
    import omnissl.eval.units as units

    calls = []
    monkeypatch.setattr(units, "make_units", lambda *a, **k: calls.append((a, k)))
    assert learning.hubert_units([], 0) == []  # the recipe's own km50: 50 MFCC units of `small`
    (train,), kw = calls[-1]
    assert train == "embedded:small" and kw["valid"] == "embedded:small" and kw["out_ext"] == "km50"
    assert (kw["features"], kw["normalize"], kw["clusters"]) == ("mfcc", False, 50)
    extra = ["--data.init_args.train=embedded:default", "--data.init_args.units=km100-logmel-cmvn",
             "--model.init_args.num_classes", "100"]
    assert learning.hubert_units(extra, 0) == [*extra, "--data.init_args.units=km100-logmel-cmvn-default"]
    (train,), kw = calls[-1]
    assert train == "embedded:default" and kw["out_ext"] == "km100-logmel-cmvn-default"
    assert (kw["features"], kw["normalize"], kw["clusters"]) == ("logmel", True, 100)
    with pytest.raises(SystemExit, match="units km100-cmvn have 100 clusters but model.init_args.num_classes is 50"):
        learning.hubert_units(["--data.init_args.units=km100-cmvn"], 0)
    n = len(calls)  # iteration 2's units (made by learning_curve.py) are left alone
    assert learning.hubert_units(["--data.init_args.units=km-it2-abc-L2-K100"], 0) == \
        ["--data.init_args.units=km-it2-abc-L2-K100"]
    assert len(calls) == n


def test_hubert2_units_are_per_seed_and_of_iteration_1s_block(monkeypatch, tmp_path):
    """Iteration 2's units are written beside the corpus under a name of their own per seed (two seeds run in
    parallel never rewrite each other's targets mid-run), from the chosen block of that seed's iteration-1
    checkpoint, and iteration 2 is told their file and class count."""
    import learning_curve

    key1 = learning_curve.config_hash("hubert", learning_curve.steps_for("hubert", 5), [])
    for seed in (0, 1):
        run1 = tmp_path / "hubert" / f"5min-seed{seed}-{key1}"
        (run1 / "r" / "checkpoints").mkdir(parents=True)
        (run1 / "r" / "checkpoints" / "last.ckpt").write_bytes(b"")
    monkeypatch.setattr(learning_curve, "RUNS", tmp_path.parent)
    monkeypatch.setattr(learning_curve, "run_point", lambda *a, **k: None)
    calls = []
    monkeypatch.setattr(learning, "hubert_units_iter2", lambda *a: calls.append(a))
    args = [learning_curve.hubert2_extra(5, seed, ["keywords"], tmp_path.name, [], False) for seed in (0, 1)]
    exts = [c[3] for c in calls]
    layer = learning_curve.HUBERT2_LAYER
    assert exts[0] != exts[1] and all(f"-seed{s}-L{layer}-K100" in e for s, e in zip((0, 1), exts))
    assert [c[0].parts[-4] for c in calls] == [f"5min-seed{s}-{key1}" for s in (0, 1)]
    assert [c[1:3] for c in calls] == [(layer, 100)] * 2
    assert args[1] == [f"--data.init_args.units={exts[1]}", "--model.init_args.num_classes=100"]


def test_a_budget_buys_the_steps_of_its_precision():
    """A budget in idle minutes turns into the steps of the recipe at the trainer precision the run sets: bf16
    autocast steps are faster on this CPU, so a bf16 run of the same budget takes more of them; a precision never
    calibrated is refused before any training, naming how to calibrate it."""
    import learning_curve

    bf16 = ["--data.init_args.train=embedded:default", "--trainer.precision=bf16-mixed"]
    assert learning_curve.precision(bf16) == "bf16-mixed" and learning_curve.precision([]) == "32"
    for objective in learning_curve.OBJECTIVES:
        fp32, half = learning_curve.steps_for(objective, 20), learning_curve.steps_for(objective, 20, bf16)
        assert fp32 == round(1200 / learning_curve.IDLE_STEP_S[objective] / 10) * 10
        assert half == round(1200 / learning_curve.IDLE_STEP_S_BF16[objective] / 10) * 10 and half > fp32
    with pytest.raises(ValueError, match=r"trainer.precision=16-mixed.*--calibrate --objectives wav2vec2"):
        learning_curve.steps_for("wav2vec2", 5, ["--trainer.precision=16-mixed"])


def test_a_variant_that_changes_the_step_buys_the_steps_of_its_own_calibration(monkeypatch, tmp_path):
    """A recipe variant that changes what a step computes (a deeper encoder) cannot borrow the recipe's step time:
    without its tag's calibration it is refused, naming the command that measures it; with one, its budget is
    that calibration's steps; a calibration made for other arguments is refused too. A variant that changes no
    compute (another corpus, a schedule) keeps the precision's table."""
    import learning_curve

    monkeypatch.setattr(learning_curve, "RESULTS", tmp_path)
    deeper = ["--trainer.precision=bf16-mixed", "--model.init_args.encoder.init_args.depth=6"]
    assert learning_curve.changes_compute(deeper) == deeper[1:]
    assert learning_curve.changes_compute(["--data.init_args.train=embedded:default",
                                           "--model.init_args.lr_scheduler.init_args.warmup_steps=60"]) == []
    with pytest.raises(ValueError, match=r"depth=6 changes the step time.*--calibrate --tag deep"):
        learning_curve.steps_for("data2vec2", 20, deeper, "deep")
    learning_curve.write_json(tmp_path / "deep" / "calibration.json",
                              {"extra": deeper, "suggested_idle_step_s": {"data2vec2": 0.12}})
    assert learning_curve.steps_for("data2vec2", 20, deeper, "deep") == 10000
    with pytest.raises(ValueError, match=r"calibration.json was measured for .*depth=6.*not .*depth=8"):
        learning_curve.steps_for("data2vec2", 20, [deeper[0], "--model.init_args.encoder.init_args.depth=8"], "deep")
    with pytest.raises(ValueError, match=r"not .* and wav2vec2"):
        learning_curve.steps_for("wav2vec2", 20, deeper, "deep")
    (tmp_path / "deep" / "calibration.json").write_text("{truncated")
    with pytest.raises(ValueError, match=r"deep/calibration.json: not a calibration record"):
        learning_curve.steps_for("data2vec2", 20, deeper, "deep")
    # the recipes' own tags have no calibration of their own: the tables, as before
    assert learning_curve.steps_for("data2vec2", 20, deeper[:1], "bf16-default") == \
        round(1200 / learning_curve.IDLE_STEP_S_BF16["data2vec2"] / 10) * 10


def test_the_invariant_probe_scores_any_rotation_of_the_features_alike():
    """bench/invariant_probe.py's logistic probe (centered, one scalar scale, L2 logistic regression to
    convergence, C on valid) gives the same C and accuracies to the features in any orthonormal basis, even
    where the dimensions' scales differ by 100x (which per-dimension standardization would undo); and it
    learns: well above chance on separable classes."""
    import numpy as np

    import invariant_probe

    rng = np.random.default_rng(0)
    centers = rng.normal(size=(4, 12)) * np.linspace(0.05, 5, 12)

    def split(n):
        y = rng.integers(0, 4, n)
        return centers[y] + rng.normal(size=(n, 12)) * np.linspace(0.1, 10, 12), y

    data = [split(200), split(100), split(100)]
    q, _ = np.linalg.qr(rng.normal(size=(12, 12)))
    plain = invariant_probe.logistic(*data)
    rotated = invariant_probe.logistic(*[(x @ q, y) for x, y in data])
    assert plain["C"] == rotated["C"]
    assert plain["test"] == pytest.approx(rotated["test"], abs=0.011) and plain["valid"] == pytest.approx(
        rotated["valid"], abs=0.011)  # one clip of 100 at most: L-BFGS stops at a tolerance, not at the optimum
    assert plain["test"] > 0.6
