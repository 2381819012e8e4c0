"""The tokenizer trainer and Tokenizer API, on real stdlib text with real SentencePiece."""

from __future__ import annotations

import gzip
import json

import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
import pytest
from helpers import SMALL_CORPUS, STDLIB, run_script
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tokenizer import (
    CorpusOptions,
    CorpusStats,
    InputError,
    Tokenizer,
    TrainerOptions,
    iter_pieces,
    resolve_inputs,
    train_tokenizer,
)
from tokenizer.tokenizer import SPECIAL_IDS
from tokenizer.train import sample_corpus, split_for_sentencepiece


@pytest.fixture(scope="module")
def tok(small_tokenizer) -> Tokenizer:
    return Tokenizer.load(small_tokenizer)


# --- round trips ---------------------------------------------------------------------

FIXED_TEXTS = [
    "def f(x):\n    return x  # comment\n",
    "日本語のテキストと中文文本，한국어 텍스트",
    "emoji 🙂🚀👩‍👩‍👧 and flags 🇫🇷",
    "control \x00\x01\x07\x1b[0m\x7f and \r\n line ends \t tabs\u2028\u2029",
    "  leading and trailing spaces  ",
    "\u2581 SentencePiece's own space mark \u2581\u2581x▁",
    "",
    "\n\n\n",
    "combining e\u0301 and ligature \ufb01 and full-width ＡＢＣ",
]


