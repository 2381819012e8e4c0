"""Reading a text corpus: files, directories, globs and the built-in stdlib corpus.

Formats (each may also be gzipped, `name.ext.gz`):
  - text (.txt and any other suffix): a document is the whole file, or each
    blank-line-separated paragraph (`CorpusOptions.txt_documents`);
  - .jsonl: one JSON object per line, the document in `text_field`;
  - .parquet / .arrow (IPC file or stream): the document in column `text_column`.

Documents are yielded as `Piece`s of at most `max_piece_bytes`: a huge document is
cut at line boundaries so memory stays bounded whatever the corpus holds, and
`Piece.end` marks the last piece of each document (that is where the data step puts
its end-of-document token).

Bad input is reported in one line naming the file: `CorpusError`. Files named
directly on the command line must be readable text; files found by walking a
directory or expanding a glob are skipped (and counted in `CorpusStats`) when they are
empty or binary, because real trees contain such files (the stdlib has hundreds of
empty `__init__.py`).
"""

from __future__ import annotations

import glob
import gzip
import json
import os
import re
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tokenizer.errors import InputError

BUILTIN_STDLIB = "builtin:stdlib"
STRUCTURED_SUFFIXES = {".jsonl", ".parquet", ".arrow"}
# Suffixes picked up when walking a directory (any suffix is accepted when named directly).
WALK_SUFFIXES = {".txt", ".text", ".md", ".rst", ".py"} | STRUCTURED_SUFFIXES
BINARY_PROBE_BYTES = 8192
DEFAULT_PIECE_BYTES = 16 << 20


class CorpusError(InputError):
    """A corpus file that cannot be used; the message names the file and the problem."""


@dataclass(frozen=True)
class CorpusOptions:
    txt_documents: str = "file"
    """"file": a text file is one document; "paragraph": blank lines separate documents."""
    text_field: str = "text"
    """JSON field holding the document in .jsonl files."""
    text_column: str = "text"
    """Column holding the document in .parquet/.arrow files."""
    invalid_utf8: str = "skip"
    """"skip": drop a document that is not valid UTF-8 (counted and reported); "fail": stop."""
    max_piece_bytes: int = DEFAULT_PIECE_BYTES
    """Documents longer than this are yielded in pieces cut at line ends (bounded memory)."""

    def __post_init__(self):
        if self.txt_documents not in ("file", "paragraph"):
            raise InputError(f"txt_documents must be 'file' or 'paragraph', not {self.txt_documents!r}")
        if self.invalid_utf8 not in ("skip", "fail"):
            raise InputError(f"invalid_utf8 must be 'skip' or 'fail', not {self.invalid_utf8!r}")


@dataclass
class Piece:
    text: str
    source: str
    end: bool = True  # last piece of its document
    nbytes: int = 0  # UTF-8 size (iter_pieces fills it in where the reader did not)


@dataclass(frozen=True)
class CorpusFile:
    path: Path
    explicit: bool  # named directly by the user (errors) rather than found by a walk (skipped)


@dataclass
class CorpusStats:
    files: int = 0
    documents: int = 0
    bytes: int = 0
    skipped: dict[str, list[str]] = field(default_factory=dict)  # reason -> example sources

    def skip(self, reason: str, source: str) -> None:
        self.skipped.setdefault(reason, []).append(source)

    def report_lines(self, examples: int = 3) -> list[str]:
        lines = []
        for reason, sources in sorted(self.skipped.items()):
            shown = ", ".join(sources[:examples]) + (", ..." if len(sources) > examples else "")
            lines.append(f"skipped {len(sources)} {reason}: {shown}")
        return lines

    def to_json(self) -> dict:
        return {
            "files": self.files,
            "documents": self.documents,
            "bytes": self.bytes,
            "skipped": {k: len(v) for k, v in self.skipped.items()},
        }


