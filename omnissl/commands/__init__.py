"""The argparse commands behind `omnissl <name>` (omnissl/cli.py dispatches to each module's `main(argv) -> int`).

    data          omnissl/commands/data.py          embedded corpora, manifests, tokenizers
    hubert-units  omnissl/commands/hubert_units.py  HuBERT k-means targets (omnissl/eval/units.py)
    export        omnissl/commands/export.py        checkpoint -> package / transformers directory (eval/export.py)
    features      omnissl/commands/features.py      one layer's hidden states per utterance (eval/features.py)
    probe         omnissl/commands/probe.py         frozen-encoder probes (eval/probe.py)
    pll           omnissl/commands/pll.py           pseudo-log-likelihood of texts under a masked LM (eval/pll.py)

Each command imports its omnissl modules inside `main`, so `omnissl --help` stays fast, and turns the errors a
user can cause (bad paths, refused checkpoints, bad manifests) into one line `omnissl <name>: error: ...` with
exit status 2, never a traceback.
"""

import argparse


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's ArgumentDefaultsHelpFormatter without the noise: no "(default: None)" on options that have no
    default (required ones, or ones whose help says what None means) and none on flags (store_true)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.required or action.default is None or isinstance(action, argparse._StoreTrueAction):
            return action.help
        return super()._get_help_string(action)


def device(requested: str | None) -> str:
    """--device: as given, else cuda when available, else cpu."""
    import torch

    return requested or ("cuda" if torch.cuda.is_available() else "cpu")
