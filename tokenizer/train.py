"""Training a SentencePiece BPE tokenizer on a corpus of any size.

The corpus is streamed once. Documents are sampled before SentencePiece sees them
(a seeded bottom-k reservoir with a byte budget), because SentencePiece holds its
input in memory (10-15x the text) and its own sampling is not reproducible across
processes. A small held-out sample is kept aside to report bytes per token.
Documents are fed whole through `sentence_iterator` (so newlines and indentation
can become pieces), cut into pieces of at most `max_sentence_length` bytes at line
ends, because SentencePiece silently skips longer sentences.
"""

from __future__ import annotations

import heapq
import io
import json
import os
import random
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import sentencepiece as spm
from tqdm import tqdm

from tokenizer.corpus import CorpusOptions, CorpusStats, iter_pieces, resolve_inputs
from tokenizer.errors import InputError
from tokenizer.tokenizer import (
    FORMAT,
    META_FILE,
    MODEL_FILE,
    SPECIAL_IDS,
    SPECIAL_PIECES,
    Tokenizer,
    sha256_bytes,
)

HELDOUT_PROBABILITY = 0.02


@dataclass
class TrainerOptions:
    vocab_size: int
    """Number of pieces, specials and the 256 byte pieces included."""
    byte_fallback: bool = True
    """Spell characters outside the vocabulary as UTF-8 byte pieces (no <unk> ever)."""
    character_coverage: float = 0.9995
    """Share of characters covered by character pieces; the rest go to byte fallback."""
    normalization: str = "identity"
    """"identity" keeps text exactly (round trips); "nfkc" applies Unicode NFKC first."""
    split_digits: bool = False
    """Split numbers into single digits (no multi-digit pieces)."""
    user_symbols: list[str] = field(default_factory=list)
    """Extra pieces matched verbatim in raw text (e.g. "<|im_start|>")."""
    max_sentence_length: int = 4192
    """Longest input SentencePiece accepts, in bytes; longer documents are cut to fit."""
    allow_smaller_vocab: bool = False
    """Accept fewer pieces than vocab_size when the sample cannot support it."""
    num_threads: int = os.cpu_count() or 1
    seed: int = 0
    """Seeds the document sample (the only randomness in training)."""
    sample_bytes: int = 200 << 20
    """Budget of text SentencePiece trains on (it needs ~10-15x this in memory)."""
    heldout_bytes: int = 256 << 10
    """Budget of held-out text for the bytes-per-token report."""

    def __post_init__(self):
        if self.vocab_size < 1:
            raise InputError(f"vocab size must be positive, not {self.vocab_size}")
        if self.normalization not in ("identity", "nfkc"):
            raise InputError(f"normalization must be 'identity' or 'nfkc', not {self.normalization!r}")
        if not 0 < self.character_coverage <= 1:
            raise InputError(f"character coverage must be in (0, 1], not {self.character_coverage}")
        if self.max_sentence_length < 16:
            raise InputError(f"max sentence length must be at least 16 bytes, not {self.max_sentence_length}")
        clash = set(self.user_symbols) & set(SPECIAL_PIECES.values())
        if clash:
            raise InputError(f"user symbols {sorted(clash)} clash with megatrain's special tokens")

    def sentencepiece_kwargs(self) -> dict:
        """Everything passed to SentencePieceTrainer besides the input and output."""
        return dict(
            model_type="bpe",
            vocab_size=self.vocab_size,
            byte_fallback=self.byte_fallback,
            character_coverage=self.character_coverage,
            normalization_rule_name=self.normalization,
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            allow_whitespace_only_pieces=True,
            split_digits=self.split_digits,
            user_defined_symbols=list(self.user_symbols),
            control_symbols=[SPECIAL_PIECES["eod"]],
            unk_id=SPECIAL_IDS["unk"],
            bos_id=SPECIAL_IDS["bos"],
            eos_id=SPECIAL_IDS["eos"],
            pad_id=SPECIAL_IDS["pad"],
            unk_piece=SPECIAL_PIECES["unk"],
            bos_piece=SPECIAL_PIECES["bos"],
            eos_piece=SPECIAL_PIECES["eos"],
            pad_piece=SPECIAL_PIECES["pad"],
            max_sentence_length=self.max_sentence_length,
            num_threads=self.num_threads,
            input_sentence_size=0,  # we sampled already, reproducibly
            shuffle_input_sentence=False,
            hard_vocab_limit=not self.allow_smaller_vocab,
            minloglevel=2,
        )


