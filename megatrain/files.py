"""Writing files so that a crash never leaves a half-written one under the real name,
and hashing them."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path


def write_atomically(path: Path, data: str | bytes) -> None:
    """Write to `path`.tmp, flush it to disk, then rename it over `path`: readers see the
    old file or the new one, never a part. A failed write removes the temp file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise


def save_safetensors_atomically(path: Path, tensors: dict, metadata: dict[str, str]) -> None:
    """A safetensors file written as write_atomically writes: straight from the tensors'
    memory to the temp file (safetensors' save() would first build the whole file in
    memory, twice)."""
    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        save_file(tensors, tmp, metadata=metadata)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json_atomically(path: Path, obj) -> None:
    write_atomically(path, json.dumps(obj, indent=1) + "\n")


def file_sha256(path: Path, block: int = 8 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while data := f.read(block):
            h.update(data)
    return h.hexdigest()


def read_jsonl(path: Path) -> list[dict]:
    """Rows of a JSON-lines file (metrics.jsonl, events.jsonl); none if it does not exist."""
    path = Path(path)
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
