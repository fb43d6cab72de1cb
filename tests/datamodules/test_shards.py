"""Streamed litdata shards (omnissl/datamodules/shards.py, `omnissl data shard`): a round trip gives back the
manifest's samples; 2 ranks x 2 workers (real gloo processes) see every item once per epoch; a `omnissl fit`
SIGKILLed mid-epoch and re-run finishes the epoch with every item seen once; a corrupt item is named or
counted; text documents are split by lines or blank lines."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from omnissl.commands.data import main as data_main
from omnissl.datamodules.audio import AudioDataModule
from omnissl.datamodules.audio_io import AudioDataError, read_audio_manifest
from omnissl.datamodules.corpora import embedded_corpus
from omnissl.datamodules.shards import ShardItems, read_meta, write_shards

ROOT = Path(__file__).resolve().parents[2]
OMNISSL = str(Path(sys.executable).parent / "omnissl")


@pytest.fixture(autouse=True)
def _shard_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("OMNISSL_SHARD_CACHE", str(tmp_path / "litdata-cache"))


def _subset(tmp: Path, n: int) -> Path:
    """A manifest of the first `n` utterances of embedded speech (small, train)."""
    src = embedded_corpus("embedded:speech:small")["train"]
    lines = src.read_text().splitlines()
    out = tmp / f"first{n}.tsv"
    out.write_text("\n".join([str(src.parent)] + lines[1 : n + 1]) + "\n")
    return out


def _ids(loader) -> list[int]:
    return [i for batch in loader for i in batch.ids.tolist()]


@pytest.mark.parametrize("audio_format", ["pcm", "flac"])
def test_round_trip_gives_back_the_manifests_samples(tmp_path, capsys, audio_format):
    src = embedded_corpus("embedded:speech:tiny")["train"]
    out = tmp_path / "shards"
    assert data_main(["shard", str(src), "--out", str(out), "--chunk-bytes", "200KB",
                      "--audio-format", audio_format]) == 0
    assert f"train: shards:{out}" in capsys.readouterr().out
    meta = read_meta(f"shards:{out}")
    n = len(read_audio_manifest(src))
    assert meta["kind"] == "audio" and meta["count"] == n and meta["skipped"] == {}
    assert len(list(out.glob("chunk-*.bin"))) > 1
    files_bytes = sum((src.parent / p).stat().st_size for p in read_audio_manifest(src).paths)
    shard_bytes = sum(p.stat().st_size for p in out.iterdir())
    assert shard_bytes < files_bytes  # zstd-compressed PCM or FLAC: smaller than the WAV files

    kw = dict(max_samples=None, min_samples=0, max_tokens=None, batch_size=2, num_workers=0)
    from_files = AudioDataModule(train=str(src), valid=str(src), **kw)
    from_shards = AudioDataModule(train=f"shards:{out}", valid=f"shards:{out}", **kw)
    a, b = ({int(i): x[: int(k)] for bt in dm.loader("valid")
             for i, x, k in zip(bt.ids, bt.inputs["audio"], bt.lengths["audio"])} for dm in (from_files, from_shards))
    assert sorted(a) == sorted(b) == list(range(n))
    for i in a:  # 16-bit WAV -> 16-bit PCM or FLAC is lossless: the very same samples
        assert torch.equal(a[i], b[i]), f"item {i} differs"
    # training crops: random, a function of (seed, epoch, id) as for manifests
    crop = dict(kw, max_samples=16_000)
    e0 = {int(i): x for bt in AudioDataModule(train=f"shards:{out}", **crop).loader("train")
          for i, x in zip(bt.ids, bt.inputs["audio"])}
    files = {int(i): x for bt in AudioDataModule(train=str(src), **crop).loader("train")
             for i, x in zip(bt.ids, bt.inputs["audio"])}
    assert all(torch.equal(e0[i], files[i]) for i in e0) and len(e0) == n


CROP, BUDGET = 110_000, 330_000  # crop at the median length: lengths vary, 3 crops per budget


def _rank_main(rank: int, world: int, port: int, runs: list[tuple], out: str, cache: str) -> None:
    os.environ["OMNISSL_SHARD_CACHE"] = cache
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                         world_size=world)
    try:
        found = []
        for spec, pool, nodes in runs:
            os.environ["NNODES"] = str(nodes)  # litdata's node count (here: each rank a node of its own)
            dm = AudioDataModule(train=spec, max_samples=CROP, min_samples=0, max_tokens=BUDGET, num_workers=2,
                                 shard_pool=pool, seed=3)
            dm.setup("fit")
            loader = dm.loader("train")
            found.append([[(b.ids.tolist(), list(b.inputs["audio"].shape)) for b in loader] for _ in range(2)])
        Path(out).write_text(json.dumps(found))
    finally:
        torch.distributed.destroy_process_group()


def test_two_ranks_two_workers_run_equal_steps_and_see_each_item_once(tmp_path):
    """2 gloo ranks x 2 workers, two epochs, length-bucketed batches. A set of 2 x 2 pools: every item is seen
    once per epoch. 45 items (not a multiple of ranks x pool), on one node and as 2 nodes (chunks of several
    items; litdata's own later epochs then read chunks twice and give ranks unequal counts): fewer than ranks x
    pool items are left out and the others are seen once. Always: every rank runs the same number of steps
    (unequal before litdata's drop_last and the fixed per-pool cut) and each batch fits max_tokens."""
    sets = {}
    for n, chunk in ((32, "300KB"), (45, "1500KB")):
        sets[n] = tmp_path / f"shards{n}"
        write_shards(_subset(tmp_path, n), str(sets[n]), chunk_bytes=chunk)
        assert len(list(sets[n].glob("chunk-*.bin"))) >= 4  # enough chunks for 2 ranks x 2 workers
    runs = [(f"shards:{sets[32]}", 8, 1), (f"shards:{sets[45]}", 8, 1), (f"shards:{sets[45]}", 3, 2)]
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    outs = [str(tmp_path / f"rank{r}.json") for r in range(2)]
    ctx = torch.multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_rank_main, args=(r, 2, port, runs, outs[r], str(tmp_path / f"c{r}")))
             for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(240)
        assert p.exitcode == 0, f"rank process exited with {p.exitcode}"
    per_rank = [json.loads(Path(o).read_text()) for o in outs]
    for k, (spec, pool, nodes) in enumerate(runs):
        n = int(spec.rsplit("shards", 1)[1])
        what = f"{n} items, pool {pool}, {nodes} node(s)"
        for epoch in range(2):
            batches = [per_rank[r][k][epoch] for r in range(2)]
            assert len(batches[0]) == len(batches[1]), f"{what}, epoch {epoch}: unequal steps per rank"
            assert all(b * t <= BUDGET for rank in batches for _, (b, t) in rank)
            seen = [i for rank in batches for ids, _ in rank for i in ids]
            assert len(seen) == len(set(seen)) and set(seen) <= set(range(n)), f"{what}, epoch {epoch}: {seen}"
            if n == 32:
                assert sorted(seen) == list(range(32)), f"epoch {epoch}: {sorted(seen)}"
            else:
                assert 0 < n - len(seen) < 2 * pool, what  # left out: fewer than ranks x pool
        assert per_rank[0][k][0] != per_rank[0][k][1]  # reshuffled per epoch


def test_resume_within_a_pool_and_across_epochs_in_process(tmp_path):
    """The loader state taken after any batch resumes with exactly the batches an uninterrupted pass has left."""
    manifest = _subset(tmp_path, 24)
    out = tmp_path / "shards"
    write_shards(manifest, str(out), chunk_bytes="300KB")

    def loader():
        return AudioDataModule(train=f"shards:{out}", max_samples=3200, min_samples=0, max_tokens=9600,
                               num_workers=2, shard_pool=6, seed=1).loader("train")

    ref = loader()
    full = [[b.ids.tolist() for b in ref] for _ in range(2)]
    for epoch, cut in [(0, 1), (0, 4), (1, 3)]:
        run = loader()
        if epoch:
            list(run)
        it = iter(run)
        head = [next(it).ids.tolist() for _ in range(cut)]
        state = run.state_dict()
        del it
        resumed = loader()
        resumed.load_state_dict(state)
        tail = [b.ids.tolist() for b in resumed]
        assert head + tail == full[epoch], f"epoch {epoch}, cut after {cut} batches"
    assert sorted(i for b in full[0] for i in b) == list(range(24))


def test_persistent_workers_follow_the_epoch_after_a_pass_stopped_early(tmp_path):
    """The loader's workers live on from pass to pass. A pass left after 2 batches (a sanity check, a
    limit_*_batches) still moves the next pass to the next epoch: the same order and crops as a loader that ran
    the earlier pass to its end, every item once."""
    manifest = _subset(tmp_path, 24)
    out = tmp_path / "shards"
    write_shards(manifest, str(out), chunk_bytes="300KB")

    def loader(workers=2):
        return AudioDataModule(train=f"shards:{out}", max_samples=32000, min_samples=0, max_tokens=96000,
                               num_workers=workers, shard_pool=6, seed=1).loader("train")

    def items(batches):
        return [(b.ids.tolist(), b.inputs["audio"].clone()) for b in batches]

    def per_id(found):
        return {i: x[: int(n)] for b in found for i, x, n in zip(b.ids.tolist(), b.inputs["audio"], b.lengths["audio"])}

    full = loader()
    ref = [items(full) for _ in range(2)]
    # batches handed over from the workers (packed into one buffer per dtype) hold what one process decodes
    in_process, from_workers = per_id(loader(workers=0)), per_id(loader())
    assert sorted(in_process) == sorted(from_workers) == list(range(24))
    assert all(torch.equal(in_process[i], from_workers[i]) for i in in_process)
    cut = loader()
    it = iter(cut)
    assert [ids for ids, _ in items([next(it), next(it)])] == [ids for ids, _ in ref[0][:2]]
    del it
    second = items(cut)
    assert [ids for ids, _ in second] == [ids for ids, _ in ref[1]]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(second, ref[1]))  # epoch 1's crops
    assert sorted(i for ids, _ in second for i in ids) == list(range(24))
    assert [ids for ids, _ in ref[0]] != [ids for ids, _ in ref[1]]


