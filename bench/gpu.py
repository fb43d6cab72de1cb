"""One short GPU check (under 8 minutes on one H100 / H200): FSDP2 + bf16 on every objective, then training
throughput and MFU of three base models against their Hugging Face peers, on the same GPU in the same run.

1. Smoke: every objective (wav2vec 2.0, HuBERT, data2vec, data2vec 2.0, MAE, MLM; CLAP: one entry in SMOKE) trains
   3 steps through Lightning with recipes/trainer/fsdp.yaml's strategy (FSDP2Strategy, a one-GPU world) and
   precision bf16-mixed, on synthetic data at small sizes; its losses must be finite.
2. Throughput: one training step (forward, backward, fused AdamW step, in bf16 autocast with fp32 weights, as
   `bf16-mixed`) of
     - wav2vec 2.0 BASE on 15.6 s crops (fairseq's max_sample_size 250 000) vs `Wav2Vec2ForPreTraining`
       (BASE config: group-norm extractor, post-LN; masks and negatives prepared outside the timed step, as a
       DataLoader worker would; ours draws them on the GPU inside the step);
     - MAE ViT-B/16 at 224 (mask 0.75, decoder 512 x 8, norm_pix_loss) vs `ViTMAEForPreTraining`;
     - MLM RoBERTa-base at sequence 128 (mask 15 %, 80/10/10) vs `RobertaForMaskedLM` (masks prepared outside);
   each side alone on the GPU (the other freed), warm-up steps then timed steps, and ours once more with
   compiled blocks (omnissl.train.blocks.TrunkBlocks) unless --no-compile.

MFU (PaLM, Chowdhery et al. 2022, app. B): model FLOPs per step / (step time x peak bf16 FLOP/s), model FLOPs =
6 x N x tokens + 12 x L x D x sum(T^2) (attention) over the real tokens only: the crop's frames, the 49 visible
patches in the MAE encoder and all 196 + 1 in its decoder, MLM's non-padding tokens (its LM head on the
masked ones only), plus the conv feature extractor's FLOPs for wav2vec 2.0 (2 x C_in x C_out x K per output
frame forward; x3 with the backward, x2 for the first layer whose input needs no gradient). N excludes the
token embedding. Both sides are divided by the same FLOPs, so the MFU ratio is the throughput ratio. Peak:
989 TFLOP/s for H100 SXM and H200, 756 for H100 PCIe (dense bf16), or --peak-tflops.

    python bench/gpu.py                      # on a GPU machine; writes $OUT/gpu.json when OUT is set
    python bench/gpu.py --cpu-smoke          # the same code path on the CPU at tiny sizes (CI, no GPU)

Prints RESULT lines:
    RESULT name=gpu_smoke_<objective> ok=1 loss=...
    RESULT name=gpu_<model> ours_sps=... peer_sps=... ratio=<ours/peer> ours_mfu=... peer_mfu=...
           compiled_sps=... compiled_mfu=... ours_mem_gb=... peer_mem_gb=...
Goals (issue 15): wav2vec 2.0 BASE >= 25 % MFU, MAE ViT-B >= 35 %, MLM base >= 45 %, >= 1.5x the peer.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

# sizes per mode: "base" on a GPU, "tiny" for --cpu-smoke (the same code, minutes -> seconds)
SIZES = {
    "base": dict(dim=768, layers=12, heads=12, ffn=3072, conv=512, pos_kernel=128, pos_groups=16, final_dim=256,
                 codebook=320, negatives=100, crop_s=15.6, w2v_batch=8, image=224, patch=16, dec_dim=512,
                 dec_layers=8, dec_heads=16, mae_batch=128, vocab=50265, seq=128, mlm_batch=256, warmup=3, steps=10),
    "tiny": dict(dim=64, layers=2, heads=4, ffn=256, conv=64, pos_kernel=16, pos_groups=4, final_dim=32,
                 codebook=16, negatives=10, crop_s=1.0, w2v_batch=2, image=32, patch=16, dec_dim=32, dec_layers=1,
                 dec_heads=4, mae_batch=4, vocab=512, seq=32, mlm_batch=4, warmup=1, steps=2),
}
CONV_SHAPE = ((10, 5),) + ((3, 2),) * 4 + ((2, 2),) * 2  # wav2vec 2.0's (kernel, stride) per conv layer
PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.4), ("H200", 989.4), ("GH200", 989.4), ("A100", 312.0))


def peak_flops(device: torch.device, override: float | None) -> float:
    if override:
        return override * 1e12
    if device.type != "cuda":
        return float("nan")
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_TFLOPS:
        if key in name:
            return tflops * 1e12
    return float("nan")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- 1. smoke: every objective under FSDP2 + bf16-mixed through Lightning ---------------------------------------

def smoke_models():
    """{objective: (model factory, DataModule factory)} at small sizes; CLAP: add one entry here."""
    from omnissl.backbones.builders import tiny
    from omnissl.datamodules.synthetic import SyntheticDataModule
    from omnissl.ssl.data2vec import Data2Vec
    from omnissl.ssl.data2vec2 import Data2Vec2
    from omnissl.ssl.frames import encoder_frames
    from omnissl.ssl.heads import ConvDecoder1d
    from omnissl.ssl.hubert import HuBERT
    from omnissl.ssl.mae import MAE
    from omnissl.ssl.mlm import MaskedLM
    from omnissl.ssl.wav2vec2 import Wav2Vec2

    def audio(units_for=None):
        frames = None if units_for is None else lambda n: int(encoder_frames(units_for, torch.tensor([n]))[0])
        return SyntheticDataModule(modality="audio", train_size=16, valid_size=0, batch_size=4, min_samples=16000,
                                   max_samples=32000, unit_frames=frames)

    def hubert():
        model = HuBERT(tiny("audio"), num_classes=10, final_dim=32)
        return model, audio(model.encoder)

    def data2vec2():
        enc = tiny("audio")
        return Data2Vec2(enc, top_k=2, clone_batch=2, decoder=ConvDecoder1d(in_dim=enc.dim, dim=32, layers=2,
                                                                            groups=4)), audio()

    return {
        "wav2vec2": lambda: (Wav2Vec2(tiny("audio"), final_dim=32, codebook_entries=16, num_distractors=10), audio()),
        "hubert": hubert,
        "data2vec": lambda: (Data2Vec(tiny("audio"), top_k=2), audio()),
        "data2vec2": data2vec2,
        "mae": lambda: (MAE(tiny("image"), decoder_dim=32, decoder_depth=1, decoder_heads=4),
                        SyntheticDataModule(modality="image", train_size=16, valid_size=0, batch_size=4)),
        "mlm": lambda: (MaskedLM(tiny("text", vocab_size=256), mask_id=3, special_ids=[0, 1, 2, 3]),
                        SyntheticDataModule(modality="text", train_size=16, valid_size=0, batch_size=4,
                                            vocab_size=256, seq_len=32)),
    }


def smoke(device: torch.device) -> dict:
    import lightning as L

    from omnissl.train.strategies import FSDP2Strategy

    out = {}
    for name, build in smoke_models().items():
        L.seed_everything(0, verbose=False)
        model, dm = build()
        losses: list[float] = []

        class Keep(L.Callback):
            def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
                losses.append(float(outputs["loss"]) if isinstance(outputs, dict) else float(outputs))

        start = time.perf_counter()
        trainer = L.Trainer(accelerator=device.type, devices=1, strategy=FSDP2Strategy(), precision="bf16-mixed",
                            max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, limit_val_batches=0, callbacks=[Keep()])
        trainer.fit(model, dm)
        sharded = type(next(model.encoder.trunk.blocks[0].parameters())).__name__
        ok = len(losses) == 3 and all(math.isfinite(v) for v in losses) and sharded == "DTensor"
        out[name] = {"ok": ok, "losses": losses, "param": sharded, "seconds": time.perf_counter() - start}
        print(f"RESULT name=gpu_smoke_{name} ok={int(ok)} loss={losses[-1] if losses else float('nan'):.4f}",
              flush=True)
        del model, dm, trainer
        gc.collect()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return out


# --- 2. throughput and MFU ------------------------------------------------------------------------------------

def trunk_flops(n_params: int, layers: int, dim: int, lengths: list[int]) -> float:
    """PaLM's training FLOPs of a transformer over sequences of the given real lengths."""
    return 6.0 * n_params * sum(lengths) + 12.0 * layers * dim * sum(t * t for t in lengths)


