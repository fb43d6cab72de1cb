"""The `omnissl` command: a dispatch table. Training goes to LightningCLI (fit / validate / test); every other
subcommand is an argparse `main(argv) -> int` in omnissl/commands/.

    omnissl fit -c recipes/trainer/default.yaml -c recipes/audio/wav2vec2_base.yaml
    omnissl data generate speech --size small --out DIR
    omnissl hubert-units --manifest train.tsv --iteration 1 --clusters 100
    omnissl export runs/.../last.ckpt out/ [--hf] [--heads]
    omnissl probe ENCODER --train embedded:keywords:small --valid ... --test ... [--report DIR]
    omnissl features ENCODER MANIFEST --layer K --out DIR [--format npy|safetensors]

`omnissl --help` lists them, `omnissl <command> --help` shows each one's options with their defaults.
LightningCLI's `predict` is not offered: no objective defines predict_step (`omnissl features` dumps
representations).
"""

from __future__ import annotations

import importlib
import sys

# LightningCLI subcommands -> one line of help
LIGHTNING = {
    "fit": "train an objective: omnissl fit -c recipes/trainer/X.yaml -c recipes/<modality>/Y.yaml",
    "validate": "run the validation loop of a recipe (and --ckpt_path) once",
    "test": "run the test loop of a recipe (and --ckpt_path) once",
}
# argparse subcommands -> ("module:function", one line of help)
COMMANDS = {
    "data": ("omnissl.commands.data:main", "generate embedded corpora, write and inspect manifests, tokenizers"),
    "hubert-units": ("omnissl.commands.hubert_units:main", "HuBERT k-means targets (MFCC or a checkpoint's layer)"),
    "export": ("omnissl.commands.export:main", "checkpoint -> omnissl package or Hugging Face directory"),
    "probe": ("omnissl.commands.probe:main", "frozen-encoder probes (linear / MLP / attentive) with a report"),
    "features": ("omnissl.commands.features:main", "dump one layer's hidden states per utterance of a manifest"),
    "pll": ("omnissl.commands.pll:main", "pseudo-log-likelihood of texts under a masked LM (MaskedLM checkpoint)"),
    "zeroshot": ("omnissl.commands.zeroshot:main", "CLAP zero-shot classification and audio-text retrieval, report"),
}
REMOVED = {
    "predict": "no omnissl objective defines predict_step; use `omnissl features` to dump an encoder's outputs",
}


def usage() -> str:
    width = max(map(len, [*LIGHTNING, *COMMANDS]))
    lines = ["usage: omnissl [-h] [--version] COMMAND ...", "",
             "Self-supervised pretraining of speech, audio, text and image encoders.", "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, text in LIGHTNING.items()]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", "`omnissl COMMAND --help` shows a command's options and their defaults."]
    return "\n".join(lines)


