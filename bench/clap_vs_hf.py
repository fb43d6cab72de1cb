"""One CLAP training step, omnissl `CLAP` vs Hugging Face `ClapModel(return_loss=True)`.

Towers of matched size: the text towers are the same RoBERTa (default base: 12 x 768, 12 heads, FFN 3072, post-LN,
dropout 0.1, 77 tokens of a 32 768 vocabulary, rows padded to lengths drawn in [16, 77]); the audio towers are
each library's spectrogram transformer at about the same parameter count: HF's HTS-AT (Swin, LAION-CLAP's
`HTSAT-tiny`: depths 2-2-6-2, width 96 -> 768, 1001 x 64 mel frames, as `ClapFeatureExtractor` makes them for
10 s at 48 kHz; 27.5 M parameters) vs ours, a ViT over 64-bin log-mel 16 x 16 patches of 10 s at 16 kHz (default
9 x 512, 8 heads: 28.5 M; both parameter counts are printed). Both sides: 2-layer projections to 512, logit scale 1/0.07, symmetric InfoNCE,
AdamW (lr 1e-4, wd 0, as LAION). One step = forward both towers, the loss, backward, AdamW step, zero_grad:

  ours: `CLAP.step(batch)` from raw 16 kHz waveforms (the log-mel is computed inside the step, on the device)
  peer: `ClapModel(input_ids, attention_mask, input_features, return_loss=True)` on precomputed mel features
        (HF computes them on the CPU in a DataLoader worker: not counted, to its advantage)

Each side runs in its own fresh worker process (bench/sidebyside.py; --threads torch threads each, default
torch's own, i.e. OMP_NUM_THREADS), driven step by step from this process in interleaved rounds (order
alternating); every worker makes the same inputs (seed 0) before its model. Medians are reported, with each
worker's median process CPU time per step (`cpu_ratio` = peer / ours, steadier than wall time under load).
Memory: on the CPU each worker's resident-set high-water mark (VmHWM) minus its RSS before its model was built
(parameters, AdamW moments, gradients, activations and the step's temporaries; run with the GLIBC_TUNABLES below
so that glibc returns nothing and the high-water mark holds every transient peak); on CUDA
torch.cuda.max_memory_allocated minus the memory allocated before the model (the allocator's count, its cache
excluded). mem_ratio = ours / peer (< 1: ours uses less). As an allocator-independent cross-check the table lists
the bytes autograd saves for backward in the last warm-up step (each storage once, parameters excluded). Both
workers live through the whole run, each holding its peak (CPU, --batch 8: 4.2 and 5.2 GB of RSS; at the default
batch 32 ~20 GB together: RSS seen ours 8.0, peer 11.5 GB). The load average is printed beside the timings: numbers taken while other
jobs load the machine are not final.

    GLIBC_TUNABLES=glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=68719476736 \\
        python bench/clap_vs_hf.py [--batch 32] [--audio-dim 512 --audio-layers 9] [--warmup 2 --rounds 10]
                                   [--threads N] [--device cuda] [--bf16]
    python bench/clap_vs_hf.py --small          # a smoke run of tiny towers on the CPU

--bf16: both sides under bf16 autocast; our logits and loss stay fp32.

Ends with: RESULT name=clap_vs_hf ours_ms=... peer_ms=... ratio=<peer/ours> mem_ratio=<ours/peer> cpu_ratio=<peer/ours>
load=<1-min load average>
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from sidebyside import add_worker_args, check_finite, device_line, memory_table, optimizer_step, result_line, \
    round_line, run_workers, serve, step_legend


def make_inputs(a) -> dict:
    """Both sides' inputs (seed 0; every worker makes all of them, so the baselines match): token ids (<s> first,
    </s> last, <pad> after) and their lengths, 16 kHz waveforms for ours, random mel features for the peer."""
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(16, a.tokens + 1, (a.batch,), generator=g)
    ids = torch.randint(5, a.vocab, (a.batch, a.tokens), generator=g)
    ids[:, 0] = 0
    ids[torch.arange(a.batch), lengths - 1] = 2
    ids[torch.arange(a.tokens)[None] >= lengths[:, None]] = 1
    wave = torch.randn(a.batch, int(a.seconds * 16_000), generator=g) * 0.1
    frames = int(a.seconds * 100) + 1  # HF: 48 kHz, hop 480 -> 100 frames per second (+1)
    mel = torch.randn(a.batch, 1, frames, 64, generator=g)
    return {"ids": ids, "lengths": lengths, "wave": wave, "mel": mel}


def build_side(a, side: str, inputs: dict, device):
    """One side's model on `device` and its training step -> (model, step); inputs: `make_inputs`, on `device`."""
    from transformers import ClapAudioConfig, ClapConfig, ClapModel, ClapTextConfig

    from omnissl.backbones.encoder import Encoder
    from omnissl.backbones.frontends import LogMelPatches, TokenEmbedding
    from omnissl.backbones.transformer import LearnedPositions, SinCosPositions, Transformer
    from omnissl.batch import Batch
    from omnissl.optim import param_groups
    from omnissl.ssl.clap import CLAP

    ids, lengths, wave, mel = inputs["ids"], inputs["lengths"], inputs["wave"], inputs["mel"]
    if side == "ours":
        text_trunk = Transformer(dim=a.dim, depth=a.layers, heads=a.heads, ffn_dim=a.ffn, pre_norm=False,
                                 dropout=0.1, attn_dropout=0.1)
        text = Encoder(TokenEmbedding(vocab_size=a.vocab, dim=a.dim, pad_id=1), text_trunk,
                       positions=LearnedPositions(a.dim, max_len=512), feature_norm=False, project=False)
        audio_trunk = Transformer(dim=a.audio_dim, depth=a.audio_layers, heads=a.audio_heads,
                                  ffn_dim=4 * a.audio_dim, pre_norm=True, dropout=0.0, attn_dropout=0.0, eps=1e-6)
        audio = Encoder(LogMelPatches(dim=a.audio_dim, n_mels=64, patch_time=16, patch_freq=16), audio_trunk,
                        positions=SinCosPositions(a.audio_dim, two_d=True), feature_norm=False)
        ours = CLAP(audio, text, dim=512, audio_pool="mean", text_pool="first").to(device).train()
        opt = torch.optim.AdamW(param_groups(ours, 0.0), lr=1e-4)
        batch = Batch({"audio": wave, "text": ids},
                      {"audio": torch.full((a.batch,), wave.shape[1], device=device), "text": lengths},
                      {}, torch.arange(a.batch, device=device))
        towers(side, ours.encoder, ours.text_encoder)
        return ours, optimizer_step(lambda: ours.step(batch).loss, opt)

    text_cfg = ClapTextConfig(vocab_size=a.vocab, hidden_size=a.dim, num_hidden_layers=a.layers,
                              num_attention_heads=a.heads, intermediate_size=a.ffn, max_position_embeddings=514,
                              pad_token_id=1, bos_token_id=0, eos_token_id=2, projection_dim=512)
    audio_cfg = ClapAudioConfig(depths=a.hf_depths, num_attention_heads=a.hf_heads,
                                patch_embeds_hidden_size=a.hf_width,
                                hidden_size=a.hf_width * 2 ** (len(a.hf_depths) - 1), projection_dim=512)
    peer = ClapModel._from_config(ClapConfig(text_config=text_cfg.to_dict(), audio_config=audio_cfg.to_dict(),
                                             projection_dim=512)).to(device).train()
    opt = torch.optim.AdamW(peer.parameters(), lr=1e-4, weight_decay=0.0)
    attention_mask = (ids != 1).long()

    def loss():
        return peer(input_ids=ids, attention_mask=attention_mask, input_features=mel, return_loss=True).loss

    towers(side, peer.audio_model, peer.text_model)
    return peer, optimizer_step(loss, opt)