@dataclass
class Sample:
    """The documents SentencePiece trains on, and those held out for the report."""

    train: list[str]
    heldout: list[str]
    train_bytes: int
    heldout_bytes: int
    heldout_in_sample: bool = False  # nothing could be held out: the report uses training text


class _BottomK:
    """Keeps the items with the smallest random keys whose sizes fit a byte budget:
    a uniform sample of documents, in bounded memory, reproducible from the seed."""

    def __init__(self, budget: int):
        self.budget, self.size, self.heap = budget, 0, []  # heap of (-key, seq, nbytes, text)

    def offer(self, key: float, seq: int, text: str, nbytes: int) -> None:
        heapq.heappush(self.heap, (-key, seq, nbytes, text))
        self.size += nbytes
        while self.size > self.budget and self.heap:
            self.size -= heapq.heappop(self.heap)[2]

    def in_order(self) -> list[str]:
        return [text for _, _, _, text in sorted(self.heap, key=lambda item: item[1])]


def sample_corpus(pieces, sample_bytes: int, heldout_bytes: int, seed: int) -> Sample:
    rng = random.Random(seed)
    train, heldout = _BottomK(sample_bytes), _BottomK(heldout_bytes)
    for seq, piece in enumerate(pieces):
        held = rng.random() < HELDOUT_PROBABILITY
        key = rng.random()
        (heldout if held else train).offer(key, seq, piece.text, piece.nbytes)
    sample = Sample(train.in_order(), heldout.in_order(), train.size, heldout.size)
    if not sample.train and sample.heldout:  # a corpus of a document or two
        sample = Sample(sample.heldout, sample.heldout, sample.heldout_bytes, sample.heldout_bytes, True)
    elif not sample.heldout:
        heldout = sample.train[:64]
        sample = Sample(
            sample.train, heldout, sample.train_bytes, sum(len(t.encode()) for t in heldout), True
        )
    return sample


def split_for_sentencepiece(text: str, max_bytes: int) -> list[str]:
    """Cut `text` into pieces of at most `max_bytes` UTF-8 bytes: after the last newline
    that fits, else after the last space, else at a character boundary."""
    ascii_only = text.isascii()  # then str offsets are byte offsets: no encode/decode
    data = text if ascii_only else text.encode("utf-8")
    if len(data) <= max_bytes:
        return [text]
    newline, space = ("\n", " ") if ascii_only else (b"\n", b" ")
    out, start = [], 0
    while len(data) - start > max_bytes:
        end = start + max_bytes
        cut = data.rfind(newline, start, end) + 1 or data.rfind(space, start, end) + 1
        if cut <= start:
            cut = end
            while not ascii_only and data[cut] & 0xC0 == 0x80:  # do not cut inside a character
                cut -= 1
        out.append(data[start:cut])
        start = cut
    out.append(data[start:])
    return out if ascii_only else [part.decode("utf-8") for part in out]


@dataclass
class TrainReport:
    out_dir: str
    seconds: float
    vocab_size: int
    corpus: dict
    sample: dict
    heldout: dict
    skipped: list[str]

    def lines(self) -> list[str]:
        c, s, h = self.corpus, self.sample, self.heldout
        where = " (in-sample: corpus too small to hold text out)" if h["in_sample"] else ""
        return [
            f"tokenizer: {self.out_dir}  vocab {self.vocab_size}  in {self.seconds:.1f}s",
            f"corpus: {c['files']} files, {c['documents']} documents, {c['bytes'] / 1e6:.1f} MB read",
            f"sample: {s['documents']} documents, {s['bytes'] / 1e6:.1f} MB; "
            f"{s['split_documents']} long documents cut into {s['split_pieces']} pieces <= "
            f"{s['max_sentence_length']} bytes",
            f"held-out{where}: {h['documents']} documents, {h['bytes'] / 1e6:.2f} MB: "
            f"{h['bytes_per_token']:.3f} bytes/token, {h['tokens_per_word']:.3f} tokens/word",
            *self.skipped,
        ]


_SP_VOCAB_TOO_HIGH = re.compile(r"Vocabulary size too high \((\d+)\).*<= (\d+)")
_SP_VOCAB_TOO_SMALL = re.compile(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)")


