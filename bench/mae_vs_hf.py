"""Our MAE training step vs Hugging Face `ViTMAEForPreTraining`: forward + backward, CPU fp32, train mode.

ours: `omnissl.ssl.mae.MAE` on `omnissl.backbones.builders.vit_base16()` (ViT-B/16: 16x16 patches, 2-D sin-cos
      positions, CLS, pre-LN 768 wide, 12 blocks, 12 heads, FFN 3072, LayerNorm eps 1e-6, no dropout), mask
      ratio 0.75, norm-pix loss, decoder 512 wide x 8 blocks x 16 heads (MAE's `mae_vit_base_patch16_dec512d8b`).
peer: `transformers.ViTMAEForPreTraining` with the same dims (hidden 768, 12 layers, 12 heads, intermediate
      3072, qkv bias, layer_norm_eps 1e-6 as MAE, decoder 512 x 8 x 16 with intermediate 2048, mask_ratio 0.75,
      norm_pix_loss, no dropout), `attn_implementation="sdpa"` (the fastest attention HF offers on CPU).

One step = the objective's loss on one batch of random 224x224 images (both sides draw their own random mask
inside the step, as in training), backward, then `zero_grad(set_to_none=True)`. No optimizer: this measures the
model's step, not AdamW. Both sides use the same batch (same seed).

Timing: for each batch size, both sides run in their own fresh worker subprocess, driven step by step from this
process: `--warmup` steps each, then `--rounds` rounds of one step each, alternating which side goes first
(ABBA) so load drift on a shared machine hits both; the median step time is reported.

Memory: as in bench/trunk_vs_hf.py, the worker's resident-set high-water mark (VmHWM) minus its RSS before the
model was built (both workers import the same libraries and make their inputs first); run with the
GLIBC_TUNABLES below so that the high-water mark covers every transient peak. As an allocator-independent
cross-check, the bytes autograd saves for backward in the warm-up step (each storage once, parameters excluded).

Aggregate (the RESULT line): ours_ms / peer_ms are the SUM over the batch sizes of each side's median step time;
ratio = peer_ms / ours_ms (> 1: ours is faster); mem_ratio = ours' summed (peak - baseline) / the peer's
(< 1: ours uses less memory). `--small` runs a small model (192 wide, 2 blocks, 64x64 images, decoder 128 x 2)
as a quick CPU smoke of the script; its numbers are not the benchmark.

    GLIBC_TUNABLES=glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=68719476736 \\
        .venv/bin/python bench/mae_vs_hf.py [--batches 8,32] [--warmup 1 --rounds 5] [--threads 2] [--small] [--bf16]

Ends with: RESULT name=mae_vs_hf ours_ms=... peer_ms=... ratio=<peer/ours> mem_ratio=<ours/peer> cpu_ratio=<peer/ours>
load=<1-min load average> (cpu_ratio: the same ratio of the workers' process CPU time, steadier under load)
"""

from __future__ import annotations

import argparse
import os
import time

from sidebyside import add_worker_args, memory_table, result_line, round_line, run_workers, serve, totals

BASE = {"image": 224, "patch": 16, "dim": 768, "depth": 12, "heads": 12, "ffn": 3072,
        "dec_dim": 512, "dec_depth": 8, "dec_heads": 16}
SMALL = {"image": 64, "patch": 16, "dim": 192, "depth": 2, "heads": 3, "ffn": 768,
         "dec_dim": 128, "dec_depth": 2, "dec_heads": 4}
MASK_RATIO = 0.75


def build_ours(d: dict):
    from omnissl.backbones.encoder import Encoder
    from omnissl.backbones.frontends import ImagePatches
    from omnissl.backbones.transformer import SinCosPositions, Transformer
    from omnissl.batch import Batch
    from omnissl.ssl.mae import MAE

    # builders.vit_base16() at the given dims
    trunk = Transformer(dim=d["dim"], depth=d["depth"], heads=d["heads"], ffn_dim=d["ffn"], pre_norm=True,
                        dropout=0.0, attn_dropout=0.0, eps=1e-6)
    encoder = Encoder(ImagePatches(dim=d["dim"], patch=d["patch"]), trunk,
                      positions=SinCosPositions(d["dim"], two_d=True), feature_norm=False, cls_token=True)
    model = MAE(encoder, modality="image", mask_ratio=MASK_RATIO, norm_pix_loss=True, decoder_dim=d["dec_dim"],
                decoder_depth=d["dec_depth"], decoder_heads=d["dec_heads"]).train()

    def loss(images):
        return model.step(Batch({"image": images})).loss

    return model, loss