def _trace(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


@pytest.mark.slow
def test_sigkilled_streamed_fit_resumes_and_sees_every_item_once(tmp_path):
    manifest = _subset(tmp_path, 30)
    shards = tmp_path / "shards"
    write_shards(manifest, str(shards), chunk_bytes="300KB")
    trace = tmp_path / "trace.jsonl"
    cfg = tmp_path / "overrides.yaml"
    cfg.write_text(f"""
trainer:
  max_steps: 1000  # the schedule's length; the epoch ends first
  max_epochs: 1
  limit_val_batches: 0
  log_every_n_steps: 1
  enable_progress_bar: false
  enable_model_summary: false
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {{save_last: true, every_n_train_steps: 1}}
    - class_path: step_trace.StepTrace
      init_args: {{path: {trace}}}
data:
  init_args: {{train: "shards:{shards}", valid: null, max_samples: 16000, min_samples: 0, max_tokens: 48000,
               num_workers: 2, shard_pool: 6}}
""")
    cmd = [OMNISSL, "fit", "-c", str(ROOT / "recipes/trainer/cpu.yaml"), "-c",
           str(ROOT / "recipes/audio/wav2vec2_tiny_cpu.yaml"), "-c", str(cfg), "--run_name", "streamed"]
    env = dict(os.environ, WANDB_MODE="disabled", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
               OMNISSL_SHARD_CACHE=str(tmp_path / "cache"))
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests/train"), env.get("PYTHONPATH", "")])
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    try:
        while True:
            assert time.monotonic() < deadline, "the run did not reach step 4"
            rows = _trace(trace)
            if rows and rows[-1]["step"] >= 4:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(30)
                break
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            time.sleep(0.02)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    first_pid = _trace(trace)[0]["pid"]
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    assert "resuming from" in out.stderr
    rows = _trace(trace)
    after = [r for r in rows if r["pid"] != first_pid]
    assert after and 2 <= after[0]["step"] - 1 <= 4  # resumed mid-epoch from the last checkpoint
    by_step = {r["step"]: r for r in rows}  # a step traced twice: the resumed run's row is the one trained on
    assert sorted(by_step) == list(range(1, max(by_step) + 1))
    seen = [i for s in sorted(by_step) for i in by_step[s]["ids"]]
    assert sorted(seen) == list(range(30)), f"ids seen in the epoch: {sorted(seen)}"


@pytest.mark.slow
def test_streamed_ddp_fit_runs_equal_steps_on_every_rank(tmp_path):
    """`omnissl fit` of wav2vec 2.0 tiny under torchrun, 2 gloo ranks x 2 workers, 2 epochs, on 45 streamed
    items with max_tokens batches: it finishes (a rank with more batches would wait forever in DDP's gradient
    all-reduce), both ranks run 3 pools x 2 batches per epoch and no item is trained on twice in an epoch."""
    import socket

    shards = tmp_path / "shards"
    write_shards(_subset(tmp_path, 45), str(shards), chunk_bytes="1500KB")
    trace = tmp_path / "trace.jsonl"
    cfg = tmp_path / "overrides.yaml"
    cfg.write_text(f"""
trainer:
  devices: 2
  strategy: ddp
  max_steps: 1000
  max_epochs: 2
  limit_val_batches: 0
  enable_progress_bar: false
  enable_model_summary: false
  callbacks:
    - class_path: step_trace.StepTrace
      init_args: {{path: {trace}}}
data:
  init_args: {{train: "shards:{shards}", valid: null, max_samples: 16000, min_samples: 0, max_tokens: 48000,
               num_workers: 2, shard_pool: 6}}
""")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(port), str(ROOT / "cli.py"), "fit", "-c", str(ROOT / "recipes/trainer/cpu.yaml"),
           "-c", str(ROOT / "recipes/audio/wav2vec2_tiny_cpu.yaml"), "-c", str(cfg), "--run_name", "ddp-stream"]
    env = dict(os.environ, WANDB_MODE="disabled", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
               OMNISSL_SHARD_CACHE=str(tmp_path / "cache"))
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests/train"), env.get("PYTHONPATH", "")])
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=500)
    assert out.returncode == 0, out.stderr[-4000:]
    rows = _trace(trace)
    pids = sorted({r["pid"] for r in rows})
    assert len(pids) == 2
    for epoch in range(2):
        per_rank = [[r for r in rows if r["pid"] == pid and r["epoch"] == epoch] for pid in pids]
        assert [len(x) for x in per_rank] == [6, 6], f"epoch {epoch}: steps per rank {[len(x) for x in per_rank]}"
        seen = [i for x in per_rank for r in x for i in r["ids"]]
        assert len(seen) == len(set(seen)) == 36  # 45 items - 9 left out (< 2 ranks x pool 6)