def conv_flops(channels: int, samples: int) -> tuple[float, int]:
    """Training FLOPs of wav2vec 2.0's conv feature extractor on one crop, and its output frames."""
    total, c_in, t = 0.0, 1, samples
    for i, (k, s) in enumerate(CONV_SHAPE):
        t = (t - k) // s + 1
        total += (2 if i == 0 else 3) * 2.0 * c_in * channels * k * t
        c_in = channels
    return total, t


def count(module: torch.nn.Module, skip: tuple[str, ...] = ()) -> int:
    return sum(p.numel() for n, p in module.named_parameters() if not n.startswith(skip))


def wav2vec2_case(z, device):
    from transformers import Wav2Vec2Config, Wav2Vec2ForPreTraining
    from transformers.models.wav2vec2.modeling_wav2vec2 import _compute_mask_indices, _sample_negative_indices

    from omnissl.backbones.encoder import Encoder
    from omnissl.backbones.frontends import ConvFeatureExtractor
    from omnissl.backbones.transformer import ConvPositions, Transformer
    from omnissl.batch import Batch
    from omnissl.ssl.wav2vec2 import Wav2Vec2

    b, t = z["w2v_batch"], int(z["crop_s"] * 16000)
    audio = torch.randn(b, t, generator=torch.Generator().manual_seed(0)).mul_(0.1).to(device)
    conv = tuple((z["conv"], k, s) for k, s in CONV_SHAPE)

    def ours():
        trunk = Transformer(dim=z["dim"], depth=z["layers"], heads=z["heads"], ffn_dim=z["ffn"], pre_norm=False,
                            dropout=0.1, attn_dropout=0.1)
        enc = Encoder(ConvFeatureExtractor(layers=conv, mode="group"), trunk,
                      positions=ConvPositions(z["dim"], kernel=z["pos_kernel"], groups=z["pos_groups"], dropout=0.1),
                      dropout_input=0.1)
        model = Wav2Vec2(enc, final_dim=z["final_dim"], codebook_entries=z["codebook"],
                         num_distractors=z["negatives"], min_code_perplexity=0.0)
        batch = Batch({"audio": audio}, {"audio": torch.full((b,), t, device=device)}, ids=torch.arange(b))
        return model, lambda: model.step(batch).loss

    def peer():
        cfg = Wav2Vec2Config(
            hidden_size=z["dim"], num_hidden_layers=z["layers"], num_attention_heads=z["heads"],
            intermediate_size=z["ffn"], conv_dim=(z["conv"],) * 7, conv_kernel=tuple(k for k, _ in CONV_SHAPE),
            conv_stride=tuple(s for _, s in CONV_SHAPE), feat_extract_norm="group", do_stable_layer_norm=False,
            hidden_dropout=0.1, attention_dropout=0.1, activation_dropout=0.0, feat_proj_dropout=0.1,
            feat_quantizer_dropout=0.0, layerdrop=0.0, mask_time_prob=0.65, mask_time_length=10,
            num_negatives=z["negatives"], codevector_dim=z["final_dim"], proj_codevector_dim=z["final_dim"],
            num_codevectors_per_group=z["codebook"], num_codevector_groups=2, diversity_loss_weight=0.1,
            num_conv_pos_embeddings=z["pos_kernel"], num_conv_pos_embedding_groups=z["pos_groups"],
        )  # fmt: skip
        model = Wav2Vec2ForPreTraining._from_config(cfg, attn_implementation="sdpa")
        seq = int(model._get_feat_extract_output_lengths(t))
        mask = _compute_mask_indices((b, seq), cfg.mask_time_prob, cfg.mask_time_length, min_masks=2)
        negs = _sample_negative_indices((b, seq), cfg.num_negatives, mask_time_indices=mask)
        mask_t = torch.tensor(mask, dtype=torch.bool, device=device)
        negs_t = torch.tensor(negs, dtype=torch.long, device=device)
        n = mask_t.sum()
        return model, lambda: model(audio, mask_time_indices=mask_t, sampled_negative_indices=negs_t).loss / n

    cflops, frames = conv_flops(z["conv"], t)

    def flops(model) -> float:
        # every parameter outside the conv frontend acts once per frame (trunk, positions, projections, heads)
        n = count(model, skip=("encoder.frontend.",))
        return b * cflops + trunk_flops(n, z["layers"], z["dim"], [frames] * b)

    return ours, peer, flops, b, b * frames


