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

Each side (ours, peer, packed: ours' model, same seed, same init) runs in its own fresh worker process
(bench/sidebyside.py; --threads torch threads each, default torch's own, i.e. OMP_NUM_THREADS), driven step by
step from this process in interleaved rounds (order alternating); all train on the same batch, made once here
(seed 0) and handed to the workers, each of which builds its side's inputs (the padded or packed Batch, or HF's
collator) before its model. Medians are reported, with each worker's median process CPU time per step (steadier
than wall time on a loaded machine; `cpu_ratio` = peer / ours). Memory: on the CPU each worker's resident-set high-water
mark (VmHWM) minus its RSS before its model was built (parameters, AdamW moments, gradients, activations and the
step's temporaries; run with the GLIBC_TUNABLES below so that glibc returns nothing and the high-water mark holds
every transient peak); on CUDA torch.cuda.max_memory_allocated minus the memory allocated before the model
(the allocator's count, its cache excluded). mem_ratio = ours / peer (< 1: ours uses less). As an
allocator-independent cross-check the table lists the bytes autograd saves for backward in the last warm-up step
(each storage once, parameters excluded). The workers live through the whole run, each holding its peak: at the
defaults on the CPU about 23 GB of RAM together (peak RSS: ours 6.6, peer 10.2 GB, packed ~6.5 GB; --no-packed
saves the third; --batch 8 about 11 GB). The machine's load average is printed beside the timings: numbers taken
while other jobs load the machine are not final.

    GLIBC_TUNABLES=glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=68719476736 \\
        python bench/mlm_vs_hf.py [--dim 768 --layers 12 --heads 12 --ffn 3072 --vocab 32768] [--batch 32]
                                  [--seq 128] [--warmup 2 --rounds 10] [--threads N] [--device cuda] [--bf16]
                                  [--lengths uniform|corpus] [--pack-len N] [--no-packed]
    python bench/mlm_vs_hf.py --small        # smoke run: 2 x 128, vocab 4096, batch 8, 3 rounds (any CPU)

Ends with: RESULT name=mlm_vs_hf ours_ms=... peer_ms=... ratio=<peer/ours> mem_ratio=<ours/peer> cpu_ratio=<peer/ours>
load=<1-min load average>, then (packed) RESULT name=mlm_packed packed_ms=... padded_ms=... peer_ms=...
gain=<padded/packed> ratio=<peer/packed> cpu_gain=... rows=<packed rows>/<documents> padding=<padded>/<packed> ...
mem_ratio=<packed/peer> mem_gain=<padded/packed> load=...
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch

from sidebyside import add_worker_args, check_finite, device_line, memory_table, optimizer_step, result_line, \
    round_line, run_workers, serve, step_legend

SIDES = ("ours", "peer", "packed")  # round-0 order; "packed" only with --packed
SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]  # RoBERTa's, at ids 0..4


def make_inputs(a) -> dict:
    """The padded batch both sides train on (seed 0): {"ids": (batch, width) with <s> first, </s> last, <pad>
    after, "lengths": (batch,)}."""
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
    ids[torch.arange(width)[None] >= lengths[:, None]] = 1
    return {"ids": ids, "lengths": lengths}


def peer_collator(vocab_size: int):
    """HF's `DataCollatorForLanguageModeling` (15 %, 80/10/10) over a word-level tokenizer of `vocab_size` ids
    with RoBERTa's specials at 0..4."""
    from tokenizers import Tokenizer, models
    from transformers import DataCollatorForLanguageModeling, PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(len(SPECIALS), vocab_size)} | {name: i for i, name in enumerate(SPECIALS)}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")),
                                  bos_token="<s>", pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                  mask_token="<mask>", cls_token="<s>", sep_token="</s>")
    return DataCollatorForLanguageModeling(tok, mlm_probability=0.15)


def side_inputs(a, side: str, inputs: dict, device):
    """What a DataLoader hands `side` (made before its model: not its memory): ours the padded Batch, packed the
    packed Batch, the peer (collator, ids, attention mask)."""
    from omnissl.batch import Batch

    ids, lengths = inputs["ids"], inputs["lengths"]
    if side == "ours":
        return Batch({"text": ids}, {"text": lengths}).to(device)
    if side == "packed":
        return pack_batch(ids, lengths, a.pack_len or a.seq).to(device)
    return peer_collator(a.vocab), ids, (ids != 1).long()


