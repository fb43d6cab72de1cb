"""The `omnissl` command: LightningCLI (fit / validate / test / predict) plus data and tool subcommands.

    omnissl fit -c recipes/trainer/default.yaml -c recipes/audio/wav2vec2_base.yaml
    omnissl data generate speech --size small --out DIR
    omnissl hubert-units --manifest train.tsv --iteration 1 --clusters 100
    omnissl probe ENCODER_DIR --train embedded:keywords:small --valid ... --test ... [--report DIR]
    omnissl export runs/.../last.ckpt out/ [--hf] [--heads]
"""

from __future__ import annotations

import sys


def lightning_cli(args: list[str] | None = None, run: bool = True):
    import lightning as L
    from lightning.pytorch.cli import LightningCLI

    from omnissl.ssl.base import SSLModule
    from omnissl.train.callbacks import SaveConfigToRun

    return LightningCLI(
        SSLModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        auto_configure_optimizers=False,  # objectives take injected optimizer/scheduler (Lightning #19110)
        save_config_callback=SaveConfigToRun,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "data":
        from omnissl.datamodules.commands import main as data_main

        sys.exit(data_main(args[1:]))
    if args and args[0] == "hubert-units":
        from omnissl.ssl.units import main as units_main

        sys.exit(units_main(args[1:]))
    if args and args[0] == "probe":
        from omnissl.eval.probe import main as probe_main

        sys.exit(probe_main(args[1:]))
    if args and args[0] == "export":
        from omnissl.eval.export import main as export_main

        sys.exit(export_main(args[1:]))
    lightning_cli(argv)  # None: LightningCLI reads sys.argv itself


if __name__ == "__main__":
    main()