def stdlib_files() -> list[Path]:
    """The running interpreter's standard library .py files, without site-packages."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(
            d for d in dirnames if d not in ("site-packages", "dist-packages", "__pycache__")
        )
        out.extend(Path(dirpath, f) for f in sorted(filenames) if f.endswith(".py"))
    return out


def _suffix(path: Path) -> str:
    """The format suffix, looking through a trailing .gz."""
    suffixes = path.suffixes
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    return suffixes[-1].lower() if suffixes else ""


def _walk(directory: Path) -> list[CorpusFile]:
    found = []
    for dirpath, dirnames, filenames in os.walk(directory):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__pycache__")
        for name in sorted(filenames):
            path = Path(dirpath, name)
            if not name.startswith(".") and _suffix(path) in WALK_SUFFIXES:
                found.append(CorpusFile(path, explicit=False))
    return found


def resolve_inputs(specs: list[str]) -> list[CorpusFile]:
    """Expand files, directories (recursively), globs and `builtin:stdlib` into files."""
    files: list[CorpusFile] = []
    for spec in specs:
        if spec == BUILTIN_STDLIB:
            files.extend(CorpusFile(p, explicit=False) for p in stdlib_files())
        elif glob.has_magic(spec):
            matches = sorted(glob.glob(spec, recursive=True))
            if not matches:
                raise CorpusError(f"{spec}: the pattern matches no files")
            for match in map(Path, matches):
                files.extend(_walk(match) if match.is_dir() else [CorpusFile(match, explicit=False)])
        else:
            path = Path(spec)
            if path.is_dir():
                files.extend(_walk(path))
            elif path.is_file():
                files.append(CorpusFile(path, explicit=True))
            elif path.exists():
                raise CorpusError(f"{spec}: not a regular file or directory")
            else:
                raise CorpusError(f"{spec}: no such file or directory")
    seen: set[str] = set()
    unique = []
    for f in files:
        key = os.path.abspath(f.path)
        if key not in seen:
            seen.add(key)
            unique.append(f)
    if not unique:
        raise CorpusError(
            f"{' '.join(specs)}: no corpus files found (looked for {', '.join(sorted(WALK_SUFFIXES))}, "
            "optionally .gz)"
        )
    return unique


def _open_binary(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def _decode(data: bytes, source: str, options: CorpusOptions, stats: CorpusStats) -> str | None:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        hint = "use --invalid-utf8 skip to drop such documents"
        _invalid(f"invalid UTF-8 at byte {e.start} ({hint})", source, options, stats)
        return None


def _utf8_cut(data: bytes) -> int:
    """The largest cut <= len(data) that does not split a UTF-8 character."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte & 0xC0 != 0x80:  # not a continuation byte: ASCII or a lead byte
            need = 1 if byte < 0xC0 else 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4
            return len(data) if back >= need else len(data) - back
    return len(data)


def _encodable(text: str, source: str, options: CorpusOptions, stats: CorpusStats) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError as e:
        _invalid(f"text is not valid Unicode (lone surrogate at character {e.start})", source, options, stats)
        return False


def _invalid(problem: str, source: str, options: CorpusOptions, stats: CorpusStats) -> None:
    """A document that is not UTF-8: the one-line error, or counted and skipped."""
    if options.invalid_utf8 == "fail":
        raise CorpusError(f"{source}: {problem}") from None
    stats.skip("documents with invalid UTF-8", source)


def _text_blocks(stream, max_bytes: int, head: bytes = b"") -> Iterator[bytes]:
    """Raw blocks of about `max_bytes`, each ending at a newline when there is one (a
    newline byte never sits inside a multi-byte UTF-8 character), else at a character
    boundary."""
    carry = head
    while True:
        chunk = stream.read(max_bytes)
        if not chunk:
            break
        data = carry + chunk
        cut = data.rfind(b"\n") + 1 or _utf8_cut(data) or len(data)
        yield data[:cut]
        carry = data[cut:]
    if carry:
        yield carry


def _read_text(cf: CorpusFile, options: CorpusOptions, stats: CorpusStats) -> Iterator[Piece]:
    source = str(cf.path)
    with _open_binary(cf.path) as stream:
        head = stream.read(BINARY_PROBE_BYTES)
        if not head:
            if cf.explicit:
                raise CorpusError(f"{source}: file is empty")
            stats.skip("empty files", source)
            return
        if b"\x00" in head:
            if cf.explicit:
                raise CorpusError(f"{source}: binary file (contains NUL bytes), not text")
            stats.skip("binary files", source)
            return
        blocks = _text_blocks(stream, options.max_piece_bytes, head)
        if options.txt_documents == "file":
            yield from _file_document(blocks, source, options, stats)
        else:
            yield from _paragraphs(blocks, source, options, stats)


def _file_document(blocks, source, options, stats) -> Iterator[Piece]:
    # A file is one block unless it is bigger than max_piece_bytes. Pieces are yielded
    # one behind so that the last one can be marked as the document's end.
    pending: Piece | None = None
    for raw in blocks:
        text = _decode(raw, source, options, stats)
        if text is None:
            continue
        if pending is not None:
            yield pending
        pending = Piece(text, source, end=False, nbytes=len(raw))
    if pending is not None:
        pending.end = True
        yield pending


def _paragraphs(blocks, source, options, stats) -> Iterator[Piece]:
    carry = ""
    for raw in blocks:
        text = _decode(raw, source, options, stats)
        if text is None:
            continue
        parts = _split_paragraphs(carry + text)
        carry = parts.pop() if parts else ""
        for p in parts:
            yield Piece(p, source)
        if len(carry.encode()) > options.max_piece_bytes:  # one giant paragraph: flush a piece
            yield Piece(carry, source, end=False)
            carry = ""
    if carry.strip():
        yield Piece(carry.rstrip("\n"), source)