def build_peer(d: dict):
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    cfg = ViTMAEConfig(hidden_size=d["dim"], num_hidden_layers=d["depth"], num_attention_heads=d["heads"],
                       intermediate_size=d["ffn"], image_size=d["image"], patch_size=d["patch"], num_channels=3,
                       qkv_bias=True, layer_norm_eps=1e-6, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                       decoder_hidden_size=d["dec_dim"], decoder_num_hidden_layers=d["dec_depth"],
                       decoder_num_attention_heads=d["dec_heads"], decoder_intermediate_size=4 * d["dec_dim"],
                       mask_ratio=MASK_RATIO, norm_pix_loss=True, attn_implementation="sdpa")
    model = ViTMAEForPreTraining(cfg).train()
    assert model.config._attn_implementation == "sdpa"

    def loss(images):
        return model(pixel_values=images).loss

    return model, loss


def worker(a) -> None:
    import importlib

    import torch

    for lib in ("transformers", "omnissl.ssl.mae"):  # both workers import the same libraries: equal baselines
        importlib.import_module(lib)

    d = SMALL if a.small else BASE
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    images = torch.randn(a.batch, 3, d["image"], d["image"], generator=torch.Generator().manual_seed(0))

    def build():
        model, loss_of = (build_ours if a.worker == "ours" else build_peer)(d)

        def step():
            loss = loss_of(images)
            loss.backward()
            model.zero_grad(set_to_none=True)
            return loss.detach()

        return model, step

    serve(build, bf16=a.bf16)


def run_config(batch: int, a) -> dict:
    def argv(name: str) -> list[str]:
        return [os.path.abspath(__file__), "--worker", name, "--batch", str(batch), "--threads", str(a.threads)] + (
            ["--small"] if a.small else []) + (["--bf16"] if a.bf16 else [])

    return run_workers(argv, a.warmup, a.rounds, after_round=round_line(f"batch {batch}"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", default="8,32", help="comma-separated batch sizes")
    add_worker_args(p)
    p.add_argument("--small", action="store_true", help="a small model for a quick smoke run (not the benchmark)")
    p.add_argument("--batch", type=int)
    a = p.parse_args()
    if a.worker:
        return worker(a)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("WANDB_MODE", "offline")
    d = SMALL if a.small else BASE
    batches = [int(b) for b in a.batches.split(",")]
    print(f"MAE {'SMALL smoke' if a.small else 'ViT-B/16'} ({d['dim']}d x {d['depth']} x {d['heads']}h, FFN {d['ffn']}, "
          f"{d['image']}px / {d['patch']}px patches, decoder {d['dec_dim']} x {d['dec_depth']} x {d['dec_heads']}h), "
          f"mask {MASK_RATIO}, norm-pix, fwd+bwd, CPU {'bf16 autocast' if a.bf16 else 'fp32'}, {a.threads} threads, peer attn_implementation=sdpa; "
          f"warm-up {a.warmup}, {a.rounds} interleaved rounds; load average {os.getloadavg()[0]:.1f}; "
          f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '(unset)')}", flush=True)
    t0 = time.perf_counter()
    results = {b: run_config(b, a) for b in batches}

    print()
    memory_table(results, "batch", loss=True)
    ms, cpu, delta = totals(results, "median"), totals(results, "cpu"), totals(results, "delta")
    print(f"\n(ms: median (min-max) per step; peak: VmHWM of the worker, in parentheses minus its RSS before the "
          f"model was built; saved for backward: tensors autograd kept in the warm-up step, parameters excluded; "
          f"loss: the warm-up step's; under norm-pix it is 1 + the prediction's variance at init: ours follows MAE's "
          f"xavier_uniform Linear init, HF ViTMAE normal(0, 0.02), so ours starts higher.) Wall time {time.perf_counter() - t0:.0f} s, "
          f"load average {os.getloadavg()[0]:.1f}.")
    print(f"CPU time (worker process, summed medians): ours {cpu['ours']:.0f} ms, peer {cpu['peer']:.0f} ms, "
          f"ratio {cpu['peer'] / cpu['ours']:.3f}")
    print(result_line("mae_vs_hf" + ("_bf16" if a.bf16 else ""), ms["ours"], ms["peer"], mem_ratio=delta["ours"] / delta["peer"],
                      cpu_ratio=cpu["peer"] / cpu["ours"], load=True))


if __name__ == "__main__":
    main()
