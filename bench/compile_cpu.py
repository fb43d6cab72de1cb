"""Step time on the CPU with compiled transformer blocks (omnissl.train.blocks.TrunkBlocks, recipes/trainer/
compile.yaml) vs eager, fp32, for wav2vec 2.0 and MAE at the size of the CPU demos.

Both variants are built from the same seed in one process; the compiled one first pays its compilation (timed
and reported: the cold compile, inductor's C++ code generation included), then warm-up steps, then interleaved
rounds of `--steps` steps each (order alternating), medians reported. The machine's load average is printed
beside the numbers: timings taken while other jobs load it are not final.

    python bench/compile_cpu.py [--rounds 5 --steps 3] [--threads 2] [--objective wav2vec2 mae]

Ends with one line per objective:
    RESULT name=compile_cpu_<objective> eager_ms=... compiled_ms=... speedup=<eager/compiled> compile_s=...
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from omnissl.backbones.builders import tiny  # noqa: E402
from omnissl.datamodules.synthetic import SyntheticDataModule  # noqa: E402
from omnissl.ssl.mae import MAE  # noqa: E402
from omnissl.ssl.wav2vec2 import Wav2Vec2  # noqa: E402
from omnissl.train.blocks import TrunkBlocks  # noqa: E402


def build(name: str):
    """(model, batch): the demos' sizes (recipes/audio/wav2vec2_tiny_cpu.yaml is 4 x 256), 8 crops of 2 s / 8 images."""
    if name == "wav2vec2":
        model = Wav2Vec2(tiny("audio", dim=256, depth=4, heads=4), final_dim=128, codebook_entries=64,
                         num_distractors=50, mask_length=10)
        dm = SyntheticDataModule(modality="audio", train_size=8, valid_size=0, min_samples=32000, max_samples=32000)
    elif name == "mae":
        model = MAE(tiny("image", dim=256, depth=4, heads=4), decoder_dim=128, decoder_depth=2, decoder_heads=4)
        dm = SyntheticDataModule(modality="image", train_size=8, valid_size=0, image_size=64)
    else:
        raise SystemExit(f"unknown objective {name!r}: wav2vec2 or mae")
    ds = dm.dataset("train")
    return model.train(), dm.collate([ds[i] for i in range(len(ds))])


def stepper(model, batch):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        model.step(batch).loss.backward()
        opt.step()

    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    p.add_argument("--steps", type=int, default=3, help="steps per round")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--objective", nargs="+", default=["wav2vec2", "mae"], help="wav2vec2 and/or mae")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    for name in a.objective:
        torch.manual_seed(0)
        eager_model, batch = build(name)
        torch.manual_seed(0)
        compiled_model, _ = build(name)
        blocks = TrunkBlocks(compile=True)
        blocks.apply(compiled_model)
        eager, compiled = stepper(eager_model, batch), stepper(compiled_model, batch)
        start = time.perf_counter()
        compiled()  # the cold compile (forward and backward graphs)
        compile_s = time.perf_counter() - start
        for _ in range(2):  # warm-up (a recompile for dynamic shapes would land here)
            compiled()
            eager()
        times: dict[str, list[float]] = {"eager": [], "compiled": []}
        for r in range(a.rounds):
            order = [("eager", eager), ("compiled", compiled)]
            for side, fn in order if r % 2 == 0 else order[::-1]:
                start = time.perf_counter()
                for _ in range(a.steps):
                    fn()
                times[side].append((time.perf_counter() - start) / a.steps * 1000)
        e, c = statistics.median(times["eager"]), statistics.median(times["compiled"])
        print(f"{name}: {blocks.compiled} blocks compiled; eager {[round(t) for t in times['eager']]} ms, compiled "
              f"{[round(t) for t in times['compiled']]} ms; load average {os.getloadavg()}", flush=True)
        print(f"RESULT name=compile_cpu_{name} eager_ms={e:.0f} compiled_ms={c:.0f} speedup={e / c:.3f} "
              f"compile_s={compile_s:.0f}", flush=True)


if __name__ == "__main__":
    main()