def build_side(a, side: str, data, device):
    """One side's model on `device` and its training step -> (model, step, prepare or None); data: `side_inputs`."""
    from omnissl.backbones.encoder import Encoder
    from omnissl.backbones.frontends import TokenEmbedding
    from omnissl.backbones.transformer import LearnedPositions, Transformer
    from omnissl.optim import param_groups
    from omnissl.ssl.mlm import MaskedLM
    from transformers import RobertaConfig, RobertaForMaskedLM

    if side in ("ours", "packed"):
        trunk = Transformer(dim=a.dim, depth=a.layers, heads=a.heads, ffn_dim=a.ffn, pre_norm=False, dropout=0.1,
                            attn_dropout=0.1)
        encoder = Encoder(TokenEmbedding(vocab_size=a.vocab, dim=a.dim, pad_id=1), trunk,
                          positions=LearnedPositions(a.dim, max_len=512), feature_norm=False, project=False)
        ours = MaskedLM(encoder, mask_id=4, special_ids=[0, 1, 2, 3, 4]).to(device).train()
        opt = torch.optim.AdamW(param_groups(ours, 0.01), lr=1e-4, betas=(0.9, 0.98), eps=1e-6)
        return ours, optimizer_step(lambda: ours.step(data).loss, opt), None

    cfg = RobertaConfig(vocab_size=a.vocab, hidden_size=a.dim, num_hidden_layers=a.layers,
                        num_attention_heads=a.heads, intermediate_size=a.ffn, max_position_embeddings=514,
                        pad_token_id=1, bos_token_id=0, eos_token_id=2, type_vocab_size=1)
    peer = RobertaForMaskedLM._from_config(cfg, attn_implementation="sdpa").to(device).train()
    opt = torch.optim.AdamW(peer.parameters(), lr=1e-4, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.01)
    collator, ids, attention_mask = data
    masked: dict = {}

    def prepare():  # the collator's masking, on the CPU as in a DataLoader worker: timed apart, not counted
        masked["inputs"], masked["labels"] = collator.torch_mask_tokens(ids.clone())

    def loss():
        return peer(input_ids=masked["inputs"].to(device), attention_mask=attention_mask.to(device),
                    labels=masked["labels"].to(device)).loss

    return peer, optimizer_step(loss, opt), prepare


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


