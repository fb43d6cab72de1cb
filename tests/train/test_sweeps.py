"""Every W&B sweep in recipes/sweeps/: the command line W&B's agent would run for sample parameter values
(rendered with wandb's own sweep-command code; no W&B server here) parses, through LightningCLI, to exactly
those values."""

import math
from pathlib import Path

import pytest
import yaml
from wandb.sdk.launch.sweeps.utils import create_sweep_command, create_sweep_command_args

ROOT = Path(__file__).resolve().parents[2]
SWEEPS = sorted((ROOT / "recipes/sweeps").glob("*.yaml"))


def agent_command(sweep: dict, values: dict) -> list[str]:
    """The argv `wandb agent` runs for one trial (wandb_agent.Agent._command_run, without the process)."""
    command = create_sweep_command(list(sweep["command"]))
    sweep_vars = create_sweep_command_args({"args": {k: {"value": v} for k, v in values.items()}})
    sweep_vars.update(interpreter=["python"], program=[sweep.get("program", "")], env=["/usr/bin/env"])
    argv: list[str] = []
    for chunk in map(str, command):
        argv += (sweep_vars.get(chunk[2:-1]) or []) if chunk.startswith("${") and chunk.endswith("}") else [chunk]
    return argv


def samples(spec: dict, default) -> list:
    """Two values of a parameter's range, both different from the recipe's default where possible."""
    if "values" in spec:
        vals = [v for v in spec["values"] if v != default] or spec["values"]
        return [vals[0], vals[-1]]
    lo, hi = spec["min"], spec["max"]
    if spec.get("distribution") == "int_uniform":
        return [v for v in (lo, hi, lo + 1) if v != default][:2]
    if spec.get("distribution") in ("log_uniform_values",):
        return [lo, math.sqrt(lo * hi)]
    return [lo, (lo + hi) / 2]


def test_there_is_a_sweep_per_main_objective():
    assert {p.stem.split("_")[0] for p in SWEEPS} >= {"wav2vec2", "hubert", "data2vec2"}


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_agent_command_parses_to_the_sampled_values(path, monkeypatch):
    from omnissl.cli import lightning_cli

    monkeypatch.chdir(ROOT)  # the sweep's recipe paths are relative to the repository root, where agents run
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert path.read_text().lstrip().startswith("#"), "a sweep opens with a comment naming its recipe and commands"
    sweep = yaml.safe_load(path.read_text())
    assert sweep["method"] in ("grid", "random", "bayes") and sweep["metric"]["name"]
    command = [str(c) for c in sweep["command"]]
    assert command[:2] == ["omnissl", "fit"] and command[-1] == "${args}" and "-c" in command
    base = lightning_cli(command[2:-1], run=False).config
    for pick in (0, 1):
        values = {key: samples(spec, base[key])[pick] for key, spec in sweep["parameters"].items()}
        argv = agent_command(sweep, values)
        assert argv[: len(command) - 1] == command[:-1]
        assert argv[len(command) - 1:] == [f"--{k}={v}" for k, v in values.items()]
        cli = lightning_cli(argv[2:], run=False)  # what `omnissl fit ...` parses (argv[0:2] = omnissl fit)
        for key, value in values.items():
            got = cli.config[key]
            assert type(got) is type(value) and got == pytest.approx(value, rel=1e-12), (key, got, value)
        assert cli.model is not None and cli.datamodule is not None
