"""Encoding a corpus into token shards with a pool of worker processes.

The main process reads documents (tokenizer.corpus), decides each document's split
(train or valid, seeded), and hands jobs of about `job_bytes` of text to the workers;
at most two jobs per worker are in flight, so memory stays bounded whatever the
corpus size. Workers encode with SentencePiece and append the eod token after every
document. Results are written in job order, so the shards are the same for any
number of workers. OUT/train and OUT/valid hold the shards; OUT/tokenizer a copy of the
tokenizer, which runs on this data keep in their run directory (megatrain/train/run_tokenizer.py).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from collections import deque
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path

import numpy as np
from tqdm import tqdm

from megatrain.data.shards import MANIFEST, TMP_SUFFIX, ShardWriter, read_manifest
from megatrain.errors import UserError
from tokenizer import CorpusOptions, CorpusStats, Tokenizer, iter_pieces, resolve_inputs

SPLITS = ("train", "valid")
TOKENIZER_DIR = "tokenizer"


@dataclass
class PrepareReport:
    out_dir: str
    seconds: float
    text_bytes: int
    splits: dict = field(default_factory=dict)  # split -> {"documents", "tokens", "shards"}
    skipped: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        rate = self.text_bytes / 1e6 / max(self.seconds, 1e-9)
        out = [
            f"data: {self.out_dir}  {self.text_bytes / 1e6:.1f} MB of text in {self.seconds:.1f}s "
            f"({rate:.2f} MB/s)"
        ]
        for name, s in self.splits.items():
            out.append(f"  {name}: {s['documents']} documents, {s['tokens']} tokens, {s['shards']} shard(s)")
        return out + self.skipped + self.warnings


_worker_tokenizer: Tokenizer | None = None


def _init_worker(tokenizer_dir: str) -> None:
    global _worker_tokenizer
    _worker_tokenizer = Tokenizer.load(tokenizer_dir)


def encode_job(tok: Tokenizer, texts: list[str], ends: list[bool], dtype: np.dtype) -> np.ndarray:
    """Token ids of the texts, each followed by eod where a document ends."""
    ids = tok.encode_batch(texts, num_threads=1)
    eod = [tok.eod_id]
    flat = chain.from_iterable(chain(i, eod) if end else i for i, end in zip(ids, ends, strict=False))
    return np.fromiter(flat, dtype=dtype)


def _encode_in_worker(job: tuple) -> tuple[np.ndarray, ...]:
    return tuple(
        encode_job(_worker_tokenizer, texts, ends, _worker_tokenizer.token_dtype) for texts, ends in job
    )


def _check_out_dir(out: Path, tok: Tokenizer) -> None:
    """Refuse a directory holding another tokenizer's shards; clear our own old ones."""
    for split in SPLITS:
        d = out / split
        if (d / MANIFEST).is_file():
            old = read_manifest(d).get("tokenizer_sha256")
            if old != tok.sha256:
                raise UserError(
                    f"{d}: holds shards made with another tokenizer (sha256 {old[:12]}..., this one "
                    f"{tok.sha256[:12]}...); choose another --out or delete that directory"
                )
    for split in SPLITS:
        d = out / split
        if d.is_dir():
            for f in d.iterdir():
                if f.name.startswith("shard-") or f.name.endswith(TMP_SUFFIX) or f.name == MANIFEST:
                    f.unlink()


def _jobs(pieces, job_bytes: int, valid_fraction: float, seed: int):
    """Yields (train (texts, ends), valid (texts, ends), {split: text bytes}) of about
    job_bytes each."""
    rng = np.random.default_rng(seed)
    job, sizes = {s: ([], []) for s in SPLITS}, dict.fromkeys(SPLITS, 0)
    in_valid, new_doc = False, True
    for piece in pieces:
        if new_doc:
            in_valid = bool(rng.random() < valid_fraction)
        split = "valid" if in_valid else "train"
        texts, ends = job[split]
        texts.append(piece.text)
        ends.append(piece.end)
        new_doc = piece.end
        sizes[split] += piece.nbytes
        if sum(sizes.values()) >= job_bytes:
            yield job["train"], job["valid"], sizes
            job, sizes = {s: ([], []) for s in SPLITS}, dict.fromkeys(SPLITS, 0)
    if sum(sizes.values()):
        yield job["train"], job["valid"], sizes


