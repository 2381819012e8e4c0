"""Train a SentencePiece BPE tokenizer on a corpus.

python launch/train_tokenizer.py --input data/ 'more/*.jsonl.gz' --vocab-size 32768 --out runs/tok
python launch/train_tokenizer.py --input builtin:stdlib --vocab-size 8192 --out runs/demo/tokenizer
"""

import argparse
import os

from tokenizer import TrainerOptions, train_tokenizer

from _cli import add_corpus_args, corpus_options, run


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_corpus_args(p)
    p.add_argument(
        "--vocab-size", type=int, required=True, help="pieces in the vocabulary, specials and bytes included"
    )
    p.add_argument("--out", required=True, help="directory for tokenizer.model and tokenizer.json")
    p.add_argument(
        "--no-byte-fallback",
        dest="byte_fallback",
        action="store_false",
        help="map unknown characters to <unk> instead of UTF-8 byte pieces",
    )
    p.add_argument("--character-coverage", type=float, default=0.9995)
    p.add_argument("--normalization", choices=["identity", "nfkc"], default="identity")
    p.add_argument("--split-digits", action="store_true", help="numbers become single digits")
    p.add_argument("--user-symbols", nargs="*", default=[], help="extra pieces matched verbatim in text")
    p.add_argument(
        "--max-sentence-length",
        type=int,
        default=4192,
        help="longest piece SentencePiece sees, in bytes; longer documents are cut at line ends",
    )
    p.add_argument(
        "--allow-smaller-vocab",
        action="store_true",
        help="accept fewer pieces than --vocab-size when the corpus cannot support it",
    )
    p.add_argument(
        "--sample-bytes",
        type=float,
        default=200e6,
        help="text to train on, sampled by document (default 200e6; SentencePiece needs 10-15x in RAM)",
    )
    p.add_argument("--num-threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--seed", type=int, default=0, help="seeds the document sample")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args()


def main():
    args = parse_args()
    options = TrainerOptions(
        vocab_size=args.vocab_size,
        byte_fallback=args.byte_fallback,
        character_coverage=args.character_coverage,
        normalization=args.normalization,
        split_digits=args.split_digits,
        user_symbols=args.user_symbols,
        max_sentence_length=args.max_sentence_length,
        allow_smaller_vocab=args.allow_smaller_vocab,
        num_threads=args.num_threads,
        seed=args.seed,
        sample_bytes=int(args.sample_bytes),
    )
    report = train_tokenizer(args.input, args.out, options, corpus_options(args), progress=not args.quiet)
    print("\n".join(report.lines()))


if __name__ == "__main__":
    run(main)