def _corrupt_one_flac(shards: Path) -> None:
    """Overwrite the 'fLaC' magic of the second encoded item of the first chunk (an undecodable item)."""
    chunk = sorted(shards.glob("chunk-*.bin"))[0]
    data = bytearray(chunk.read_bytes())
    at = [k for k in range(len(data) - 4) if data[k : k + 4] == b"fLaC"]
    assert len(at) >= 2
    data[at[1] : at[1] + 4] = b"XXXX"
    chunk.write_bytes(bytes(data))


def test_a_corrupt_shard_item_is_named_or_counted(tmp_path):
    src = embedded_corpus("embedded:speech:tiny")["train"]
    shards = tmp_path / "shards"
    write_shards(src, str(shards), chunk_bytes="300KB", audio_format="flac")
    _corrupt_one_flac(shards)
    kw = dict(max_samples=16_000, min_samples=0, max_tokens=None, batch_size=2, num_workers=0)
    named = r"shards:.* item \d+ \(from .*train\.tsv:\d+: .*\.wav\): undecodable encoded audio \(Format not"
    with pytest.raises(AudioDataError, match=named):
        _ids(AudioDataModule(train=f"shards:{shards}", **kw).loader("train"))
    dm = AudioDataModule(train=f"shards:{shards}", on_error="skip", **kw)
    seen = _ids(dm.loader("train"))
    n = len(read_audio_manifest(src))
    assert len(seen) == n - 1 and len(dm.skipped) == 1
    (where, why), = dm.skipped.items()
    assert where.startswith(f"shards:{shards}#") and "undecodable" in why
    assert int(where.rsplit("#", 1)[1]) not in seen