def lightning_cli(args: list[str] | None = None, run: bool = True):
    import lightning as L
    from lightning.pytorch.cli import LightningCLI

    from omnissl.eval.finetune import link_pretrained_tokenizer
    from omnissl.ssl.base import SSLModule
    from omnissl.train.checks import check_config
    from omnissl.train.loggers import SaveConfigToRun
    from omnissl.train.quiet import EvalModeCheck, quiet_third_party
    from omnissl.train.runs import RunError, link_schedule, prepare_fit
    from omnissl.train.threads import fit_threads_to_free_cores

    first = ((sys.argv[1:] if args is None else args) or ["fit"])[0]
    fit_threads_to_free_cores(first if first in LIGHTNING else "fit")
    quiet_third_party()  # Lightning's litlogger tip, torch's LeafSpec deprecation, its teacher-blind eval check

    class OmnisslCLI(LightningCLI):
        @staticmethod
        def subcommands() -> dict[str, set[str]]:
            return {k: v for k, v in LightningCLI.subcommands().items() if k in LIGHTNING}

        def parse_arguments(self, parser, args) -> None:  # + linked and degenerate settings, before any work
            # `args` given: parsed instead of sys.argv, which then holds the calling program's own arguments
            # (a script calling lightning_cli([...]), e.g. bench/learning_check.py in `make demo`); Lightning's
            # parse_arguments warns about that pair, which is how this function is meant to be called.
            self.config = parser.parse_args(args)
            sub = self.config.get("subcommand")
            config = self.config[sub] if sub else self.config
            link_schedule(config)  # the schedule's total_steps follows trainer.max_steps unless set
            try:  # fine-tuning on labeled text: the tokenizer of the pretrained encoder, unless one is given
                link_pretrained_tokenizer(config)
            except (ValueError, OSError) as e:
                parser.error(f"model.init_args.pretrained: {e}")
            if errors := check_config(config, sub or "fit"):
                parser.error("; ".join(errors))

        def add_arguments_to_parser(self, parser) -> None:
            # one folder per run, resumed by re-running the command: omnissl/train/runs.py, README "Resume"
            parser.add_argument("--run_name", type=str | None, default=None,
                                help="fit: the run's folder under trainer.default_root_dir (default: <objective>-"
                                     "<hash of the config>); re-running resumes from its last checkpoint")
            parser.add_argument("--auto_resume", type=bool, default=True,
                                help="fit: resume from the run folder's last checkpoint (false: refuse a folder "
                                     "that already holds checkpoints)")

        def before_instantiate_classes(self) -> None:
            if self.subcommand != "fit":
                return
            config = self.config["fit"]
            try:
                self.run_plan = prepare_fit(config)
            except RunError as e:
                self.parser.error(str(e))
            plan = self.run_plan
            self.save_config_kwargs = {**self.save_config_kwargs, "run_dir": str(plan["folder"])}
            state = (f"resuming from {plan['ckpt_path']} (step {plan['step']})" if plan["resumed"] else "new run")
            print(f"omnissl fit: run folder {plan['folder']} ({state})", file=sys.stderr)

        def _run_subcommand(self, subcommand: str) -> None:
            plan = getattr(self, "run_plan", None)
            if subcommand == "fit" and plan and plan["finished"]:
                print(f"omnissl fit: run {plan['folder']} is finished (checkpoint at step {plan['step']}, "
                      f"trainer.max_steps={self.config['fit']['trainer']['max_steps']}); nothing to train. To continue it: "
                      f"--run_name {plan['name']} --trainer.max_steps N (N larger); or name a new run.", file=sys.stderr)
                return
            super()._run_subcommand(subcommand)

    return OmnisslCLI(
        SSLModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        auto_configure_optimizers=False,  # objectives take injected optimizer/scheduler (Lightning #19110)
        save_config_callback=SaveConfigToRun,
        parser_kwargs={"allow_abbrev": False},  # --trainer.max_step is an error, as the same typo in YAML
        trainer_defaults={"callbacks": [EvalModeCheck()]},  # replaces Lightning's check, which counts the teacher
        args=args,
        run=run,
    )


def fail(message: str) -> None:
    print(f"{usage().splitlines()[0]}\nomnissl: error: {message}", file=sys.stderr)
    sys.exit(2)


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    first = args[0] if args else None
    if first in (None, "-h", "--help"):
        print(usage())
        sys.exit(0)
    if first == "--version":
        from omnissl import __version__

        print(f"omnissl {__version__}")
        sys.exit(0)
    if first in COMMANDS:
        module, _, function = COMMANDS[first][0].partition(":")
        if first != "data":  # the commands that compute with torch: its threads fitted to the free cores
            from omnissl.train.threads import fit_threads_to_free_cores

            fit_threads_to_free_cores(first)
        sys.exit(getattr(importlib.import_module(module), function)(args[1:]))
    if first in REMOVED:
        fail(f"{first} is not supported: {REMOVED[first]}")
    if first not in LIGHTNING and not first.startswith("-"):
        fail(f"unknown command {first!r} (choose from {', '.join([*LIGHTNING, *COMMANDS])})")
    lightning_cli(argv)  # None: LightningCLI reads sys.argv itself
