"""One masked-LM training step, omnissl `MaskedLM` vs Hugging Face `RobertaForMaskedLM`.

Both sides: the same dims (default RoBERTa-base: 12 x 768, 12 heads, FFN 3072), vocabulary (32 768, RoBERTa
specials at 0..4), sequence 128 with realistic padding (every row's length drawn uniformly from [64, 128], right
padding), batch, masking rate (15 %, 80/10/10), dropout 0.1, SDPA attention, AdamW (0.9, 0.98, 1e-6, wd 0.01).
One step = what a training loop does per update:

  ours: `MaskedLM.step(batch)` (masks drawn on the device, head on the masked positions only, fp32 loss) ->
        backward -> AdamW step -> zero_grad.
  peer: `DataCollatorForLanguageModeling`'s masking (`torch_mask_tokens`, on the CPU as in a DataLoader worker;
        its cost is reported apart and not counted) -> forward with labels (full-vocabulary logits at every
        position) -> backward -> AdamW step -> zero_grad.

Packed variant (`packed`, on unless --no-packed): our step on the same documents packed whole into rows of
--pack-len tokens (default --seq; best-fit decreasing, `token_cache.pack_rows`, as TextDataModule's
break_mode="documents") with per-document attention (`Batch.segments`: positions restart, block-diagonal mask),
so the same tokens per step in fewer rows. --lengths picks the documents: `uniform` (default, as before: every
row's length uniform in [seq/2, seq], padded to seq) or `corpus` (the embedded docstring corpus's documents as
TextDataModule(packing=False) cuts them at --seq with its 4096-entry BPE: heavy-tailed, median ~40 tokens,
--batch of them drawn at random, padded to the longest as Collate does). Reported: each side's step time,
tokens/s (real tokens, specials included, over the step time) and the padding fraction of each layout.

The models are built in one process and stepped in interleaved rounds (order alternating); medians are
reported, with each side's median process CPU time (steadier than wall time on a loaded machine; `cpu_ratio`).
On CUDA, a side's peak memory is its own resident state (parameters and AdamW moments) plus the
largest rise of torch.cuda.max_memory_allocated above the memory allocated when its step starts (activations,
gradients, logits): the other side's resident state, which shares the process, is not counted
(mem_ratio = ours / peer). On the CPU memory is not measured (nan). The machine's load average is printed
beside the timings: numbers taken while other jobs load the machine are not final.

    python bench/mlm_vs_hf.py [--dim 768 --layers 12 --heads 12 --ffn 3072 --vocab 32768] [--batch 32]
                              [--seq 128] [--warmup 2 --rounds 10] [--device cuda] [--bf16]
                              [--lengths uniform|corpus] [--pack-len N] [--no-packed]
    python bench/mlm_vs_hf.py --small        # smoke run: 2 x 128, vocab 4096, batch 8, 3 rounds (any CPU)

Ends with: RESULT name=mlm_vs_hf ours_ms=... peer_ms=... ratio=<peer/ours> mem_ratio=<ours/peer> cpu_ratio=<peer/ours>
load=<1-min load average>, then (packed) RESULT name=mlm_packed packed_ms=... padded_ms=... peer_ms=...
gain=<padded/packed> ratio=<peer/packed> cpu_gain=... rows=<packed rows>/<documents> padding=<padded>/<packed> ...
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time

import torch

from sidebyside import device_line, in_process, medians, memory_text, optimizer_step, result_line


def build(a, device):
    from transformers import DataCollatorForLanguageModeling, PreTrainedTokenizerFast, RobertaConfig, \
        RobertaForMaskedLM
    from tokenizers import Tokenizer, models

    from omnissl.backbones.encoder import Encoder
    from omnissl.backbones.frontends import TokenEmbedding
    from omnissl.backbones.transformer import LearnedPositions, Transformer
    from omnissl.batch import Batch
    from omnissl.optim import param_groups
    from omnissl.ssl.mlm import MaskedLM

    g = torch.Generator().manual_seed(0)
    if a.lengths == "corpus":
        pool = corpus_lengths(a.seq)
        lengths = torch.from_numpy(pool)[torch.randint(len(pool), (a.batch,), generator=g)]
        width = int(lengths.max())  # Collate pads to the longest
    else:
        lengths = torch.randint(a.seq // 2, a.seq + 1, (a.batch,), generator=g)
        width = a.seq
    ids = torch.randint(5, a.vocab, (a.batch, width), generator=g)
    ids[:, 0] = 0
    ids[torch.arange(a.batch), lengths - 1] = 2
    pad = torch.arange(width)[None] >= lengths[:, None]
    ids[pad] = 1

    trunk = Transformer(dim=a.dim, depth=a.layers, heads=a.heads, ffn_dim=a.ffn, pre_norm=False, dropout=0.1,
                        attn_dropout=0.1)
    encoder = Encoder(TokenEmbedding(vocab_size=a.vocab, dim=a.dim, pad_id=1), trunk,
                      positions=LearnedPositions(a.dim, max_len=512), feature_norm=False, project=False)
    ours = MaskedLM(encoder, mask_id=4, special_ids=[0, 1, 2, 3, 4]).to(device).train()
    ours_opt = torch.optim.AdamW(param_groups(ours, 0.01), lr=1e-4, betas=(0.9, 0.98), eps=1e-6)
    batch = Batch({"text": ids}, {"text": lengths}).to(device)
    packed = pack_batch(ids, lengths, a.pack_len or a.seq).to(device)

    cfg = RobertaConfig(vocab_size=a.vocab, hidden_size=a.dim, num_hidden_layers=a.layers,
                        num_attention_heads=a.heads, intermediate_size=a.ffn, max_position_embeddings=514,
                        pad_token_id=1, bos_token_id=0, eos_token_id=2, type_vocab_size=1)
    peer = RobertaForMaskedLM._from_config(cfg, attn_implementation="sdpa").to(device).train()
    peer_opt = torch.optim.AdamW(peer.parameters(), lr=1e-4, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.01)
    vocab = {f"t{i}": i for i in range(a.vocab)}
    for i, name in enumerate(["<s>", "<pad>", "</s>", "<unk>", "<mask>"]):
        vocab.pop(f"t{i}")
        vocab[name] = i
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")),
                                  bos_token="<s>", pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                  mask_token="<mask>", cls_token="<s>", sep_token="</s>")
    collator = DataCollatorForLanguageModeling(tok, mlm_probability=0.15)
    attention_mask = (~pad).long()
    collate_ms: list[float] = []

    def peer_loss():
        t0 = time.perf_counter()
        inputs, labels = collator.torch_mask_tokens(ids.clone())
        collate_ms.append((time.perf_counter() - t0) * 1e3)
        out = peer(input_ids=inputs.to(device), attention_mask=attention_mask.to(device), labels=labels.to(device))
        return out.loss

    resident = {"ours": lambda: resident_bytes(ours, ours_opt), "packed": lambda: resident_bytes(ours, ours_opt),
                "peer": lambda: resident_bytes(peer, peer_opt)}
    steps = {"ours": optimizer_step(lambda: ours.step(batch).loss, ours_opt),
             "peer": optimizer_step(peer_loss, peer_opt)}
    if a.packed:
        steps["packed"] = optimizer_step(lambda: ours.step(packed).loss, ours_opt)
    shapes = {"padded": tuple(ids.shape), "packed": tuple(packed.inputs["text"].shape), "tokens": int(lengths.sum())}
    return steps, collate_ms, resident, shapes


def corpus_lengths(seq: int):
    """Item lengths (specials included) of the embedded docstring corpus cut at `seq` tokens, one item per
    document or piece (TextDataModule packing=False, 4096-entry BPE as recipes/text/mlm_tiny_cpu.yaml)."""
    from omnissl.datamodules.text import TextDataModule

    dm = TextDataModule(train="embedded:text", embedded_size="small", vocab_size=4096, block_size=seq,
                        packing=False, num_workers=0, progress=False)
    dm.prepare_data()
    dm.setup("fit")
    ranges = dm.dataset("train").ranges
    return (ranges[:, 1] - ranges[:, 0] + 1).astype("int64")


def pack_batch(ids: torch.Tensor, lengths: torch.Tensor, width: int):
    """The documents of a padded batch (row i = ids[i, :lengths[i]]) packed whole into rows of at most `width`
    tokens as TextDataModule(break_mode="documents") packs them -> a Batch with segments."""
    from omnissl.batch import Batch
    from omnissl.datamodules.collate import pad_right
    from omnissl.datamodules.token_cache import pack_rows

    order, offsets = pack_rows(lengths.numpy(), width)
    rows, segs = [], []
    for r in range(len(offsets) - 1):
        members = order[offsets[r]:offsets[r + 1]].tolist()
        rows.append(torch.cat([ids[d, : int(lengths[d])] for d in members]))
        segs.append(torch.cat([torch.full((int(lengths[d]),), k) for k, d in enumerate(members)]))
    packed, row_lengths = pad_right(rows, 1)
    segments, _ = pad_right(segs, -1)
    return Batch({"text": packed}, {"text": row_lengths}, segments={"text": segments})


def resident_bytes(model: torch.nn.Module, opt: torch.optim.Optimizer) -> int:
    """Bytes of a side's state that stays between steps: parameters and optimizer state (grads are freed)."""
    tensors = list(model.parameters()) + [v for st in opt.state.values() for v in st.values() if torch.is_tensor(v)]
    return sum(t.numel() * t.element_size() for t in tensors)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name, default in (("dim", 768), ("layers", 12), ("heads", 12), ("ffn", 3072), ("vocab", 32768),
                          ("batch", 32), ("seq", 128), ("warmup", 2), ("rounds", 10)):
        p.add_argument(f"--{name}", type=int, default=default)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast on both sides")
    p.add_argument("--lengths", choices=("uniform", "corpus"), default="uniform",
                   help="document lengths: uniform in [seq/2, seq] (default), or the embedded docstring corpus's")
    p.add_argument("--pack-len", type=int, default=0, help="packed row length (default: --seq)")
    p.add_argument("--no-packed", dest="packed", action="store_false", help="skip the packed variant")
    p.add_argument("--small", action="store_true",
                   help="smoke run: 2 x 128 (2 heads, FFN 512), vocab 4096, batch 8, 1 warm-up and 3 rounds")
    a = p.parse_args()
    if a.warmup < 1:
        p.error("--warmup must be >= 1 (the first step creates the optimizer state)")
    if a.small:
        a.dim, a.layers, a.heads, a.ffn, a.vocab, a.batch, a.warmup, a.rounds = 128, 2, 2, 512, 4096, 8, 1, 3
    device = torch.device(a.device)
    torch.manual_seed(0)
    steps, collate_ms, resident, shapes = build(a, device)
    cuda = device.type == "cuda"
    _, timed = in_process(steps, device, a.bf16, a.warmup, a.rounds)
    ms, cpu = medians(timed), medians(timed, "cpu")  # process CPU time: steadier than wall under load
    # on CUDA: own resident state + what the step added on top of what was allocated; timed steps only: after the
    # first step (warm-up) AdamW's moments are resident, not a rise (and the resident state no longer changes)
    peak = {name: max(resident[name]() + s["peak"] - s["start"] for s in steps_) if cuda else 0
            for name, steps_ in timed.items()}
    mem_ratio = peak["ours"] / peak["peer"] if cuda else math.nan
    print(f"{device_line(device)}; dims {a.dim}x{a.layers}, vocab {a.vocab}, batch {a.batch} x {a.seq}, bf16 {a.bf16}")
    print(f"ours {ms['ours']:.1f} ms, peer {ms['peer']:.1f} ms (+ {statistics.median(collate_ms):.1f} ms of CPU "
          f"masking not counted); {memory_text(peak, cuda)}")
    print(f"CPU time (process, median; meaningful on the CPU device): ours {cpu['ours']:.1f} ms, peer "
          f"{cpu['peer']:.1f} ms, ratio {cpu['peer'] / cpu['ours']:.3f}")
    print(result_line("mlm_vs_hf", ms["ours"], ms["peer"], ms=".2f", mem_ratio=mem_ratio,
                      cpu_ratio=cpu["peer"] / cpu["ours"], load=True))
    if "packed" in steps:
        tokens = shapes["tokens"]
        pk_ms, pk_cpu = ms["packed"], cpu["packed"]
        pad = {k: 1 - tokens / (shapes[k][0] * shapes[k][1]) for k in ("padded", "packed")}
        print(f"packed ({a.lengths} lengths): {tokens} tokens in {shapes['padded'][0]} padded rows of "
              f"{shapes['padded'][1]} (padding {pad['padded']:.1%}) or {shapes['packed'][0]} packed rows of "
              f"{shapes['packed'][1]} (padding {pad['packed']:.1%}); tokens/s ours padded "
              f"{tokens / ms['ours'] * 1e3:.0f}, packed {tokens / pk_ms * 1e3:.0f}, peer padded {tokens / ms['peer'] * 1e3:.0f}"
              + (f"; peak memory packed {peak['packed'] / 2**20:.0f} MiB" if cuda else ""))
        print(f"RESULT name=mlm_packed packed_ms={pk_ms:.2f} padded_ms={ms['ours']:.2f} peer_ms={ms['peer']:.2f} "
              f"gain={ms['ours'] / pk_ms:.3f} ratio={ms['peer'] / pk_ms:.3f} cpu_gain={cpu['ours'] / pk_cpu:.3f} "
              f"rows={shapes['packed'][0]}/{shapes['padded'][0]} padding={pad['padded']:.3f}/{pad['packed']:.3f} "
              f"tokens_per_s={tokens / pk_ms * 1e3:.0f} lengths={a.lengths} load={os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
