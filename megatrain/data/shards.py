"""Token shards on disk: Arrow IPC files plus one manifest.json per split.

A split directory (DIR/train, DIR/valid) holds `shard-NNNNN.arrow` files, each one
column `tokens` (uint16 when the vocabulary has fewer than 65536 ids, else uint32),
and `manifest.json`:

    {"format": "megatrain-shards/1", "split": "train", "tokenizer_sha256": "...",
     "vocab_size": 8192, "eod_id": 4, "dtype": "uint16", "complete": true,
     "num_tokens": N, "num_documents": D, "num_bytes": B (UTF-8 bytes of the text encoded),
     "shards": [{"file": "shard-00000.arrow", "num_tokens": n, "num_documents": d,
                 "bytes": b, "sha256": "..."}, ...]}

The token stream of a split is its shards concatenated in manifest order; documents
end with the eod token. Shards are written under a temporary name and renamed when
complete, and the manifest is rewritten (atomically) after every shard, so a run that
dies, or a full disk, never leaves a listed shard damaged.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow as pa

from megatrain.errors import UserError
from megatrain.files import file_sha256, write_json_atomically

FORMAT = "megatrain-shards/1"
MANIFEST = "manifest.json"
TMP_SUFFIX = ".tmp"


def read_manifest(split_dir: Path) -> dict:
    path = split_dir / MANIFEST
    if not path.is_file():
        raise UserError(f"{split_dir}: no {MANIFEST}; prepare the data with launch/prepare_data.py")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: damaged manifest ({e})") from None
    if manifest.get("format") != FORMAT:
        raise UserError(f"{path}: not a megatrain shard manifest (format {manifest.get('format')!r})")
    return manifest


def disk_error(path: Path, err: OSError) -> str:
    reason = err.strerror or str(err).splitlines()[0]
    if (
        err.errno in (28, 27, 122) or "No space" in str(err) or "too large" in str(err)
    ):  # ENOSPC, EFBIG, EDQUOT
        reason = f"disk full ({reason})"
    return f"{path}: {reason}"


class ShardWriter:
    """Appends token arrays to a split, cutting shards at `shard_tokens` tokens."""

    def __init__(self, split_dir: Path, split: str, header: dict, dtype: np.dtype, shard_tokens: int):
        self.dir = Path(split_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.dtype = np.dtype(dtype)
        self.eod_id = header["eod_id"]
        self.shard_tokens = shard_tokens
        self.schema = pa.schema(
            [("tokens", pa.from_numpy_dtype(self.dtype))],
            metadata={"tokenizer_sha256": header["tokenizer_sha256"]},
        )
        self.manifest = {
            "format": FORMAT,
            "split": split,
            **header,
            "dtype": self.dtype.name,
            "complete": False,
            "num_tokens": 0,
            "num_documents": 0,
            "num_bytes": 0,
            "shards": [],
        }
        self._writer = None
        self._path: Path | None = None
        self._tokens = self._docs = 0
        write_json_atomically(self.dir / MANIFEST, self.manifest)

    @property
    def _tmp(self) -> Path:
        return self._path.with_name(self._path.name + TMP_SUFFIX)

    def write(self, tokens: np.ndarray, text_bytes: int = 0) -> None:
        """Append tokens; `text_bytes`: the UTF-8 size of the text they encode (the split's
        num_bytes, for bits per byte)."""
        self.manifest["num_bytes"] += text_bytes
        tokens = np.asarray(tokens, dtype=self.dtype)
        while len(tokens):
            if self._writer is None:
                self._open()
            take = min(len(tokens), self.shard_tokens - self._tokens)
            part, tokens = tokens[:take], tokens[take:]
            with self._on_io_error():
                self._writer.write_batch(pa.record_batch([pa.array(part)], schema=self.schema))
            self._tokens += take
            self._docs += int(np.count_nonzero(part == self.eod_id))
            if self._tokens >= self.shard_tokens:
                self._finish_shard()

    def close(self) -> dict:
        if self._writer is not None:
            self._finish_shard()
        self.manifest["complete"] = True
        with self._on_io_error():
            write_json_atomically(self.dir / MANIFEST, self.manifest)
        return self.manifest

    def abort(self) -> None:
        """Drop the shard being written; the shards already listed stay as they are."""
        if self._writer is not None:
            try:
                self._writer.close()
            except (OSError, pa.ArrowException):
                pass
            self._writer = None
        if self._path is not None:
            self._tmp.unlink(missing_ok=True)

    def _open(self) -> None:
        self._path = self.dir / f"shard-{len(self.manifest['shards']):05d}.arrow"
        self._tokens = self._docs = 0
        with self._on_io_error():
            self._writer = pa.ipc.new_file(str(self._tmp), self.schema)

    def _finish_shard(self) -> None:
        with self._on_io_error():
            self._publish_shard()

    def _publish_shard(self) -> None:
        self._writer.close()
        self._writer = None
        tmp = self._tmp
        entry = {
            "file": self._path.name,
            "num_tokens": self._tokens,
            "num_documents": self._docs,
            "bytes": tmp.stat().st_size,
            "sha256": file_sha256(tmp),
        }
        os.replace(tmp, self._path)
        listed = dict(
            self.manifest,
            shards=self.manifest["shards"] + [entry],
            num_tokens=self.manifest["num_tokens"] + self._tokens,
            num_documents=self.manifest["num_documents"] + self._docs,
        )
        try:
            write_json_atomically(self.dir / MANIFEST, listed)
        except OSError:
            self._path.unlink()  # a shard the manifest does not list is not kept
            raise
        self.manifest = listed

    @contextmanager
    def _on_io_error(self):
        """On an I/O failure remove the partial shard and say which shards survive."""
        try:
            yield
        except OSError as e:  # pyarrow's I/O errors are OSErrors too
            path = self._path or self.dir / MANIFEST
            self.abort()
            n = len(self.manifest["shards"])
            raise UserError(
                f"{disk_error(path, e)}; removed the partial shard, the {n} earlier "
                f"shard(s) are intact and listed in {self.dir / MANIFEST}"
            ) from None


def open_shard(path: Path, dtype: np.dtype) -> list[np.ndarray]:
    """Memory-map one shard; returns its record batches as zero-copy numpy views."""
    reader = pa.ipc.open_file(pa.memory_map(str(path)))
    out = []
    for i in range(reader.num_record_batches):
        column = reader.get_batch(i).column(0)
        if column.type != pa.from_numpy_dtype(dtype):
            raise UserError(f"{path}: tokens are {column.type}, the manifest says {dtype}")
        out.append(column.to_numpy(zero_copy_only=True))
    return out