def mae_case(z, device):
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    from omnissl.backbones.encoder import Encoder
    from omnissl.backbones.frontends import ImagePatches
    from omnissl.backbones.transformer import SinCosPositions, Transformer
    from omnissl.batch import Batch
    from omnissl.ssl.mae import MAE

    b, size, patch = z["mae_batch"], z["image"], z["patch"]
    images = torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)

    def ours():
        trunk = Transformer(dim=z["dim"], depth=z["layers"], heads=z["heads"], ffn_dim=z["ffn"], pre_norm=True,
                            dropout=0.0, attn_dropout=0.0, eps=1e-6)
        enc = Encoder(ImagePatches(dim=z["dim"], patch=patch), trunk, positions=SinCosPositions(z["dim"], two_d=True),
                      feature_norm=False, cls_token=True)
        model = MAE(enc, decoder_dim=z["dec_dim"], decoder_depth=z["dec_layers"], decoder_heads=z["dec_heads"])
        batch = Batch({"image": images}, {}, ids=torch.arange(b))
        return model, lambda: model.step(batch).loss

    def peer():
        cfg = ViTMAEConfig(hidden_size=z["dim"], num_hidden_layers=z["layers"], num_attention_heads=z["heads"],
                           intermediate_size=z["ffn"], image_size=size, patch_size=patch,
                           decoder_hidden_size=z["dec_dim"], decoder_num_hidden_layers=z["dec_layers"],
                           decoder_num_attention_heads=z["dec_heads"], decoder_intermediate_size=4 * z["dec_dim"],
                           mask_ratio=0.75, norm_pix_loss=True)
        model = ViTMAEForPreTraining._from_config(cfg, attn_implementation="sdpa")
        return model, lambda: model(pixel_values=images).loss

    patches = (size // patch) ** 2
    visible = int(patches * (1 - 0.75))

    def flops(model) -> float:
        enc = 12 * z["dim"] ** 2 + 13 * z["dim"]  # one block's parameters (attention 4D^2, FFN 8D^2, norms, biases)
        dec = 12 * z["dec_dim"] ** 2 + 13 * z["dec_dim"]
        embed = 3 * patch * patch * z["dim"]  # the patch projection, on every patch
        head = z["dim"] * z["dec_dim"] + z["dec_dim"] * 3 * patch * patch  # decoder in/out projections
        return b * (6.0 * embed * patches + 6.0 * head * (patches + 1)) + \
            trunk_flops(z["layers"] * enc, z["layers"], z["dim"], [visible + 1] * b) + \
            trunk_flops(z["dec_layers"] * dec, z["dec_layers"], z["dec_dim"], [patches + 1] * b)

    return ours, peer, flops, b, b * (visible + 1)


def mlm_case(z, device):
    from transformers import RobertaConfig, RobertaForMaskedLM

    from omnissl.backbones.encoder import Encoder
    from omnissl.backbones.frontends import TokenEmbedding
    from omnissl.backbones.transformer import LearnedPositions, Transformer
    from omnissl.batch import Batch
    from omnissl.ssl.mlm import MaskedLM

    b, seq, vocab = z["mlm_batch"], z["seq"], z["vocab"]
    mask_id, specials = vocab - 1, [0, 1, 2, 3, vocab - 1]  # RoBERTa: <s> <pad> </s> <unk>, <mask> last
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, vocab - 1, (b, seq), generator=g)
    ids[:, 0], ids[:, -1] = 0, 2  # full-length rows: every token is real
    ids = ids.to(device)

    def ours():
        trunk = Transformer(dim=z["dim"], depth=z["layers"], heads=z["heads"], ffn_dim=z["ffn"], pre_norm=False,
                            dropout=0.1, attn_dropout=0.1)
        enc = Encoder(TokenEmbedding(vocab_size=vocab, dim=z["dim"], pad_id=1), trunk,
                      positions=LearnedPositions(z["dim"], max_len=512), feature_norm=False, project=False)
        model = MaskedLM(enc, mask_id=mask_id, special_ids=specials)
        batch = Batch({"text": ids}, {"text": torch.full((b,), seq, device=device)}, ids=torch.arange(b))
        return model, lambda: model.step(batch).loss

    def peer():
        cfg = RobertaConfig(vocab_size=vocab, hidden_size=z["dim"], num_hidden_layers=z["layers"],
                            num_attention_heads=z["heads"], intermediate_size=z["ffn"], max_position_embeddings=514,
                            pad_token_id=1, bos_token_id=0, eos_token_id=2)
        model = RobertaForMaskedLM._from_config(cfg, attn_implementation="sdpa")
        # DataCollatorForLanguageModeling's masking, prepared outside the timed step (a DataLoader worker's job)
        gm = torch.Generator().manual_seed(1)
        cpu = ids.cpu()
        selected = (torch.rand(cpu.shape, generator=gm) < 0.15) & (cpu > 3)
        labels = torch.where(selected, cpu, torch.full_like(cpu, -100))
        r = torch.rand(cpu.shape, generator=gm)
        inputs = torch.where(selected & (r < 0.8), torch.full_like(cpu, mask_id), cpu)
        inputs = torch.where(selected & (r >= 0.8) & (r < 0.9), torch.randint(4, vocab - 1, cpu.shape, generator=gm),
                             inputs)
        inputs, labels = inputs.to(device), labels.to(device)
        attention = torch.ones_like(inputs)
        return model, lambda: model(input_ids=inputs, attention_mask=attention, labels=labels).loss

    def flops(model) -> float:
        d = z["dim"]
        block = 12 * d * d + 13 * d
        head = d * d + d * vocab  # dense + decoder (tied), on the masked tokens only
        masked = 0.15 * b * (seq - 2)
        return trunk_flops(z["layers"] * block, z["layers"], d, [seq] * b) + 6.0 * head * masked

    return ours, peer, flops, b, b * seq


