"""`omnissl hubert-units`: HuBERT's offline k-means targets (the pipeline is omnissl/eval/units.py).

    omnissl hubert-units --manifest train.tsv [--valid valid.tsv] --iteration 1 --clusters 100
    omnissl hubert-units --manifest train.tsv [--valid valid.tsv] --iteration 2 --checkpoint last.ckpt \\
        --layer 6 --clusters 500
"""

from __future__ import annotations

import argparse

from omnissl.commands import HelpFormatter, device


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="omnissl hubert-units", formatter_class=HelpFormatter,
        description="HuBERT's offline targets: frame features (iteration 1: MFCC; iteration 2: layer K of a "
                    "checkpoint's encoder) -> k-means -> <manifest stem>.<ext> beside the manifest, one line of "
                    "unit ids per utterance. Resumable: work is cached and skipped when present.",
    )  # fmt: skip
    p.add_argument("--manifest", required=True,
                   help="training manifest (fairseq TSV, or embedded:<size>); the k-means fit sample")
    p.add_argument("--valid", help="another manifest (or embedded:<size>) to label with the same k-means model")
    p.add_argument("--iteration", type=int, choices=(1, 2), default=1,
                   help="1: cluster 39-dim MFCCs; 2: cluster layer --layer of --checkpoint's encoder")
    p.add_argument("--features", choices=("mfcc", "logmel"), default="mfcc",
                   help="iteration 1: the clustered frame features (mfcc: 39-dim MFCC + deltas, as fairseq; "
                        "logmel: 64-bin log-mel of the same windows)")
    p.add_argument("--cmvn", action="store_true",
                   help="normalize each utterance's features to zero mean and unit variance per dimension before "
                        "k-means (Kaldi's apply-cmvn --norm-vars); off in fairseq")
    p.add_argument("--checkpoint",
                   help="iteration 2: the previous iteration's omnissl Lightning checkpoint (read weights-only)")
    p.add_argument("--layer", type=int, default=6, help="iteration 2: trunk block whose output is clustered "
                                                        "(1-based; 0 = trunk input)")
    p.add_argument("--clusters", type=int, default=100, help="k-means K (number of unit ids)")
    p.add_argument("--sample-fraction", type=float, default=0.1,
                   help="seeded random fraction of the utterances the k-means fit sees")
    p.add_argument("--seed", type=int, default=0, help="seed of the fit sample and of k-means")
    p.add_argument("--out-ext", default="km", help="extension of the unit files (train.tsv -> train.<ext>)")
    p.add_argument("--cache-dir", help="cache folder (default: <manifest stem>.<ext>.cache beside the manifest)")
    p.add_argument("--shard-size", type=int, default=200, help="utterances per cached shard")
    p.add_argument("--n-init", type=int, default=20, help="MiniBatchKMeans n_init")
    p.add_argument("--kmeans-batch-size", type=int, default=10_000, help="MiniBatchKMeans batch_size")
    p.add_argument("--max-iter", type=int, default=100, help="MiniBatchKMeans max_iter")
    p.add_argument("--device", default=None, help="iteration 2: device of the encoder (default: cuda if available)")
    p.add_argument("--quiet", action="store_true", help="no progress bars (they draw only on a terminal)")
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    a = p.parse_args(argv)

    from omnissl.datamodules.audio_io import AudioDataError
    from omnissl.eval.units import make_units
    from omnissl.progress import set_quiet

    set_quiet(a.quiet)

    try:
        make_units(a.manifest, valid=a.valid, iteration=a.iteration, features=a.features,
                   normalize=a.cmvn, checkpoint=a.checkpoint, layer=a.layer,
                   clusters=a.clusters, sample_fraction=a.sample_fraction, seed=a.seed, out_ext=a.out_ext,
                   cache_dir=a.cache_dir, shard_size=a.shard_size, n_init=a.n_init,
                   kmeans_batch_size=a.kmeans_batch_size, max_iter=a.max_iter, device=device(a.device))
    except (ValueError, FileNotFoundError, AudioDataError) as e:
        p.exit(2, f"omnissl hubert-units: error: {e}\n")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
