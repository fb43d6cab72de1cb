"""Audio from local litdata shards vs from the manifest's files, both through the full `AudioDataModule`
(decode, crop, length-bucketed batches under max_tokens, collate), same crops, same workers.

    python bench/stream_throughput.py [--manifest M.tsv] [--workers 2] [--rounds 3]

Default corpus: the embedded speech corpus (default size, train split: 1,038 utterances, 2.1 h of 16 kHz 16-bit
WAV; `--size small`: 147 utterances, an epoch of about 2 shard pools, where a pass is mostly the wait for each
worker's first pool). The manifest is sharded once
(`write_shards`: 16-bit PCM in zstd-compressed litdata chunks, or FLAC with --audio-format flac) into a
temporary folder; litdata's cache is a temporary folder
too. After one warm-up epoch of each (page cache, litdata's chunk copies), `--rounds` epochs of each are timed,
interleaved so load from other processes hits both alike; the median samples per second of each is reported:

    RESULT name=stream_vs_files ratio=<shards/files samples per s> shard_bytes=... files_bytes=... ...

`ratio` counts whole epochs; `steady_ratio` the rates after each epoch's first batch (a shard pass hands out
its first batch once a worker has decoded a whole pool of `--shard-pool` items), which is what a corpus of many
hours sees; `cpu_ratio` is files / shards CPU seconds per sample, summed over the main process and its DataLoader
workers (less disturbed by other processes than the wall clock).

Goal: ratio >= 1.0 with shard_bytes < files_bytes. The load average is printed beside the numbers (timings on a
shared machine are skewed by other processes).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from omnissl.datamodules.audio import AudioDataModule
from omnissl.datamodules.audio_io import read_audio_manifest
from omnissl.datamodules.corpora import embedded_corpus
from omnissl.datamodules.shards import write_shards


def cpu_seconds() -> float:
    """CPU seconds (user + system) of this process, its finished children and its live children (the DataLoader
    workers, read from /proc): what a pass costs, which other processes on the machine disturb less than the
    wall clock."""
    t = os.times()
    total = t.user + t.system + t.children_user + t.children_system
    me, tick = os.getpid(), os.sysconf("SC_CLK_TCK")
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        if int(fields[1]) == me:
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def epoch(loader) -> tuple[int, float, int, float, float]:
    """(samples, seconds, samples of the first batch, seconds to the first batch, CPU seconds) of one pass."""
    c0, t0 = cpu_seconds(), time.perf_counter()
    n, first, first_n = 0, None, 0
    for b in loader:
        if first is None:
            first, first_n = time.perf_counter() - t0, len(b.ids)
        n += len(b.ids)
    return n, time.perf_counter() - t0, first_n, first or 0.0, cpu_seconds() - c0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--manifest", type=Path, default=None, help="default: embedded speech (--size) train")
    p.add_argument("--size", default="default", help="embedded speech size when no --manifest is given")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--max-samples", type=int, default=64_000, help="crop (4 s, the tiny recipes')")
    p.add_argument("--max-tokens", type=int, default=384_000)
    p.add_argument("--shard-pool", type=int, default=64, help="items per litdata batch, cut into max_tokens batches")
    p.add_argument("--audio-format", choices=["pcm", "flac"], default="pcm", help="how the shards hold audio")
    args = p.parse_args(argv)
    manifest = args.manifest or embedded_corpus(f"embedded:speech:{args.size}")["train"]
    m = read_audio_manifest(manifest)
    files_bytes = sum(os.path.getsize(m.root / path) for path in m.paths)
    with tempfile.TemporaryDirectory(prefix="omnissl-stream-bench-") as tmp:
        os.environ["OMNISSL_SHARD_CACHE"] = str(Path(tmp) / "cache")
        shards = Path(tmp) / "shards"
        t0 = time.perf_counter()
        write_shards(manifest, str(shards), chunk_bytes="16MB", num_workers=1, audio_format=args.audio_format)
        shard_time = time.perf_counter() - t0
        shard_bytes = sum(f.stat().st_size for f in shards.iterdir())
        kw = dict(max_samples=args.max_samples, min_samples=0, max_tokens=args.max_tokens,
                  num_workers=args.workers, seed=0)
        dms = {"files": AudioDataModule(train=str(manifest), **kw),
               "shards": AudioDataModule(train=f"shards:{shards}", shard_pool=args.shard_pool, **kw)}
        loaders = {k: dm.loader("train") for k, dm in dms.items()}
        for k in loaders:  # warm-up
            epoch(loaders[k])
        rates: dict[str, list[float]] = {k: [] for k in loaders}
        steady: dict[str, list[float]] = {k: [] for k in loaders}
        starts: dict[str, list[float]] = {k: [] for k in loaders}
        cpu: dict[str, list[float]] = {k: [] for k in loaders}
        counts: dict[str, int] = {}
        load0 = os.getloadavg()[0]
        for _ in range(args.rounds):
            for k in loaders:
                n, secs, first_n, first, cpu_s = epoch(loaders[k])
                counts[k] = n
                cpu[k].append(1000 * cpu_s / n)
                rates[k].append(n / secs)
                steady[k].append((n - first_n) / max(secs - first, 1e-9))  # after the first batch
                starts[k].append(first)
    med = {k: statistics.median(v) for k, v in rates.items()}
    med_steady = {k: statistics.median(v) for k, v in steady.items()}
    med_start = {k: statistics.median(v) for k, v in starts.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    load = os.getloadavg()
    print(f"corpus: {manifest} ({len(m)} items); sharded in {shard_time:.1f} s; samples per epoch: {counts}")
    print(f"samples/s (median of {args.rounds}): files {med['files']:.1f}  shards {med['shards']:.1f}  "
          f"(rounds: files {[round(r, 1) for r in rates['files']]}, shards {[round(r, 1) for r in rates['shards']]})")
    print(f"after the first batch: files {med_steady['files']:.1f}  shards {med_steady['shards']:.1f} samples/s; "
          f"first batch after: files {med_start['files']:.2f} s  shards {med_start['shards']:.2f} s "
          "(a shard pass hands out its first batch once a worker has decoded a whole pool)")
    print(f"CPU ms per sample (all processes): files {med_cpu['files']:.2f}  shards {med_cpu['shards']:.2f}; "
          f"load average {load0:.1f} at the start, {load[0]:.1f} at the end")
    print(f"RESULT name=stream_vs_files ratio={med['shards'] / med['files']:.3f} shard_bytes={shard_bytes} "
          f"files_bytes={files_bytes} files_sps={med['files']:.1f} shards_sps={med['shards']:.1f} "
          f"steady_ratio={med_steady['shards'] / med_steady['files']:.3f} "
          f"cpu_ratio={med_cpu['files'] / med_cpu['shards']:.3f} audio_format={args.audio_format} "
          f"workers={args.workers} shard_pool={args.shard_pool} load={load[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