_BLANK_LINES = re.compile(r"\n(?:[ \t\r\f\v]*\n)+")


def _split_paragraphs(text: str) -> list[str]:
    """Split at blank lines; the last element is the (possibly unfinished) tail."""
    parts = _BLANK_LINES.split(text)
    return [p for p in parts[:-1] if p.strip()] + [parts[-1]]


def _read_jsonl(cf: CorpusFile, options: CorpusOptions, stats: CorpusStats) -> Iterator[Piece]:
    source = str(cf.path)
    empty = True
    with _open_binary(cf.path) as stream:
        for lineno, raw in enumerate(stream, 1):
            if not raw.strip():
                continue
            empty = False
            where = f"{source}:{lineno}"
            line = _decode(raw, where, options, stats)
            if line is None:
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise CorpusError(f"{where}: invalid JSON ({e.msg})") from None
            if not isinstance(obj, dict) or options.text_field not in obj:
                keys = ", ".join(obj) if isinstance(obj, dict) else type(obj).__name__
                raise CorpusError(
                    f"{where}: no field {options.text_field!r} (found: {keys}); choose one with --text-field"
                )
            text = obj[options.text_field]
            if not isinstance(text, str):
                raise CorpusError(
                    f"{where}: field {options.text_field!r} is {type(text).__name__}, not a string"
                )
            if not _encodable(text, where, options, stats):  # JSON escapes can hold lone surrogates
                continue
            if text:
                yield Piece(text, source)
    if empty:
        if cf.explicit:
            raise CorpusError(f"{source}: file is empty")
        stats.skip("empty files", source)


def _arrow_batches(cf: CorpusFile, column: str) -> Iterator:
    import pyarrow as pa
    import pyarrow.ipc as ipc
    import pyarrow.parquet as pq

    source = str(cf.path)
    is_gz = cf.path.suffix == ".gz"
    src = pa.BufferReader(gzip.decompress(cf.path.read_bytes())) if is_gz else str(cf.path)
    try:
        if _suffix(cf.path) == ".parquet":
            reader = pq.ParquetFile(src)
            names = reader.schema_arrow.names
            batches = lambda: reader.iter_batches(columns=[column])  # noqa: E731
        else:
            handle = pa.memory_map(src) if not is_gz else src
            try:
                reader = ipc.open_file(handle)
                batches = lambda: (reader.get_batch(i) for i in range(reader.num_record_batches))  # noqa: E731
            except pa.ArrowInvalid:
                handle.seek(0)
                reader = ipc.open_stream(handle)
                batches = lambda: iter(reader)  # noqa: E731
            names = reader.schema.names
    except (pa.ArrowInvalid, OSError) as e:
        raise CorpusError(
            f"{source}: not a readable {_suffix(cf.path)} file ({str(e).splitlines()[0]})"
        ) from None
    if column not in names:
        raise CorpusError(
            f"{source}: no column {column!r} (columns: {', '.join(names)}); choose one with --text-column"
        )
    yield from batches()


def _read_table(cf: CorpusFile, options: CorpusOptions, stats: CorpusStats) -> Iterator[Piece]:
    import pyarrow as pa

    source = str(cf.path)
    col = options.text_column
    for batch in _arrow_batches(cf, col):
        array = batch.column(batch.schema.get_field_index(col))
        if pa.types.is_binary(array.type) or pa.types.is_large_binary(array.type):
            values = (None if v is None else _decode(v, source, options, stats) for v in array.to_pylist())
        elif pa.types.is_string(array.type) or pa.types.is_large_string(array.type):
            values = array.to_pylist()
        else:
            raise CorpusError(f"{source}: column {col!r} has type {array.type}, not string")
        for text in values:
            if text:
                yield Piece(text, source)


def iter_pieces(files: list[CorpusFile], options: CorpusOptions, stats: CorpusStats) -> Iterator[Piece]:
    """Every document of every file, in order, as pieces (see the module docstring)."""
    for cf in files:
        fmt = _suffix(cf.path)
        reader = (
            _read_jsonl if fmt == ".jsonl" else _read_table if fmt in (".parquet", ".arrow") else _read_text
        )
        stats.files += 1
        try:
            for piece in reader(cf, options, stats):
                piece.nbytes = piece.nbytes or len(piece.text.encode("utf-8"))
                stats.documents += piece.end
                stats.bytes += piece.nbytes
                yield piece
        except (gzip.BadGzipFile, EOFError, ValueError) as e:
            if isinstance(e, InputError):
                raise
            raise CorpusError(f"{cf.path}: cannot read ({e})") from None
        except OSError as e:
            raise CorpusError(f"{cf.path}: cannot read ({e.strerror or e})") from None
