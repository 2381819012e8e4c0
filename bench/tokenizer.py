"""Tokenizer training: megatrain's trainer against SentencePiece called directly.

Both train on the same sampled input with the same options; the difference is
megatrain's reading, sampling and splitting. HF tokenizers' BPE trainer on the same
input is a reference row (a different algorithm and pre-tokenization).
Goal: megatrain <= 1.10x raw SentencePiece.

    python bench/tokenizer.py [--json FILE] [--repeat 3]
"""

from __future__ import annotations

from _bench import SHARED_DATA, arg_parser, interleaved_medians, machine, print_table, write_json

import io
import shutil
import tempfile
from functools import partial
from pathlib import Path

import sentencepiece as spm

from tokenizer import CorpusOptions, CorpusStats, TrainerOptions, iter_pieces, resolve_inputs, train_tokenizer
from tokenizer.train import sample_corpus, split_for_sentencepiece


def stdlib_slice(dest: Path, megabytes: float) -> Path:
    """The first `megabytes` of non-empty UTF-8 stdlib modules, copied into dest."""
    budget = int(megabytes * 1e6)
    for f in resolve_inputs(["builtin:stdlib"]):
        data = f.path.read_bytes()
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            continue
        if data and len(data) <= budget:
            target = dest / f"{len(list(dest.iterdir())):05d}.py"
            target.write_bytes(data)
            budget -= len(data)
    return dest


def sampled_sentences(inputs, corpus_options, options):
    pieces = iter_pieces(resolve_inputs(inputs), corpus_options, CorpusStats())
    sample = sample_corpus(pieces, options.sample_bytes, options.heldout_bytes, options.seed)
    return [p for text in sample.train for p in split_for_sentencepiece(text, options.max_sentence_length)]


def raw_sentencepiece(sentences, kwargs):
    spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_writer=io.BytesIO(), **kwargs)


def hf_train(sentences, vocab_size):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(sentences, trainer)


def main():
    p = arg_parser(__doc__)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--stdlib-mb", type=float, default=20.0)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-tok-"))
    (work / "stdlib").mkdir()
    corpora = {
        f"stdlib-{args.stdlib_mb:g}MB": (
            [str(stdlib_slice(work / "stdlib", args.stdlib_mb))],
            CorpusOptions(),
        )
    }
    shakespeare = SHARED_DATA / "tinyshakespeare.txt"
    if shakespeare.is_file():
        corpora["tinyshakespeare"] = ([str(shakespeare)], CorpusOptions(txt_documents="paragraph"))
    else:
        print(f"note: {shakespeare} not found; tinyshakespeare rows skipped")

    rows, results = [], []
    for name, (inputs, corpus_options) in corpora.items():
        for vocab in (8192, 32768):
            options = TrainerOptions(vocab_size=vocab, allow_smaller_vocab=True)
            sentences = sampled_sentences(inputs, corpus_options, options)
            kwargs = options.sentencepiece_kwargs()

            fns = {
                "raw": partial(raw_sentencepiece, sentences, kwargs),
                "ours": partial(
                    train_tokenizer, inputs, work / "out", options, corpus_options, progress=False
                ),
                "hf": partial(hf_train, sentences, vocab),
            }  # tokenizers comes with transformers
            t = interleaved_medians(fns, args.repeat)
            t_raw, t_ours, t_hf = t["raw"], t["ours"], t["hf"]
            mb = sum(len(s.encode()) for s in sentences) / 1e6
            row = {
                "corpus": name,
                "vocab": vocab,
                "sample_mb": mb,
                "megatrain_s": t_ours,
                "sentencepiece_s": t_raw,
                "ratio": t_ours / t_raw,
                "hf_tokenizers_s": t_hf,
            }
            results.append(row)
            rows.append([name, vocab, mb, t_ours, t_raw, f"{t_ours / t_raw:.3f}x", t_hf])
    print_table(
        "tokenizer training (median seconds; goal: ratio <= 1.10x)",
        ["corpus", "vocab", "MB", "megatrain", "sentencepiece", "ratio", "hf tokenizers (ref)"],
        rows,
    )
    shutil.rmtree(work, ignore_errors=True)
    write_json(args.json, {"machine": machine(), "train": results})


if __name__ == "__main__":
    main()