@pytest.mark.parametrize("text", FIXED_TEXTS)
def test_round_trip_fixed(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.unk_id not in ids  # byte fallback: nothing is unknown


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(max_size=200))
def test_round_trip_any_unicode(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_encode_batch_matches_encode(tok):
    texts = FIXED_TEXTS + [open(STDLIB / "json" / "decoder.py").read()]
    assert tok.encode_batch(texts, num_threads=2) == [tok.encode(t) for t in texts]


def test_api_properties(tok):
    assert tok.vocab_size == 1024
    assert tok.eod_id == SPECIAL_IDS["eod"]
    assert tok.id_to_piece(tok.eod_id) == "<|endoftext|>"
    assert tok.token_dtype.name == "uint16"
    # eod is a control symbol: the literal string is never matched in raw text
    assert tok.eod_id not in tok.encode("<|endoftext|>")
    # newlines and indentation become real pieces, not byte fallbacks
    assert any("\n" in p for p in tok.pieces())


# --- training --------------------------------------------------------------------------


def test_special_ids_stable_across_retraining(tmp_path):
    a = run_tok(tmp_path / "a", [SMALL_CORPUS[0]], vocab_size=600)
    b = run_tok(tmp_path / "b", SMALL_CORPUS[1:], vocab_size=900, user_symbols=["<|user|>"])
    for name, i in SPECIAL_IDS.items():
        assert a.id_to_piece(i) == b.id_to_piece(i), name
    assert (a.eod_id, a.pad_id, a.bos_id, a.eos_id) == (b.eod_id, b.pad_id, b.bos_id, b.eos_id)
    meta = json.loads((tmp_path / "b" / "tokenizer.json").read_text())
    assert meta["special_ids"] == SPECIAL_IDS
    assert meta["options"]["user_symbols"] == ["<|user|>"]
    assert len(b.encode("<|user|>")) == 1  # user symbols are matched in raw text


def run_tok(out, inputs, **kw) -> Tokenizer:
    train_tokenizer(inputs, out, TrainerOptions(**kw), progress=False)
    return Tokenizer.load(out)


def _pieces(corpus, corpus_options=CorpusOptions()):
    return list(iter_pieces(resolve_inputs(corpus), corpus_options, CorpusStats()))


def test_sampling_deterministic_by_seed(tmp_path):
    pieces = _pieces(SMALL_CORPUS)
    total = sum(p.nbytes for p in pieces)
    s0 = sample_corpus(pieces, total // 3, 1 << 16, seed=0)
    s0_again = sample_corpus(pieces, total // 3, 1 << 16, seed=0)
    s1 = sample_corpus(pieces, total // 3, 1 << 16, seed=1)
    assert s0.train == s0_again.train and s0.heldout == s0_again.heldout
    assert s0.train != s1.train
    assert s0.train_bytes <= total // 3 and s0.train_bytes > total // 5
    assert not set(s0.train) & set(s0.heldout)
    # the same sample trains the same pieces in separate runs (compare pieces, not files)
    opts = dict(vocab_size=700, sample_bytes=total // 3, seed=5)
    assert (
        run_tok(tmp_path / "x", SMALL_CORPUS, **opts).pieces()
        == run_tok(tmp_path / "y", SMALL_CORPUS, **opts).pieces()
    )


def test_split_for_sentencepiece_prefers_line_ends():
    text = "".join(f"line {i} " + "x" * (i % 50) + "\n" for i in range(500)) + "y" * 10000 + "日本" * 3000
    parts = split_for_sentencepiece(text, 4192)
    assert "".join(parts) == text
    assert all(len(p.encode()) <= 4192 for p in parts)
    assert parts[0].endswith("\n")
    ascii_text = "word " * 3000  # no newlines: cut after spaces
    parts = split_for_sentencepiece(ascii_text, 1000)
    assert "".join(parts) == ascii_text and all(len(p) <= 1000 and p.endswith(" ") for p in parts)


def test_report_and_metadata(tmp_path):
    proc = run_script(
        "train_tokenizer.py", "--input", *SMALL_CORPUS, "--vocab-size", "800", "--out", tmp_path, "--quiet"
    )
    out = proc.stdout
    assert "bytes/token" in out and "tokens/word" in out and "long documents cut into" in out
    meta = json.loads((tmp_path / "tokenizer.json").read_text())
    assert meta["vocab_size"] == 800 and meta["options"]["vocab_size"] == 800
    assert meta["sha256"] == Tokenizer.load(tmp_path).sha256
    assert meta["sample"]["split_documents"] > 0  # stdlib modules are longer than 4192 bytes
    assert 2.0 < meta["heldout"]["bytes_per_token"] < 6.0
    assert meta["corpus"]["documents"] > 20


def test_long_lines_are_cut_not_dropped(tmp_path):
    word = "zebracornucopia"
    giant = (" ".join([word] * 3000)) + "\n"  # one 48 KB line
    (tmp_path / "giant.txt").write_text(giant)
    tok = run_tok(tmp_path / "t", [str(tmp_path / "giant.txt"), SMALL_CORPUS[0]], vocab_size=600)
    meta = json.loads((tmp_path / "t" / "tokenizer.json").read_text())
    assert meta["sample"]["split_documents"] >= 1
    # SentencePiece saw the giant line (it would skip a 48 KB sentence): its word is learned
    assert len(tok.encode(word)) <= 2


# --- input formats -------------------------------------------------------------------

DOCS = ["first document\nwith two lines", "second: 日本語 🙂", "third one"]


def _write_formats(d):
    (d / "a.txt").write_text("\n\n".join(DOCS))
    with gzip.open(d / "a.txt.gz", "wt") as f:
        f.write("\n\n".join(DOCS))
    lines = "".join(json.dumps({"body": t, "id": i}) + "\n" for i, t in enumerate(DOCS))
    (d / "b.jsonl").write_text(lines)
    with gzip.open(d / "b.jsonl.gz", "wt") as f:
        f.write(lines)
    table = pa.table({"body": DOCS, "n": [1, 2, 3]})
    pq.write_table(table, d / "c.parquet")
    (d / "c.parquet.gz").write_bytes(gzip.compress((d / "c.parquet").read_bytes()))
    with ipc.new_file(str(d / "d.arrow"), table.schema) as w:
        w.write_table(table)
    with ipc.new_stream(str(d / "e.arrow"), table.schema) as w:  # stream format, same suffix
        w.write_table(table)
    (d / "d.arrow.gz").write_bytes(gzip.compress((d / "d.arrow").read_bytes()))


@pytest.mark.parametrize(
    "name", ["b.jsonl", "b.jsonl.gz", "c.parquet", "c.parquet.gz", "d.arrow", "e.arrow", "d.arrow.gz"]
)
def test_structured_formats(tmp_path, name):
    _write_formats(tmp_path)
    opts = CorpusOptions(text_field="body", text_column="body")
    assert [p.text for p in _pieces([str(tmp_path / name)], opts)] == DOCS


@pytest.mark.parametrize("name", ["a.txt", "a.txt.gz"])
def test_text_documents_file_or_paragraph(tmp_path, name):
    _write_formats(tmp_path)
    assert [p.text for p in _pieces([str(tmp_path / name)])] == ["\n\n".join(DOCS)]
    assert [p.text for p in _pieces([str(tmp_path / name)], CorpusOptions(txt_documents="paragraph"))] == DOCS


def test_directories_and_globs(tmp_path):
    _write_formats(tmp_path)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "z.md").write_text("markdown")
    (tmp_path / "ignored.bin").write_bytes(b"\x00\x01")
    found = [f.path.name for f in resolve_inputs([str(tmp_path)])]
    assert set(found) == {
        "a.txt",
        "a.txt.gz",
        "b.jsonl",
        "b.jsonl.gz",
        "c.parquet",
        "c.parquet.gz",
        "d.arrow",
        "d.arrow.gz",
        "e.arrow",
        "z.md",
    }
    assert [f.path.name for f in resolve_inputs([str(tmp_path / "*.jsonl*")])] == ["b.jsonl", "b.jsonl.gz"]
    assert [f.path.name for f in resolve_inputs([str(tmp_path / "**" / "*.md")])] == ["z.md"]


def test_big_documents_stream_in_pieces(tmp_path):
    text = "".join(f"{i} ünïcödé line\n" for i in range(20000))
    (tmp_path / "big.txt").write_text(text)
    pieces = _pieces([str(tmp_path / "big.txt")], CorpusOptions(max_piece_bytes=10000))
    assert len(pieces) > 30 and "".join(p.text for p in pieces) == text
    assert [p.end for p in pieces] == [False] * (len(pieces) - 1) + [True]


def test_builtin_stdlib_corpus_excludes_site_packages():
    files = resolve_inputs(["builtin:stdlib"])
    assert len(files) > 500
    assert not any("site-packages" in str(f.path) for f in files)


# --- bad input: one line naming the file ---------------------------------------------


def _cli_error(tmp_path, *inputs, extra=()):
    proc = run_script(
        "train_tokenizer.py",
        "--input",
        *map(str, inputs),
        "--vocab-size",
        "600",
        "--out",
        tmp_path / "out",
        "--quiet",
        *extra,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out" / "tokenizer.model").exists()
    return lines[0]


def test_bad_input_nonexistent(tmp_path):
    assert "nope.txt: no such file or directory" in _cli_error(tmp_path, tmp_path / "nope.txt")


def test_bad_input_empty_file(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    assert "empty.txt: file is empty" in _cli_error(tmp_path, tmp_path / "empty.txt")


def test_bad_input_empty_corpus(tmp_path):
    (tmp_path / "d").mkdir()
    for i in range(3):
        (tmp_path / "d" / f"{i}.txt").write_text("")
    assert "no text" in _cli_error(tmp_path, tmp_path / "d")
    (tmp_path / "nothing").mkdir()
    assert "nothing: no corpus files found" in _cli_error(tmp_path, tmp_path / "nothing")


def test_bad_input_binary_file(tmp_path):
    (tmp_path / "x.txt").write_bytes(b"text\x00\x00\xff binary")
    assert "x.txt: binary file" in _cli_error(tmp_path, tmp_path / "x.txt")


def test_invalid_utf8_skip_or_fail(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "good.txt").write_text((STDLIB / "json" / "decoder.py").read_text())
    (tmp_path / "d" / "latin1.txt").write_bytes("café crème".encode("latin-1"))
    line = _cli_error(tmp_path, tmp_path / "d", extra=("--invalid-utf8", "fail"))
    assert "latin1.txt: invalid UTF-8 at byte 3" in line
    proc = run_script(
        "train_tokenizer.py",
        "--input",
        tmp_path / "d",
        "--vocab-size",
        "400",
        "--out",
        tmp_path / "ok",
        "--quiet",
    )
    assert "skipped 1 documents with invalid UTF-8" in proc.stdout and "latin1.txt" in proc.stdout


def test_bad_jsonl(tmp_path):
    (tmp_path / "x.jsonl").write_text('{"text": "a"}\n{"body": "b"}\n')
    assert "x.jsonl:2: no field 'text' (found: body)" in _cli_error(tmp_path, tmp_path / "x.jsonl")
    (tmp_path / "y.jsonl").write_text('{"text": "a"}\nnot json\n')
    assert "y.jsonl:2: invalid JSON" in _cli_error(tmp_path, tmp_path / "y.jsonl")


def test_bad_parquet_column(tmp_path):
    pq.write_table(pa.table({"content": ["a", "b"]}), tmp_path / "x.parquet")
    assert "x.parquet: no column 'text' (columns: content)" in _cli_error(tmp_path, tmp_path / "x.parquet")


def test_vocab_too_large_is_explained(tmp_path):
    (tmp_path / "tiny.txt").write_text("the cat sat on the mat\n" * 50)
    line = _cli_error(tmp_path, tmp_path / "tiny.txt")
    assert "vocab size 600 is too large for this corpus sample" in line and "--allow-smaller-vocab" in line
    proc = run_script(
        "train_tokenizer.py",
        "--input",
        tmp_path / "tiny.txt",
        "--vocab-size",
        "600",
        "--out",
        tmp_path / "small",
        "--allow-smaller-vocab",
        "--quiet",
    )
    assert Tokenizer.load(tmp_path / "small").vocab_size < 600, proc.stdout


def test_vocab_too_small_is_explained(tmp_path):
    (tmp_path / "tiny.txt").write_text("the cat sat on the mat\n" * 50)
    proc = run_script(
        "train_tokenizer.py",
        "--input",
        tmp_path / "tiny.txt",
        "--vocab-size",
        "100",
        "--out",
        tmp_path / "o",
        check=False,
    )
    assert proc.returncode == 2 and "vocab size 100 is too small" in proc.stderr


def test_missing_or_damaged_tokenizer(tmp_path, small_tokenizer):
    with pytest.raises(InputError, match="no such tokenizer directory"):
        Tokenizer.load(tmp_path / "none")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no tokenizer.model"):
        Tokenizer.load(tmp_path / "empty")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "tokenizer.json").write_text((small_tokenizer / "tokenizer.json").read_text())
    model = bytearray((small_tokenizer / "tokenizer.model").read_bytes())
    model[len(model) // 2] ^= 0xFF
    (bad / "tokenizer.model").write_bytes(bytes(model))
    with pytest.raises(InputError, match="sha256 differs"):
        Tokenizer.load(bad)


def test_failed_write_keeps_previous_tokenizer(tmp_path, small_tokenizer):
    """A disk that fills up while writing leaves the previous tokenizer as it was."""
    import resource
    import shutil
    import signal

    out = tmp_path / "tok"
    shutil.copytree(small_tokenizer, out)
    before = (out / "tokenizer.model").read_bytes()
    old = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        resource.setrlimit(resource.RLIMIT_FSIZE, (1000, old[1]))  # writes past 1000 bytes fail (EFBIG)
        with pytest.raises(InputError, match="cannot write.*nothing was replaced"):
            run_tok(out, SMALL_CORPUS[:1], vocab_size=500)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old)
        signal.signal(signal.SIGXFSZ, handler)
    assert (out / "tokenizer.model").read_bytes() == before
    assert sorted(p.name for p in out.iterdir()) == ["tokenizer.json", "tokenizer.model"]


def test_hugging_face_tokenizer_gives_the_same_ids_and_text(small_tokenizer, tmp_path):
    """The exported fast tokenizer (tokenizer/hf.py), loaded back with AutoTokenizer, gives
    megatrain's ids and decodes to megatrain's text on a few thousand real documents and on
    unicode, whitespace runs, tabs, newlines, control characters, special-token text and a
    literal U+2581; the one documented exception is a literal U+FFFF."""
    import random

    from transformers import AutoTokenizer

    from tokenizer.hf import to_hf

    tok = Tokenizer.load(small_tokenizer)
    to_hf(tok, model_max_length=64).save_pretrained(tmp_path)
    hf = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    docs = []
    for path in sorted(STDLIB.rglob("*.py"))[:2500]:
        try:
            docs.append(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, OSError):
            continue
    rng = random.Random(0)
    docs += [
        "<|endoftext|> <s></s><pad><unk>",
        "\u2581x \u2581\u2581 y",
        "tabs\t\t\tand\n\n\nnewlines\r\n",
        "   ",
        "ctrl \x00\x01\x07\x1b[0m\x7f",
        "日本語のテキスト",
        "Ελληνικά и русский",
        "emoji 🎉 zwj 👩\u200d💻",
        "é e\u0301",
        "",
    ]
    docs += [
        "".join(
            chr(
                rng.choice(
                    [rng.randint(32, 126), rng.randint(0, 0x2FFF), rng.randint(0x1F300, 0x1F6FF), 9, 10, 32]
                )
            )
            for _ in range(rng.randint(1, 60))
        )
        for _ in range(1000)
    ]
    assert len(docs) > 3000
    for text in docs:
        ids = tok.encode(text)
        assert hf(text)["input_ids"] == ids, repr(text[:80])
        assert hf.decode(ids) == tok.decode(ids), repr(text[:80])
    assert hf.eos_token_id == tok.eod_id and hf.pad_token_id == tok.pad_id and hf.unk_token_id == tok.unk_id
    assert hf("x\uffffy")["input_ids"] != tok.encode("x\uffffy")  # the documented exception