def test_a_bad_source_file_is_named_or_counted_when_sharding(tmp_path, capsys):
    src = embedded_corpus("embedded:speech:tiny")["train"]
    lines = src.read_text().splitlines()
    root = tmp_path / "audio"
    for line in lines[1:]:
        rel = line.split("\t")[0]
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes((src.parent / rel).read_bytes())
    bad = lines[2].split("\t")[0]
    (root / bad).write_bytes((root / bad).read_bytes()[:60])  # truncated
    manifest = tmp_path / "m.tsv"
    manifest.write_text("\n".join([str(root)] + lines[1:]) + "\n")
    assert data_main(["shard", str(manifest), "--out", str(tmp_path / "raise")]) == 1
    err = capsys.readouterr().err
    assert f"{manifest}:3" in err and bad in err and not (tmp_path / "raise").exists()
    assert data_main(["shard", str(manifest), "--out", str(tmp_path / "skip"), "--on-error", "skip"]) == 0
    meta = read_meta(f"shards:{tmp_path / 'skip'}")
    assert meta["count"] == len(lines) - 2 and list(meta["skipped"]) == [f"{manifest}:3: {root / bad}"]


def test_text_documents_by_line_or_blank_line(tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text("first doc line one\nline two\n\nsecond doc\n\n\nthird\n")
    write_shards(text, str(tmp_path / "lines"), docs="line")
    write_shards(text, str(tmp_path / "blank"), docs="blank")
    docs = {}
    for kind in ("lines", "blank"):
        ds = ShardItems(f"shards:{tmp_path / kind}", decode=lambda raw, epoch: raw, shuffle=False, seed=0)
        docs[kind] = [ds[i]["text"] for i in range(len(ds))]
    assert docs["lines"] == ["first doc line one", "line two", "second doc", "third"]
    assert docs["blank"] == ["first doc line one\nline two", "second doc", "third"]
    assert read_meta(f"shards:{tmp_path / 'blank'}")["kind"] == "text"
    assert list((tmp_path / "blank").glob("*.zstd.bin"))  # text chunks are zstd-compressed


def test_image_shards_read_back_the_same_images(tmp_path):
    from omnissl.datamodules.image import ImageDataModule

    src = embedded_corpus("embedded:images:tiny")["train"]
    out = tmp_path / "images"
    assert data_main(["shard", str(src), "--out", str(out)]) == 0
    assert read_meta(f"shards:{out}")["kind"] == "image"
    kw = dict(image_size=32, batch_size=4, num_workers=0)
    files = ImageDataModule(train=str(src), valid=str(src), **kw)
    shards = ImageDataModule(train=f"shards:{out}", valid=f"shards:{out}", **kw)
    files.setup(), shards.setup()
    a, b = ({int(i): x for bt in dm.loader("valid") for i, x in zip(bt.ids, bt.inputs["image"])}
            for dm in (files, shards))
    assert sorted(a) == sorted(b) and len(a) > 4
    assert all(torch.equal(a[i], b[i]) for i in a)  # same decoded, same eval transform
    train = [int(i) for bt in shards.loader("train") for i in bt.ids]
    assert sorted(train) == sorted(a)  # every image once per epoch
    with pytest.raises(ValueError, match="must be too"):
        ImageDataModule(train=f"shards:{out}", valid=str(src), **kw).setup()


def test_labeled_image_shards_keep_classes_and_labels(tmp_path):
    from omnissl.datamodules.labeled import LabeledImageDataModule

    found = embedded_corpus("embedded:labeled_images:tiny")
    for split in ("train", "valid"):
        write_shards(found[split], str(tmp_path / split))
    kw = dict(image_size=16, batch_size=8, num_workers=0, train_augment=False)
    files = LabeledImageDataModule(train=str(found["train"]), valid=str(found["valid"]), **kw)
    shards = LabeledImageDataModule(train=f"shards:{tmp_path / 'train'}", valid=f"shards:{tmp_path / 'valid'}", **kw)
    files.setup(), shards.setup()
    assert shards.classes == files.classes and len(shards.classes) > 1
    a, b = ({int(i): (x, int(y)) for bt in dm.loader("valid")
             for i, x, y in zip(bt.ids, bt.inputs["image"], bt.targets["label"])} for dm in (files, shards))
    assert sorted(a) == sorted(b)
    assert all(torch.equal(a[i][0], b[i][0]) and a[i][1] == b[i][1] for i in a)


def test_labeled_audio_shards_keep_classes_and_labels(tmp_path):
    src = embedded_corpus("embedded:keywords:small")["train"]
    lines = src.read_text().splitlines()
    manifest = tmp_path / "first40.tsv"
    manifest.write_text("\n".join([str(src.parent)] + lines[1:41]) + "\n")
    out = tmp_path / "shards"
    meta = write_shards(manifest, str(out))
    kw = dict(max_samples=None, min_samples=0, max_tokens=None, batch_size=8, num_workers=0)
    files = AudioDataModule(train=str(manifest), valid=str(manifest), **kw)
    shards = AudioDataModule(train=f"shards:{out}", valid=f"shards:{out}", **kw)
    files.setup(), shards.setup()
    assert shards.classes == files.classes == sorted(meta["labels"]) and len(files.classes) > 2
    a, b = ({int(i): (x[: int(n)], int(y)) for bt in dm.loader("valid") for i, x, n, y in
             zip(bt.ids, bt.inputs["audio"], bt.lengths["audio"], bt.targets["label"])} for dm in (files, shards))
    assert sorted(a) == sorted(b) == list(range(40))
    assert all(torch.equal(a[i][0], b[i][0]) and a[i][1] == b[i][1] for i in a)


def test_labeled_text_shards_give_the_same_tokens_and_labels(tmp_path, capsys):
    from omnissl.datamodules.labeled import LabeledTextDataModule

    found = embedded_corpus("embedded:labeled_text:tiny")
    for split in ("train", "valid"):  # manifests of text files with a label column: kind labeled_text
        assert data_main(["shard", str(found[split]), "--out", str(tmp_path / split)]) == 0
    assert "labeled_text items" in capsys.readouterr().out
    kw = dict(vocab_size=512, min_frequency=1, max_tokens=24, batch_size=8, num_workers=0,
              cache_dir=str(tmp_path / "cache"))
    files = LabeledTextDataModule(train=str(found["train"]), valid=str(found["valid"]), **kw)
    files.setup()
    spec = {s: f"shards:{tmp_path / s}" for s in ("train", "valid")}
    with pytest.raises(ValueError, match="give `tokenizer`"):
        LabeledTextDataModule(train=spec["train"], **kw).setup()
    shards = LabeledTextDataModule(train=spec["train"], valid=spec["valid"], tokenizer=str(files.tokenizer_path),
                                   **kw)
    shards.setup()
    assert shards.classes == files.classes and len(files.classes) > 1
    a, b = ({int(i): (t[: int(n)].tolist(), int(y)) for bt in dm.loader("valid") for i, t, n, y in
             zip(bt.ids, bt.inputs["text"], bt.lengths["text"], bt.targets["label"])} for dm in (files, shards))
    assert sorted(a) == sorted(b) and a == b  # same `<s> text </s>` (truncated to 24) and label per example
    assert max(len(t) for t, _ in a.values()) == 24
    n = read_meta(spec["train"])["count"]
    assert sorted(int(i) for bt in shards.loader("train") for i in bt.ids) == list(range(n))


def test_streamed_text_documents_become_block_windows(tmp_path):
    from omnissl.datamodules.text import TextDataModule

    src = embedded_corpus("embedded:text:tiny")["train"]  # a manifest of .txt files
    files = TextDataModule(train=str(src), vocab_size=512, min_frequency=1, block_size=32, batch_size=4,
                           num_workers=0, progress=False, cache_dir=str(tmp_path / "cache"))
    files.setup()
    out = tmp_path / "text"
    meta = write_shards(src, str(out), docs="blank")
    assert meta["kind"] == "text" and meta["count"] > 4
    with pytest.raises(ValueError, match="give `tokenizer`"):
        TextDataModule(train=f"shards:{out}", vocab_size=512, num_workers=0).setup()
    dm = TextDataModule(train=f"shards:{out}", valid=f"shards:{out}", tokenizer=str(files.tokenizer_path),
                        vocab_size=512, block_size=32, batch_size=4, num_workers=0)
    dm.setup()
    seen, lengths = [], []
    for bt in dm.loader("train"):
        seen += bt.ids.tolist()
        assert (bt.inputs["text"][:, 0] == dm.bos_id).all()
        lengths += bt.lengths["text"].tolist()
    assert sorted(seen) == list(range(meta["count"])) and max(lengths) == 32  # long documents cut to a block
    ds = dm.dataset("valid")
    raw, item = super(ShardItems, ds).__getitem__(0), ds[0]
    from omnissl.datamodules.tokenizers import load_tokenizer

    ids = load_tokenizer(files.tokenizer_path).encode(raw["text"]).ids
    expected = ([dm.bos_id] + ids + [dm.eos_id])[:32] if len(ids) + 2 <= 32 else None
    if expected is not None:
        assert item["text"].tolist() == expected
    else:  # centred window of `<tokens> </s>`
        body = ids + [dm.eos_id]
        k = (len(body) - 31) // 2
        assert item["text"].tolist() == [dm.bos_id] + body[k : k + 31]


def test_captioned_audio_shards_pair_the_same_audio_and_caption(tmp_path):
    from omnissl.datamodules.audio_text import AudioTextDataModule

    found = embedded_corpus("embedded:captions:tiny")
    for split in ("train", "valid"):
        write_shards(found[split], str(tmp_path / split))
    kw = dict(max_samples=8000, batch_size=4, num_workers=0, vocab_size=512, min_frequency=1,
              cache_dir=str(tmp_path / "cache"))
    files = AudioTextDataModule(train=str(found["train"]), valid=str(found["valid"]), **kw)
    files.setup()
    shards = AudioTextDataModule(train=f"shards:{tmp_path / 'train'}", valid=f"shards:{tmp_path / 'valid'}",
                                 **dict(kw, tokenizer=str(files.tokenizer_path)))
    shards.setup()

    def items(dm):
        return {int(i): (a[: int(na)], t[: int(nt)]) for bt in dm.loader("valid")
                for i, a, na, t, nt in zip(bt.ids, bt.inputs["audio"], bt.lengths["audio"], bt.inputs["text"],
                                           bt.lengths["text"])}

    a, b = items(files), items(shards)
    assert sorted(a) == sorted(b) and a
    assert all(torch.equal(a[i][0], b[i][0]) and torch.equal(a[i][1], b[i][1]) for i in a)
    n = read_meta(f"shards:{tmp_path / 'train'}")["count"]
    assert sorted(int(i) for bt in shards.loader("train") for i in bt.ids) == list(range(n))
