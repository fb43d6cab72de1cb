"""One wav2vec 2.0 pretraining step, omnissl vs Hugging Face `Wav2Vec2ForPreTraining`, CPU fp32.

Both sides: identical dims, the layer-norm conv extractor with conv bias and a pre-LN trunk (HF's
pretraining example refuses anything but `do_stable_layer_norm=True, feat_extract_norm="layer"`), all
dropouts and layerdrop 0, mask p=0.65 span 10, K=100 distractors, G=2 x V=320 codebook, final dim 256,
AdamW (0.9, 0.98, 1e-6, wd 0.01, lr 1e-5, fused=True on both). One step = what a training loop does per update:

  ours: `Wav2Vec2.step(batch)` (span masks, distractor sampling, quantizer, loss: all inside) ->
        backward -> AdamW step -> zero_grad.
  peer: the collator work of `run_wav2vec2_pretraining_no_trainer.py` (`_compute_mask_indices`,
        `_sample_negative_indices` in numpy) -> forward with `mask_time_indices` and
        `sampled_negative_indices` -> loss / num_masked -> backward -> set_gumbel_temperature -> AdamW step
        -> zero_grad. (The script rescales gradients by 1/num_losses after backward; dividing the loss
        first is equivalent and cheaper, so the peer gets the faster variant.)

Each side runs in its own fresh subprocess (so each peak RSS, VmHWM from /proc, is that side's alone),
driven step by step from this process: warm-up steps, then interleaved rounds (order alternating), medians
reported. Peak memory is reported as the whole process's VmHWM and as the increase over the RSS after
imports and input creation (model + optimizer state + activations).

    GLIBC_TUNABLES=glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=68719476736 \\
        python bench/wav2vec2_vs_hf.py [--dim 768 --layers 12 --heads 12 --ffn 3072 --conv 512] \\
        [--batch 4 --seconds 5] [--warmup 1 --rounds 5] [--threads 2]

Ends with: RESULT name=wav2vec2_vs_hf ours_ms=... peer_ms=... ratio=<peer/ours> mem_ratio=<ours/peer>
"""

from __future__ import annotations

import argparse
import os

from sidebyside import add_worker_args, check_finite, result_line, run_workers, serve

# A learning rate from early in the warm-up: at the peak 5e-4 without warm-up the freshly initialized HF
# model reaches a NaN loss within 3 updates at 768 x 12, and NaN arithmetic would make its timings meaningless.
LR = 1e-5
# torch's single-kernel AdamW on both sides: the default per-tensor loop costs 4-6 s per step at 95 M
# parameters on a 2-core machine, the same on both sides, and would only dilute the comparison.
FUSED = True


def _conv(c: int) -> tuple[tuple[int, int, int], ...]:
    return ((c, 10, 5),) + ((c, 3, 2),) * 4 + ((c, 2, 2),) * 2


def build_ours(a):
    import torch
    from torch.profiler import record_function

    from omnissl.backbones.encoder import Encoder
    from omnissl.backbones.frontends import ConvFeatureExtractor
    from omnissl.backbones.transformer import ConvPositions, Transformer
    from omnissl.batch import Batch
    from omnissl.ssl.wav2vec2 import Wav2Vec2
    from omnissl.optim import param_groups

    trunk = Transformer(dim=a.dim, depth=a.layers, heads=a.heads, ffn_dim=a.ffn, pre_norm=True, dropout=0.0,
                        attn_dropout=0.0)
    encoder = Encoder(ConvFeatureExtractor(layers=_conv(a.conv), mode="layer", bias=True), trunk,
                      positions=ConvPositions(a.dim, dropout=0.0), dropout_input=0.0)
    model = Wav2Vec2(encoder, final_dim=256, feature_penalty_weight=0.0, feature_grad_mult=1.0,
                     dropout_features=0.0, min_code_perplexity=0.0).train()
    opt = torch.optim.AdamW(param_groups(model, 0.01), lr=LR, betas=(0.9, 0.98), eps=1e-6, fused=FUSED)
    t = int(a.seconds * 16_000)
    audio = torch.randn(a.batch, t, generator=torch.Generator().manual_seed(0)) * 0.1
    batch = Batch({"audio": audio}, {"audio": torch.full((a.batch,), t)}, ids=torch.arange(a.batch))
    n = [0]

    def step() -> float:
        # the labels let bench/profile_step.py split the step; they cost nothing without a profiler
        with record_function("forward"):
            out = model.step(batch)
        with record_function("backward"):
            out.loss.backward()
        with record_function("optimizer"):
            opt.step()
            opt.zero_grad(set_to_none=True)
        n[0] += 1
        model.quantizer.set_num_updates(n[0])
        return float(out.loss.detach())

    return step


