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

The two models are built in one process and stepped in interleaved rounds (order alternating); medians are
reported. On CUDA, peak memory per side is torch.cuda.max_memory_allocated over its steps (mem_ratio = ours /
peer); on the CPU it is not measured (nan). The load average is printed beside the timings: numbers taken while
other jobs load the machine are not final.

    python bench/clap_vs_hf.py [--batch 32] [--audio-dim 512 --audio-layers 8] [--device cuda] [--bf16]
    python bench/clap_vs_hf.py --small          # a smoke run of tiny towers on the CPU

Ends with: RESULT name=clap_vs_hf ours_ms=... peer_ms=... ratio=<peer/ours> mem_ratio=<ours/peer>
"""

from __future__ import annotations

import argparse
import math

import torch

from sidebyside import device_line, in_process, medians, memory_text, optimizer_step, result_line


def build(a, device):
    from transformers import ClapAudioConfig, ClapConfig, ClapModel, ClapTextConfig

    from omnissl.backbones.encoder import Encoder
    from omnissl.backbones.frontends import LogMelPatches, TokenEmbedding
    from omnissl.backbones.transformer import LearnedPositions, SinCosPositions, Transformer
    from omnissl.batch import Batch
    from omnissl.optim import param_groups
    from omnissl.ssl.clap import CLAP

    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(16, a.tokens + 1, (a.batch,), generator=g)
    ids = torch.randint(5, a.vocab, (a.batch, a.tokens), generator=g)
    ids[:, 0] = 0
    ids[torch.arange(a.batch), lengths - 1] = 2
    pad = torch.arange(a.tokens)[None] >= lengths[:, None]
    ids[pad] = 1
    samples = int(a.seconds * 16_000)
    wave = torch.randn(a.batch, samples, generator=g) * 0.1
    frames = int(a.seconds * 100) + 1  # HF: 48 kHz, hop 480 -> 100 frames per second (+1)
    mel = torch.randn(a.batch, 1, frames, 64, generator=g)

    text_trunk = Transformer(dim=a.dim, depth=a.layers, heads=a.heads, ffn_dim=a.ffn, pre_norm=False, dropout=0.1,
                             attn_dropout=0.1)
    text = Encoder(TokenEmbedding(vocab_size=a.vocab, dim=a.dim, pad_id=1), text_trunk,
                   positions=LearnedPositions(a.dim, max_len=512), feature_norm=False, project=False)
    audio_trunk = Transformer(dim=a.audio_dim, depth=a.audio_layers, heads=a.audio_heads, ffn_dim=4 * a.audio_dim,
                              pre_norm=True, dropout=0.0, attn_dropout=0.0, eps=1e-6)
    audio = Encoder(LogMelPatches(dim=a.audio_dim, n_mels=64, patch_time=16, patch_freq=16), audio_trunk,
                    positions=SinCosPositions(a.audio_dim, two_d=True), feature_norm=False)
    ours = CLAP(audio, text, dim=512, audio_pool="mean", text_pool="first").to(device).train()
    ours_opt = torch.optim.AdamW(param_groups(ours, 0.0), lr=1e-4)
    batch = Batch({"audio": wave, "text": ids}, {"audio": torch.full((a.batch,), samples), "text": lengths},
                  {}, torch.arange(a.batch)).to(device)

    text_cfg = ClapTextConfig(vocab_size=a.vocab, hidden_size=a.dim, num_hidden_layers=a.layers,
                              num_attention_heads=a.heads, intermediate_size=a.ffn, max_position_embeddings=514,
                              pad_token_id=1, bos_token_id=0, eos_token_id=2, projection_dim=512)
    audio_cfg = ClapAudioConfig(depths=a.hf_depths, num_attention_heads=a.hf_heads,
                                patch_embeds_hidden_size=a.hf_width,
                                hidden_size=a.hf_width * 2 ** (len(a.hf_depths) - 1), projection_dim=512)
    peer = ClapModel._from_config(ClapConfig(text_config=text_cfg.to_dict(), audio_config=audio_cfg.to_dict(),
                                             projection_dim=512)).to(device).train()
    peer_opt = torch.optim.AdamW(peer.parameters(), lr=1e-4, weight_decay=0.0)
    attention_mask = (~pad).long().to(device)
    ids_d, mel_d = ids.to(device), mel.to(device)

    def peer_loss():
        return peer(input_ids=ids_d, attention_mask=attention_mask, input_features=mel_d, return_loss=True).loss

    count = lambda m: sum(p.numel() for p in m.parameters()) / 1e6  # noqa: E731
    sizes = {"ours audio": count(ours.encoder), "peer audio": count(peer.audio_model),
             "ours text": count(ours.text_encoder), "peer text": count(peer.text_model)}
    steps = {"ours": optimizer_step(lambda: ours.step(batch).loss, ours_opt),
             "peer": optimizer_step(peer_loss, peer_opt)}
    return steps, sizes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name, default in (("dim", 768), ("layers", 12), ("heads", 12), ("ffn", 3072), ("vocab", 32768),
                          ("tokens", 77), ("batch", 32), ("audio-dim", 512), ("audio-layers", 9),
                          ("audio-heads", 8), ("hf-width", 96), ("warmup", 2), ("rounds", 10)):
        p.add_argument(f"--{name}", type=int, default=default)
    p.add_argument("--seconds", type=float, default=10.0, help="audio per clip")
    p.add_argument("--hf-depths", type=int, nargs="+", default=[2, 2, 6, 2])
    p.add_argument("--hf-heads", type=int, nargs="+", default=[4, 8, 16, 32])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast on both sides (our logits and loss stay fp32)")
    p.add_argument("--small", action="store_true",
                   help="smoke run: 2 x 128 text, 2 x 192 ViT vs HTS-AT 1-1-1-1 width 32, batch 4, 3 s, 1 + 2 rounds")
    a = p.parse_args()
    if a.small:
        a.dim, a.layers, a.heads, a.ffn, a.vocab, a.batch = 128, 2, 4, 512, 1024, 4
        a.audio_dim, a.audio_layers, a.audio_heads, a.seconds = 192, 2, 4, 3.0
        a.hf_width, a.hf_depths, a.hf_heads, a.warmup, a.rounds = 32, [1, 1, 1, 1], [1, 2, 4, 8], 1, 2
    device = torch.device(a.device)
    torch.manual_seed(0)
    steps, sizes = build(a, device)
    cuda = device.type == "cuda"
    warm, timed = in_process(steps, device, a.bf16, a.warmup, a.rounds)
    ms = medians(timed)
    peak = {name: max(s["peak"] for s in warm[name] + timed[name]) for name in timed}  # warm-up steps included
    mem_ratio = peak["ours"] / peak["peer"] if cuda else math.nan
    print(f"{device_line(device)}; batch {a.batch}, {a.seconds:g} s audio, text {a.dim}x{a.layers} "
          f"({a.tokens} tokens), bf16 {a.bf16}")
    print("parameters (M): " + ", ".join(f"{k} {v:.1f}" for k, v in sizes.items()))
    print(f"ours {ms['ours']:.1f} ms, peer {ms['peer']:.1f} ms; {memory_text(peak, cuda)}")
    print(result_line("clap_vs_hf", ms["ours"], ms["peer"], ms=".2f", mem_ratio=mem_ratio))


if __name__ == "__main__":
    main()
