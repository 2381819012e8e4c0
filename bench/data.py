"""Data pipeline speed: encoding into shards, and assembling training batches.

Encode: launch/prepare_data.py's pipeline (read, encode in N worker processes, write
Arrow shards) with 1 and 2 workers, against raw SentencePiece batch encoding of the
same text already in memory (1 and 2 threads), side by side.
Goals: 2 workers >= 1.8x one worker; one worker within 1.10x of raw SentencePiece.
Loader: batches of 8 x 2048 tokens from the memory-mapped shards. Goal: >= 20M tokens/s.

    python bench/data.py [--json FILE] [--corpus-mb 20]
"""

from __future__ import annotations

from _bench import arg_parser, interleaved_medians, machine, median_seconds, print_table, write_json

import shutil
import tempfile
from functools import partial
from pathlib import Path

import numpy as np
import torch

from megatrain.data import ResumableSampler, TokenDataset, prepare_dataset
from tokenizer import (
    CorpusOptions,
    CorpusStats,
    Tokenizer,
    TrainerOptions,
    iter_pieces,
    resolve_inputs,
    train_tokenizer,
)


def stdlib_slice(dest: Path, megabytes: float) -> Path:
    budget = int(megabytes * 1e6)
    for f in resolve_inputs(["builtin:stdlib"]):
        data = f.path.read_bytes()
        if data and b"\0" not in data and len(data) <= budget and _utf8(data):
            (dest / f"{budget}.py").write_bytes(data)
            budget -= len(data)
    return dest


def _utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def main():
    p = arg_parser(__doc__)
    p.add_argument("--corpus-mb", type=float, default=20.0)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-data-"))
    corpus = work / "corpus"
    corpus.mkdir()
    stdlib_slice(corpus, args.corpus_mb)
    tok_dir = work / "tok"
    train_tokenizer(
        [str(corpus)], tok_dir, TrainerOptions(vocab_size=8192, sample_bytes=int(5e6)), progress=False
    )
    tok = Tokenizer.load(tok_dir)
    texts = [p.text for p in iter_pieces(resolve_inputs([str(corpus)]), CorpusOptions(), CorpusStats())]
    mb = sum(len(t.encode()) for t in texts) / 1e6
    n_tokens = sum(len(ids) for ids in tok.encode_batch(texts, num_threads=0)) + len(texts)

    def prepare(workers):
        return partial(
            prepare_dataset,
            tok_dir,
            [str(corpus)],
            work / "out",
            valid_fraction=0.0,
            workers=workers,
            progress=False,
        )

    timings = interleaved_medians(
        {
            "raw sentencepiece, 1 thread": partial(tok.encode_batch, texts, num_threads=1),
            "prepare_data, 1 worker": prepare(1),
            "raw sentencepiece, 2 threads": partial(tok.encode_batch, texts, num_threads=2),
            "prepare_data, 2 workers": prepare(2),
        },
        args.repeat,
    )
    raw1, one, two = (
        timings[k]
        for k in ("raw sentencepiece, 1 thread", "prepare_data, 1 worker", "prepare_data, 2 workers")
    )
    rows = [[name, t, mb / t, n_tokens / t / 1e6] for name, t in timings.items()]
    print_table(
        f"encode {mb:.1f} MB of stdlib ({n_tokens / 1e6:.2f}M tokens)",
        ["pipeline", "seconds", "MB/s", "M tokens/s"],
        rows,
    )
    print(
        f"2 workers / 1 worker: {one / two:.2f}x (goal >= 1.8x);  "
        f"1 worker / raw 1 thread: {one / raw1:.3f}x (goal <= 1.10x)"
    )

    ds = TokenDataset(work / "out", seq_len=2048)
    sampler = ResumableSampler(len(ds), seed=0)
    n_batches = 2000

    def load():
        for _ in range(n_batches):
            torch.from_numpy(ds.batch(sampler.next(8)))

    load_s = median_seconds(load, args.repeat, warmup=1)
    loader_tps = n_batches * 8 * 2048 / load_s
    print_table(
        "loader: batches of 8 x 2048 tokens from memory-mapped shards (goal >= 20M tokens/s)",
        ["batches", "seconds", "M tokens/s"],
        [[n_batches, load_s, loader_tps / 1e6]],
    )
    shutil.rmtree(work, ignore_errors=True)
    write_json(
        args.json,
        {
            "machine": machine(),
            "encode": {
                "text_mb": mb,
                "tokens": n_tokens,
                "seconds": timings,
                "speedup_2_workers": one / two,
                "one_worker_vs_raw": one / raw1,
            },
            "loader": {"batch": [8, 2048], "tokens_per_s": loader_tps},
            "dtype": np.dtype(tok.token_dtype).name,
        },
    )


if __name__ == "__main__":
    main()