def build_peer(a):
    import numpy as np
    import torch
    from torch.profiler import record_function
    from transformers import Wav2Vec2Config, Wav2Vec2ForPreTraining
    from transformers.models.wav2vec2.modeling_wav2vec2 import _compute_mask_indices, _sample_negative_indices

    cfg = Wav2Vec2Config(
        hidden_size=a.dim, num_hidden_layers=a.layers, num_attention_heads=a.heads, intermediate_size=a.ffn,
        conv_dim=(a.conv,) * 7, conv_kernel=(10, 3, 3, 3, 3, 2, 2), conv_stride=(5, 2, 2, 2, 2, 2, 2),
        conv_bias=True, feat_extract_norm="layer", do_stable_layer_norm=True,
        hidden_dropout=0.0, activation_dropout=0.0, attention_dropout=0.0, feat_proj_dropout=0.0,
        feat_quantizer_dropout=0.0, final_dropout=0.0, layerdrop=0.0,
        mask_time_prob=0.65, mask_time_length=10, num_negatives=100, codevector_dim=256,
        proj_codevector_dim=256, num_codevectors_per_group=320, num_codevector_groups=2,
        contrastive_logits_temperature=0.1, diversity_loss_weight=0.1,
        num_conv_pos_embeddings=128, num_conv_pos_embedding_groups=16,
    )  # fmt: skip
    model = Wav2Vec2ForPreTraining._from_config(cfg, attn_implementation="sdpa").train()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.01,
                            fused=FUSED)
    t = int(a.seconds * 16_000)
    audio = torch.randn(a.batch, t, generator=torch.Generator().manual_seed(0)) * 0.1
    attention_mask = torch.ones(a.batch, t, dtype=torch.long)
    np.random.seed(0)
    n = [0]

    def step() -> float:
        with record_function("forward"):  # the collator's masks and negatives count as forward work
            # DataCollatorForWav2Vec2Pretraining
            seq = int(model._get_feat_extract_output_lengths(t))
            sub_mask = model._get_feature_vector_attention_mask(seq, attention_mask)
            mask = _compute_mask_indices((a.batch, seq), cfg.mask_time_prob, cfg.mask_time_length,
                                         attention_mask=sub_mask)
            negs = _sample_negative_indices((a.batch, seq), cfg.num_negatives, mask_time_indices=mask)
            mask_t = torch.tensor(mask, dtype=torch.long)
            negs_t = torch.tensor(negs, dtype=torch.long)
            # the training loop
            num_losses = mask_t.sum()
            out = model(audio, attention_mask=attention_mask, mask_time_indices=mask_t,
                        sampled_negative_indices=negs_t)
            loss = out.loss / num_losses
        with record_function("backward"):
            loss.backward()
        with record_function("optimizer"):
            n[0] += 1
            model.set_gumbel_temperature(max(2.0 * 0.999995 ** n[0], 0.5))
            opt.step()
            opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def worker(a) -> None:
    import importlib

    import torch

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    # imports count as baseline, not as the model's memory
    importlib.import_module("transformers" if a.worker == "peer" else "omnissl.ssl.wav2vec2")
    serve(lambda: (None, (build_ours if a.worker == "ours" else build_peer)(a)), bf16=a.bf16)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--ffn", type=int, default=3072)
    p.add_argument("--conv", type=int, default=512)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seconds", type=float, default=5.0)
    add_worker_args(p)
    a = p.parse_args()
    if a.worker:
        return worker(a)

    print(f"config: {a.dim}d x {a.layers} layers x {a.heads} heads, ffn {a.ffn}, conv {a.conv}; batch {a.batch} x "
          f"{a.seconds:g} s at 16 kHz; CPU {'bf16 autocast' if a.bf16 else 'fp32'}, {a.threads} threads; GLIBC_TUNABLES="
          f"{os.environ.get('GLIBC_TUNABLES', '(unset)')}", flush=True)

    def argv(name: str) -> list[str]:
        keys = ("dim", "layers", "heads", "ffn", "conv", "batch", "seconds", "threads")
        return ([os.path.abspath(__file__), "--worker", name] + [v for k in keys for v in (f"--{k}", str(getattr(a, k)))]
                + (["--bf16"] if a.bf16 else []))

    def progress(r: int, last: dict) -> None:
        o, q = last["ours"], last["peer"]
        print(f"round {r}: ours {o['ms']:.0f} ms (cpu {o['cpu']:.0f}), peer {q['ms']:.0f} ms (cpu {q['cpu']:.0f}); "
              f"load average {os.getloadavg()[0]:.1f}", flush=True)

    # warm-up steps are plain steps: no saved-tensor accounting here
    res = run_workers(argv, a.warmup, a.rounds, warmup_cmd="step", after_round=progress)
    check_finite(res)

    o, q = res["ours"], res["peer"]
    print()
    print("| side | median wall ms/step | min | max | median CPU ms/step | peak RSS MiB | peak - post-import RSS MiB "
          "| last loss |")
    print("|------|----:|----:|----:|----:|----:|----:|----:|")
    for r, label in ((o, "omnissl Wav2Vec2"), (q, "HF Wav2Vec2ForPreTraining")):
        print(f"| {label} | {r['median']:.0f} | {r['min']:.0f} | {r['max']:.0f} | {r['cpu']:.0f} | {r['hwm']:.0f} "
              f"| {r['delta']:.0f} | {r['losses'][-1]:.3f} |")
    ratio, mem_ratio = q["median"] / o["median"], o["hwm"] / q["hwm"]
    print(f"\nspeed-up (peer/ours): wall {ratio:.2f}x, CPU time {q['cpu'] / o['cpu']:.2f}x; peak RSS "
          f"ours/peer {mem_ratio:.2f} (model+activations only: {o['delta'] / q['delta']:.2f}); load average "
          f"at the end {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(result_line("wav2vec2_vs_hf" + ("_bf16" if a.bf16 else ""), o["median"], q["median"], ratios=".2f", mem_ratio=mem_ratio))


if __name__ == "__main__":
    main()