def worker(a) -> None:
    import importlib

    # every worker imports the same libraries and makes its inputs before its model: comparable baselines
    for lib in ("transformers", "tokenizers", "omnissl.ssl.mlm", "omnissl.datamodules.token_cache",
                "omnissl.datamodules.collate"):
        importlib.import_module(lib)
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    device = torch.device(a.device)
    data = side_inputs(a, a.worker, torch.load(a.inputs, weights_only=True), device)
    serve(lambda: build_side(a, a.worker, data, device), device, a.bf16)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name, default in (("dim", 768), ("layers", 12), ("heads", 12), ("ffn", 3072), ("vocab", 32768),
                          ("batch", 32), ("seq", 128)):
        p.add_argument(f"--{name}", type=int, default=default)
    add_worker_args(p, warmup=2, rounds=10, threads=0, sides=SIDES)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--lengths", choices=("uniform", "corpus"), default="uniform",
                   help="document lengths: uniform in [seq/2, seq] (default), or the embedded docstring corpus's")
    p.add_argument("--pack-len", type=int, default=0, help="packed row length (default: --seq)")
    p.add_argument("--no-packed", dest="packed", action="store_false", help="skip the packed variant")
    p.add_argument("--small", action="store_true",
                   help="smoke run: 2 x 128 (2 heads, FFN 512), vocab 4096, batch 8, 1 warm-up and 3 rounds")
    p.add_argument("--inputs", help=argparse.SUPPRESS)  # internal: the workers' inputs file
    a = p.parse_args()
    if a.worker:
        return worker(a)
    if a.warmup < 1:
        p.error("--warmup must be >= 1 (the first step creates the optimizer state)")
    if a.small:
        a.dim, a.layers, a.heads, a.ffn, a.vocab, a.batch, a.warmup, a.rounds = 128, 2, 2, 512, 4096, 8, 1, 3
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("WANDB_MODE", "offline")
    device = torch.device(a.device)
    inputs = make_inputs(a)
    ids, lengths = inputs["ids"], inputs["lengths"]
    packed = pack_batch(ids, lengths, a.pack_len or a.seq).inputs["text"]
    sides = SIDES if a.packed else SIDES[:2]
    print(f"{device_line(device, a.threads)}; dims {a.dim}x{a.layers}, vocab {a.vocab}, batch {a.batch} x {a.seq}, "
          f"bf16 {a.bf16}; warm-up {a.warmup}, {a.rounds} interleaved rounds, sides {', '.join(sides)} each in its "
          f"own worker; GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '(unset)')}", flush=True)
    with tempfile.TemporaryDirectory(prefix="mlm_vs_hf_") as tmp:
        path = os.path.join(tmp, "inputs.pt")
        torch.save(inputs, path)
        keys = ("dim", "layers", "heads", "ffn", "vocab", "batch", "seq", "threads", "device", "lengths", "pack_len")

        def argv(name: str) -> list[str]:
            return [os.path.abspath(__file__), "--worker", name, "--inputs", path] + [
                v for k in keys for v in (f"--{k.replace('_', '-')}", str(getattr(a, k)))] + (
                ["--bf16"] if a.bf16 else [])

        res = run_workers(argv, a.warmup, a.rounds, after_round=round_line("mlm"), sides=sides)
    check_finite(res)
    o, q = res["ours"], res["peer"]
    print()
    memory_table({"padded" if layout == "ours" else layout: {"ours": res[layout], "peer": q}
                  for layout in sides if layout != "peer"}, "ours' layout",
                 loss=True)
    step_legend(o, q, f"Peer: + {q['prep']:.1f} ms of CPU masking per step (HF's collator, as in a DataLoader "
                      f"worker) not counted; ")
    print(result_line("mlm_vs_hf", o["median"], q["median"], ms=".2f", mem_ratio=o["delta"] / q["delta"],
                      cpu_ratio=q["cpu"] / o["cpu"], load=True))
    if "packed" in res:
        pk = res["packed"]
        tokens = int(lengths.sum())
        shapes = {"padded": tuple(ids.shape), "packed": tuple(packed.shape)}
        pad = {k: 1 - tokens / (shapes[k][0] * shapes[k][1]) for k in ("padded", "packed")}
        print(f"packed ({a.lengths} lengths): {tokens} tokens in {shapes['padded'][0]} padded rows of "
              f"{shapes['padded'][1]} (padding {pad['padded']:.1%}) or {shapes['packed'][0]} packed rows of "
              f"{shapes['packed'][1]} (padding {pad['packed']:.1%}); tokens/s ours padded "
              f"{tokens / o['median'] * 1e3:.0f}, packed {tokens / pk['median'] * 1e3:.0f}, peer padded "
              f"{tokens / q['median'] * 1e3:.0f}; peak memory (step) packed {pk['delta']:.0f} MiB, padded "
              f"{o['delta']:.0f} MiB, peer {q['delta']:.0f} MiB")
        print(f"RESULT name=mlm_packed packed_ms={pk['median']:.2f} padded_ms={o['median']:.2f} "
              f"peer_ms={q['median']:.2f} gain={o['median'] / pk['median']:.3f} ratio={q['median'] / pk['median']:.3f} "
              f"cpu_gain={o['cpu'] / pk['cpu']:.3f} rows={shapes['packed'][0]}/{shapes['padded'][0]} "
              f"padding={pad['padded']:.3f}/{pad['packed']:.3f} tokens_per_s={tokens / pk['median'] * 1e3:.0f} "
              f"lengths={a.lengths} mem_ratio={pk['delta'] / q['delta']:.3f} mem_gain={o['delta'] / pk['delta']:.3f} "
              f"load={os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
