"""Encode a corpus into Arrow token shards with a trained tokenizer.

python launch/prepare_data.py --tokenizer runs/tok --input data/ --out runs/data --workers 2
"""

import argparse
import os

from megatrain.data import prepare_dataset

from _cli import add_corpus_args, corpus_options, run


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_corpus_args(p)
    p.add_argument("--tokenizer", required=True, metavar="DIR", help="directory made by train_tokenizer.py")
    p.add_argument(
        "--out", required=True, metavar="DIR", help="output: DIR/train and DIR/valid with manifest.json"
    )
    p.add_argument(
        "--valid-fraction", type=float, default=0.01, help="share of documents held out (default 0.01)"
    )
    p.add_argument(
        "--workers", type=int, default=os.cpu_count() or 1, help="encoding processes (default: cores)"
    )
    p.add_argument(
        "--shard-mb", type=float, default=256.0, help="target shard size in MB of tokens (default 256)"
    )
    p.add_argument("--seed", type=int, default=0, help="seeds the train/valid split")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args()


def main():
    args = parse_args()
    report = prepare_dataset(
        args.tokenizer,
        args.input,
        args.out,
        valid_fraction=args.valid_fraction,
        workers=args.workers,
        shard_mb=args.shard_mb,
        seed=args.seed,
        corpus_options=corpus_options(args),
        progress=not args.quiet,
    )
    print("\n".join(report.lines()))


if __name__ == "__main__":
    run(main)