def _explain_sentencepiece_error(err: RuntimeError, options: TrainerOptions) -> InputError:
    msg = str(err)
    if m := _SP_VOCAB_TOO_HIGH.search(msg):
        return InputError(
            f"vocab size {m.group(1)} is too large for this corpus sample: SentencePiece found only enough "
            "distinct "
            f"merges for {m.group(2)} pieces; use --vocab-size {m.group(2)} or less, more text, or "
            "--allow-smaller-vocab"
        )
    if m := _SP_VOCAB_TOO_SMALL.search(msg):
        return InputError(
            f"vocab size {m.group(1)} is too small: this sample needs {m.group(2)} pieces just for its "
            "specials, "
            f"characters and (with byte fallback) the 256 byte pieces; use --vocab-size above {m.group(2)}"
        )
    return InputError(f"SentencePiece failed: {msg.splitlines()[0] if msg else type(err).__name__}")


def _write_atomically(files: dict[Path, bytes]) -> None:
    """Write every file under a temporary name, then rename them all: a failure (disk
    full) leaves the previous files as they were."""
    temps = {}
    try:
        for path, data in files.items():
            tmp = path.with_name(f".{path.name}.tmp")
            temps[path] = tmp
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
    except OSError as e:
        for tmp in temps.values():
            tmp.unlink(missing_ok=True)
        raise InputError(f"{path}: cannot write ({e.strerror or e}); nothing was replaced") from None
    for path, tmp in temps.items():
        os.replace(tmp, path)


def train_tokenizer(
    inputs: list[str],
    out_dir: str | Path,
    options: TrainerOptions,
    corpus_options: CorpusOptions = CorpusOptions(),
    progress: bool = True,
) -> TrainReport:
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    files = resolve_inputs(inputs)
    stats = CorpusStats()
    pieces = iter_pieces(files, corpus_options, stats)
    if progress:
        pieces = tqdm(pieces, desc="reading corpus", unit=" docs", mininterval=0.5, leave=False)
    sample = sample_corpus(pieces, options.sample_bytes, options.heldout_bytes, options.seed)
    if not sample.train:
        raise InputError(f"{' '.join(inputs)}: the corpus holds no text ({stats.files} files read)")

    sentences, split_docs = [], 0
    for text in sample.train:
        parts = split_for_sentencepiece(text, options.max_sentence_length)
        split_docs += len(parts) > 1
        sentences.extend(parts)

    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences), model_writer=model, **options.sentencepiece_kwargs()
        )
    except RuntimeError as e:
        raise _explain_sentencepiece_error(e, options) from None
    proto = model.getvalue()
    tok = Tokenizer(proto, {"special_ids": SPECIAL_IDS})

    held_tokens = sum(len(ids) for ids in tok.encode_batch(sample.heldout, num_threads=options.num_threads))
    held_words = sum(len(t.split()) for t in sample.heldout)
    report = TrainReport(
        out_dir=str(out_dir),
        seconds=0.0,
        vocab_size=tok.vocab_size,
        corpus=stats.to_json(),
        sample={
            "documents": len(sample.train),
            "bytes": sample.train_bytes,
            "split_documents": split_docs,
            "split_pieces": len(sentences),
            "max_sentence_length": options.max_sentence_length,
        },
        heldout={
            "documents": len(sample.heldout),
            "bytes": sample.heldout_bytes,
            "in_sample": sample.heldout_in_sample,
            "bytes_per_token": sample.heldout_bytes / max(held_tokens, 1),
            "tokens_per_word": held_tokens / max(held_words, 1),
        },
        skipped=stats.report_lines(),
    )
    meta = {
        "format": FORMAT,
        "model_file": MODEL_FILE,
        "sha256": sha256_bytes(proto),
        "vocab_size": tok.vocab_size,
        "special_ids": SPECIAL_IDS,
        "special_pieces": SPECIAL_PIECES,
        "options": asdict(options),
        "corpus_options": asdict(corpus_options),
        "inputs": list(inputs),
        "corpus": report.corpus,
        "sample": report.sample,
        "heldout": report.heldout,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_atomically(
        {out_dir / MODEL_FILE: proto, out_dir / META_FILE: (json.dumps(meta, indent=2) + "\n").encode()}
    )
    report.seconds = time.perf_counter() - t0
    return report