def prepare_dataset(
    tokenizer_dir: str | Path,
    inputs: list[str],
    out_dir: str | Path,
    valid_fraction: float = 0.01,
    workers: int = os.cpu_count() or 1,
    shard_mb: float = 256.0,
    seed: int = 0,
    corpus_options: CorpusOptions = CorpusOptions(),
    job_bytes: int = 1 << 20,
    progress: bool = True,
) -> PrepareReport:
    t0 = time.perf_counter()
    if not 0 <= valid_fraction < 1:
        raise UserError(f"valid fraction must be in [0, 1), not {valid_fraction}")
    if workers < 0:
        raise UserError(f"workers must be >= 0, not {workers}")
    tok = Tokenizer.load(tokenizer_dir)
    out = Path(out_dir)
    files = resolve_inputs(inputs)
    stats = CorpusStats()
    pieces = iter_pieces(files, corpus_options, stats)
    first = next(pieces, None)  # before touching the output: an empty corpus changes nothing
    if first is None:
        raise UserError(
            f"{' '.join(inputs)}: the corpus holds no documents ({stats.files} files read; "
            + ("; ".join(stats.report_lines()) or "all empty")
            + ")"
        )
    _check_out_dir(out, tok)
    dtype = tok.token_dtype
    header = {
        "tokenizer_sha256": tok.sha256,
        "vocab_size": tok.vocab_size,
        "eod_id": tok.eod_id,
        "inputs": list(inputs),
        "valid_fraction": valid_fraction,
        "seed": seed,
    }
    shard_tokens = max(1, int(shard_mb * 1e6) // dtype.itemsize)
    writers = {s: ShardWriter(out / s, s, header, dtype, shard_tokens) for s in SPLITS}

    jobs = _jobs(chain([first], pieces), job_bytes, valid_fraction, seed)
    gz = any(f.path.suffix == ".gz" for f in files)
    total = None if gz else sum(f.path.stat().st_size for f in files)
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="encoding", disable=not progress, mininterval=0.5)
    text_bytes = tokens = 0

    def write(result, sizes):
        nonlocal text_bytes, tokens
        for split, array in zip(SPLITS, result, strict=False):
            writers[split].write(array, sizes[split])
            tokens += len(array)
        text_bytes += sum(sizes.values())
        bar.update(sum(sizes.values()))
        bar.set_postfix(docs=stats.documents, tokens=f"{tokens / 1e6:.1f}M", refresh=False)

    try:
        if workers == 0:  # in-process, for debugging
            for train, valid, size in jobs:
                write(tuple(encode_job(tok, t, e, dtype) for t, e in (train, valid)), size)
        else:
            with mp.get_context("fork").Pool(workers, _init_worker, (str(tokenizer_dir),)) as pool:
                pending: deque = deque()
                for train, valid, size in jobs:
                    pending.append((pool.apply_async(_encode_in_worker, ((train, valid),)), size))
                    if len(pending) >= 2 * workers:
                        result, size = pending.popleft()
                        write(result.get(), size)
                while pending:
                    result, size = pending.popleft()
                    write(result.get(), size)
        manifests = {s: w.close() for s, w in writers.items()}
        tok.save(out / TOKENIZER_DIR)  # runs on this data keep it in their run directory
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    finally:
        bar.close()

    report = PrepareReport(str(out), time.perf_counter() - t0, text_bytes, skipped=stats.report_lines())
    for s, m in manifests.items():
        report.splits[s] = {
            "documents": m["num_documents"],
            "tokens": m["num_tokens"],
            "shards": len(m["shards"]),
        }
    if valid_fraction > 0 and manifests["valid"]["num_documents"] == 0:
        report.warnings.append(
            "warning: the valid split is empty (too few documents for --valid-fraction); "
            "training will report no validation loss"
        )
    return report