def towers(side: str, audio, text) -> None:
    """Print a side's tower sizes (from its worker, on stderr: stdout is the worker's pipe)."""
    count = lambda m: sum(p.numel() for p in m.parameters()) / 1e6  # noqa: E731
    print(f"{side}: parameters (M) audio {count(audio):.1f}, text {count(text):.1f}", file=sys.stderr, flush=True)


def worker(a) -> None:
    import importlib

    for lib in ("transformers", "omnissl.ssl.clap"):  # every worker imports the same libraries: equal baselines
        importlib.import_module(lib)
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    device = torch.device(a.device)
    inputs = {k: v.to(device) for k, v in make_inputs(a).items()}
    serve(lambda: build_side(a, a.worker, inputs, device), device, a.bf16)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name, default in (("dim", 768), ("layers", 12), ("heads", 12), ("ffn", 3072), ("vocab", 32768),
                          ("tokens", 77), ("batch", 32), ("audio-dim", 512), ("audio-layers", 9),
                          ("audio-heads", 8), ("hf-width", 96)):
        p.add_argument(f"--{name}", type=int, default=default)
    add_worker_args(p, warmup=2, rounds=10, threads=0)
    p.add_argument("--seconds", type=float, default=10.0, help="audio per clip")
    p.add_argument("--hf-depths", type=int, nargs="+", default=[2, 2, 6, 2])
    p.add_argument("--hf-heads", type=int, nargs="+", default=[4, 8, 16, 32])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--small", action="store_true",
                   help="smoke run: 2 x 128 text, 2 x 192 ViT vs HTS-AT 1-1-1-1 width 32, batch 4, 3 s, 1 + 2 rounds")
    a = p.parse_args()
    if a.worker:
        return worker(a)
    if a.small:
        a.dim, a.layers, a.heads, a.ffn, a.vocab, a.batch = 128, 2, 4, 512, 1024, 4
        a.audio_dim, a.audio_layers, a.audio_heads, a.seconds = 192, 2, 4, 3.0
        a.hf_width, a.hf_depths, a.hf_heads, a.warmup, a.rounds = 32, [1, 1, 1, 1], [1, 2, 4, 8], 1, 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("WANDB_MODE", "offline")
    device = torch.device(a.device)
    print(f"{device_line(device, a.threads)}; batch {a.batch}, {a.seconds:g} s audio, text {a.dim}x{a.layers} "
          f"({a.tokens} tokens), bf16 {a.bf16}; warm-up {a.warmup}, {a.rounds} interleaved rounds, each side in its "
          f"own worker; GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '(unset)')}", flush=True)
    keys = ("dim", "layers", "heads", "ffn", "vocab", "tokens", "batch", "audio_dim", "audio_layers", "audio_heads",
            "hf_width", "seconds", "threads", "device")

    def argv(name: str) -> list[str]:
        return ([os.path.abspath(__file__), "--worker", name]
                + [v for k in keys for v in (f"--{k.replace('_', '-')}", str(getattr(a, k)))]
                + ["--hf-depths", *map(str, a.hf_depths), "--hf-heads", *map(str, a.hf_heads)]
                + (["--bf16"] if a.bf16 else []))

    res = run_workers(argv, a.warmup, a.rounds, after_round=round_line("clap"))
    check_finite(res)
    o, q = res["ours"], res["peer"]
    print()
    memory_table({f"batch {a.batch}": res}, "step", loss=True)
    step_legend(o, q)
    print(result_line("clap_vs_hf", o["median"], q["median"], ms=".2f", mem_ratio=o["delta"] / q["delta"],
                      cpu_ratio=q["cpu"] / o["cpu"], load=True))


if __name__ == "__main__":
    main()
