"""`TrunkBlocks`: compile and/or activation-checkpoint every transformer block of the model, from the trainer
recipe, whatever the objective and encoder recipe.

    trainer:
      callbacks+:
        - class_path: omnissl.train.blocks.TrunkBlocks
          init_args: {compile: true, activation_checkpointing: true}

It acts in the `setup` hook, which Lightning runs before `configure_model`, so under FSDP2
(`SSLModule.configure_model`, recipes/trainer/fsdp.yaml) the blocks are compiled and marked for checkpointing
before `fully_shard` wraps them (torchtitan's order: checkpointing, compile, then sharding).

- compile: each `Block`'s forward (student, EMA teacher, MAE decoder: every `omnissl.backbones.transformer.Block`)
  is replaced by `torch.compile(forward)`. The module keeps its type, names and state-dict keys (checkpoints
  and exports are unchanged), and FSDP2's hooks stay outside the compiled region. Per block rather than the
  whole model: variable-length audio and the masked objectives' data-dependent shapes (the boolean-mask
  gathers, the distractor sampling) would break a whole-model graph, while a block is a fixed computation on
  (B, N, D) whose N becomes a dynamic dimension after the first recompile.
- activation_checkpointing: sets `checkpoint_activations` on every `Transformer` trunk (non-reentrant
  `torch.utils.checkpoint` per block, in training only): block activations are recomputed in the backward
  instead of kept, for about a third more compute.

The first steps with compile pay the compilation (minutes for the CPU demos' models on a loaded 2-core machine;
docs/scale.md has the measured step and compile times).
"""

from __future__ import annotations

import lightning as L
import torch

from omnissl.backbones.transformer import Block, Transformer


class TrunkBlocks(L.Callback):
    """compile: torch.compile each transformer block's forward (mode / dynamic / backend passed on);
    activation_checkpointing: recompute each block's activations in the backward."""

    def __init__(self, *, compile: bool = False, activation_checkpointing: bool = False, mode: str | None = None,
                 dynamic: bool | None = None, backend: str = "inductor") -> None:
        if mode not in (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"):
            raise ValueError(f"compile mode must be default, reduce-overhead, max-autotune or "
                             f"max-autotune-no-cudagraphs, got {mode!r}")
        self.compile, self.activation_checkpointing = compile, activation_checkpointing
        self.mode, self.dynamic, self.backend = mode, dynamic, backend
        self.compiled = 0  # blocks compiled (for logs and tests)
        self.checkpointed = 0  # trunks set to checkpoint their blocks

    def apply(self, model: torch.nn.Module) -> None:
        """Compile / mark the blocks of `model` (idempotent: a block compiled once is left alone)."""
        for module in model.modules():
            if self.activation_checkpointing and isinstance(module, Transformer) and not module.checkpoint_activations:
                module.checkpoint_activations = True
                self.checkpointed += 1
            if self.compile and isinstance(module, Block) and "forward" not in vars(module):
                module.forward = torch.compile(module.forward, mode=self.mode, dynamic=self.dynamic,
                                               backend=self.backend)
                self.compiled += 1

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.apply(pl_module)
