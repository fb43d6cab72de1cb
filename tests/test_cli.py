"""The CLI as a user runs it: console script and cli.py shim, print_config round trip, bad configs,
and every recipe parsing."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SMALL = str(ROOT / "recipes/audio/mae_tiny_synthetic.yaml")
DEBUG = str(ROOT / "recipes/trainer/debug.yaml")
OMNISSL = str(Path(sys.executable).parent / "omnissl")


def _run(cmd, cwd, check=True):
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline")
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    if check and out.returncode != 0:
        raise AssertionError(f"{cmd} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return out


@pytest.mark.parametrize("entry", ["console", "shim"])
def test_fit_runs_and_writes_checkpoint(tmp_path, entry):
    cmd = [OMNISSL] if entry == "console" else [sys.executable, str(ROOT / "cli.py")]
    _run(cmd + ["fit", "-c", DEBUG, "-c", SMALL], cwd=tmp_path)
    ckpts = sorted(p.name for p in tmp_path.glob("runs/debug/**/*.ckpt"))
    assert "last.ckpt" in ckpts and any(name.startswith("epoch=0-step=4") for name in ckpts)
    metrics = next(tmp_path.glob("runs/debug/**/metrics.csv")).read_text()
    assert "train/loss" in metrics and "val/loss" in metrics


def test_print_config_reruns_unchanged(tmp_path):
    printed = _run([OMNISSL, "fit", "-c", DEBUG, "-c", SMALL, "--print_config"], cwd=tmp_path).stdout
    cfg = tmp_path / "config.yaml"
    cfg.write_text(printed)
    again = _run([OMNISSL, "fit", "-c", str(cfg), "--print_config"], cwd=tmp_path).stdout
    assert again == printed
    _run([OMNISSL, "fit", "-c", str(cfg), "--trainer.max_steps", "2"], cwd=tmp_path)
    assert list(tmp_path.glob("runs/debug/**/last.ckpt"))


@pytest.mark.parametrize(
    "extra,needle",
    [
        (["--model.init_args.mask_ratioo", "0.5"], "mask_ratioo"),
        (["--model.init_args.mask_ratio", "lots"], "mask_ratio"),
        (["--data.init_args.batch_size", "-"], "batch_size"),
    ],
)
def test_bad_config_fails_before_work_naming_key(tmp_path, extra, needle):
    out = _run([OMNISSL, "fit", "-c", DEBUG, "-c", SMALL] + extra, cwd=tmp_path, check=False)
    assert out.returncode != 0
    assert needle in out.stderr
    assert not (tmp_path / "runs").exists()


def test_value_errors_in_constructors_fail_before_training(tmp_path):
    out = _run([OMNISSL, "fit", "-c", DEBUG, "-c", SMALL, "--model.init_args.mask_ratio", "1.5"], cwd=tmp_path,
               check=False)
    assert out.returncode != 0 and "mask_ratio must be in (0, 1), got 1.5" in out.stderr
    assert not list(tmp_path.glob("runs/**/*.ckpt"))


MODEL_RECIPES = sorted(p for p in (ROOT / "recipes").rglob("*.yaml") if p.parent.name not in ("trainer", "sweeps"))
TRAINER_RECIPES = sorted((ROOT / "recipes/trainer").glob("*.yaml"))


@pytest.mark.parametrize("recipe", MODEL_RECIPES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_model_recipe_parses_and_instantiates(recipe, tmp_path, monkeypatch):
    from omnissl.cli import lightning_cli

    monkeypatch.chdir(tmp_path)
    head = recipe.read_text().lstrip().splitlines()[0]
    assert head.startswith("#"), f"{recipe} must open with a comment naming its source and command"
    args = ["-c", DEBUG, "-c", str(recipe)]
    if "warmup_steps:" in recipe.read_text():  # debug.yaml's 4 steps: the schedule's total follows max_steps
        args += ["--model.init_args.lr_scheduler.init_args.warmup_steps", "1"]
    cli = lightning_cli(args, run=False)
    assert cli.model is not None and cli.datamodule is not None


@pytest.mark.parametrize("recipe", TRAINER_RECIPES, ids=lambda p: p.name)
def test_every_trainer_recipe_parses(recipe, tmp_path, monkeypatch):
    from omnissl.cli import lightning_cli

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    args = ["-c", str(recipe), "-c", SMALL]
    if "max_steps" not in recipe.read_text():  # an overlay: stacked on the trainer recipe its header names
        base = "cpu.yaml" if "recipes/trainer/cpu.yaml" in recipe.read_text() else "default.yaml"
        args = ["-c", str(ROOT / "recipes/trainer" / base)] + args
    if "accelerator: gpu" in recipe.read_text():  # no GPU here: parse everything, instantiate on the CPU
        args += ["--trainer.accelerator", "cpu", "--trainer.devices", "1"]
    cli = lightning_cli(args, run=False)
    assert cli.trainer is not None


# ---------------------------------------------------------------------------------------------------------
# The dispatch table: every subcommand listed, helps with defaults, known failures in one line

COMMANDS = ["fit", "validate", "test", "data", "hubert-units", "export", "probe", "features", "pll", "zeroshot"]


def test_help_lists_every_subcommand_and_version():
    out = _run([OMNISSL, "--help"], cwd=ROOT).stdout
    listed = [line.split()[0] for line in out.splitlines() if line.startswith("  ")]
    assert listed == COMMANDS
    assert all(len(line.split()) > 1 for line in out.splitlines() if line.startswith("  "))  # one line of help each
    from omnissl import __version__

    assert _run([OMNISSL, "--version"], cwd=ROOT).stdout.strip() == f"omnissl {__version__}"


@pytest.mark.parametrize("argv", [["data", "generate"], ["data", "manifest"], ["data", "inspect"], ["hubert-units"],
                                  ["export"], ["features"], ["pll"], ["zeroshot"]])
def test_every_argparse_option_has_help_and_shows_its_default(argv):
    import argparse

    from omnissl.commands import data, export, features, hubert_units, pll, zeroshot

    parser = {"data": data.parser, "hubert-units": hubert_units.parser, "export": export.parser,
              "features": features.parser, "pll": pll.parser, "zeroshot": zeroshot.parser}[argv[0]]()
    if argv[0] == "data":
        parser = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[argv[1]]
    text = " ".join(parser.format_help().split())  # unwrapped
    for action in parser._actions:
        assert action.help, f"{argv}: {action.option_strings or action.dest} has no help"
        if action.option_strings and action.default not in (None, argparse.SUPPRESS) and action.nargs != 0:
            assert f"(default: {action.default})" in text, f"{argv}: {action.option_strings} hides its default"


def test_predict_and_unknown_commands_fail_in_one_line(tmp_path):
    for argv, needle in ((["predict", "-c", DEBUG, "-c", SMALL], "predict is not supported"),
                         (["frobnicate"], "unknown command 'frobnicate'")):
        out = _run([OMNISSL] + argv, cwd=tmp_path, check=False)
        assert out.returncode == 2 and f"omnissl: error: {needle}" in out.stderr and "Traceback" not in out.stderr
    from omnissl.cli import lightning_cli

    with pytest.raises(SystemExit):  # LightningCLI itself no longer offers predict
        lightning_cli(["predict", "-c", DEBUG, "-c", SMALL])
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("argv, needle", [
    (["export", "missing.ckpt", "out"], "omnissl export: error: no checkpoint at missing.ckpt"),
    (["features", "missing.ckpt", "x.tsv", "--layer", "1", "--out", "f"], "omnissl features: error: "),
    (["hubert-units", "--manifest", "missing.tsv"], "omnissl hubert-units: error: manifest missing.tsv does not exist"),
    (["data", "manifest", "nowhere", "--out", "m.tsv"], "omnissl data manifest: error: nowhere is not a folder"),
])
def test_known_failures_are_one_line_not_a_traceback(tmp_path, argv, needle):
    out = _run([OMNISSL] + argv, cwd=tmp_path, check=False)
    assert out.returncode != 0 and needle in out.stderr and "Traceback" not in out.stderr, out.stderr