def timed(build, device: torch.device, z: dict, compile_blocks: bool) -> dict:
    """Steps per second of one side, and its peak memory; the model and optimizer are freed afterwards."""
    torch.manual_seed(0)
    model, loss_fn = build()
    model = model.to(device).train()
    if compile_blocks:
        from omnissl.train.blocks import TrunkBlocks

        TrunkBlocks(compile=True).apply(model)
    fused = device.type == "cuda"
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, betas=(0.9, 0.98),
                            eps=1e-6, weight_decay=0.01, fused=fused)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def step() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = loss_fn()
        loss.backward()
        opt.step()
        return loss.detach()

    start = time.perf_counter()
    for _ in range(z["warmup"]):
        loss = step()
    sync(device)
    warm = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(z["steps"]):
        loss = step()
    sync(device)
    seconds = (time.perf_counter() - start) / z["steps"]
    mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return {"step_s": seconds, "warmup_s": warm, "loss": float(loss), "mem_gb": mem, "model": model}


def throughput(device: torch.device, z: dict, compile_blocks: bool, peak: float) -> dict:
    results = {}
    for name, case in (("wav2vec2_base", wav2vec2_case), ("mae_vitb16", mae_case), ("mlm_base", mlm_case)):
        ours, peer, flops, samples, tokens = case(z, device)
        row: dict = {"samples_per_step": samples, "tokens_per_step": tokens}
        sides = [("ours", ours, False), ("peer", peer, False)] + ([("compiled", ours, True)] if compile_blocks else [])
        f = None
        for side, build, comp in sides:
            r = timed(build, device, z, comp)
            model = r.pop("model")
            f = flops(model) if f is None else f  # from our model (named parameters), the same for every side
            del model
            row[side] = {**r, "flops_per_step": f, "samples_per_s": samples / r["step_s"],
                         "mfu": f / r["step_s"] / peak}
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        o, p = row["ours"], row["peer"]
        row["ratio"] = o["samples_per_s"] / p["samples_per_s"]
        line = (f"RESULT name=gpu_{name} ours_sps={o['samples_per_s']:.2f} peer_sps={p['samples_per_s']:.2f} "
                f"ratio={row['ratio']:.3f} ours_mfu={o['mfu']:.3f} peer_mfu={p['mfu']:.3f}")
        if "compiled" in row:
            c = row["compiled"]
            line += f" compiled_sps={c['samples_per_s']:.2f} compiled_mfu={c['mfu']:.3f} compile_s={c['warmup_s']:.0f}"
        line += f" ours_mem_gb={o['mem_gb']:.1f} peer_mem_gb={p['mem_gb']:.1f}"
        print(line, flush=True)
        results[name] = row
    return results


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu-smoke", "--dry-run", action="store_true",
                   help="run the same code path on the CPU at tiny sizes (no GPU needed; checks nothing crashes)")
    p.add_argument("--no-compile", action="store_true", help="skip the compiled-blocks run of our models")
    p.add_argument("--skip-smoke", action="store_true", help="only the throughput part")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="the GPU's dense bf16 peak in TFLOP/s (default: from the device name; nan when unknown)")
    p.add_argument("--out", default=os.environ.get("OUT"), help="folder for gpu.json (default: $OUT, if set)")
    a = p.parse_args(argv)
    if not a.cpu_smoke and not torch.cuda.is_available():
        p.error("no CUDA device: run on a GPU machine, or use --cpu-smoke to check the code path on the CPU")
    device = torch.device("cpu" if a.cpu_smoke else "cuda")
    z = SIZES["tiny" if a.cpu_smoke else "base"]
    start = time.perf_counter()
    info = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__, "cuda": torch.version.cuda, "mode": "cpu-smoke" if a.cpu_smoke else "gpu",
            "load_avg": os.getloadavg()}
    print(f"bench/gpu.py: {info}", flush=True)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    result = dict(info)
    if not a.skip_smoke:
        result["smoke"] = smoke(device)
    peak = peak_flops(device, a.peak_tflops)
    result["peak_flops"] = peak
    result["throughput"] = throughput(device, z, not a.no_compile, peak)
    result["seconds"] = time.perf_counter() - start
    print(f"bench/gpu.py: done in {result['seconds']:.0f} s", flush=True)
    if a.out:
        Path(a.out).mkdir(parents=True, exist_ok=True)
        (Path(a.out) / "gpu.json").write_text(json.dumps(result, indent=1, default=str))
    return result


if __name__ == "__main__":
    main()
