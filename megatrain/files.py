"""Writing files so that a crash never leaves a half-written one under the real name,
hashing them, and safetensors files read and written one tensor at a time (a model's
state can be far larger than memory)."""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import math
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


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


@dataclass(frozen=True)
class Deferred:
    """A tensor known by its shape and dtype, made only when it is needed: a file far
    larger than memory is read (read_deferred_tensors) and written (SafetensorsFile) one
    tensor at a time."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    make: Callable[[], torch.Tensor]


class SafetensorsFile:
    """A safetensors file of `tensors` (torch tensors, or Deferred ones made in turn and
    dropped once written), laid out before any tensor is made, so that it can be written
    whole by one process (save_safetensors_atomically) or in byte shares by many at once
    (create, then write_share on every writer), each share hashed as it is written.

    The format is written here rather than by safetensors, which needs every tensor in
    memory at once: a little-endian u64 header length, the JSON header padded with spaces
    to 8 bytes, then the tensors' bytes in header order (safetensors' own: widest dtype
    first, then by name)."""

    def __init__(self, tensors: Mapping, metadata: dict[str, str]):
        if sys.byteorder != "little":  # the tensors' bytes are written as they lie in memory
            raise RuntimeError("safetensors files are little-endian; this machine is not")
        names = _dtype_names()
        self.tensors = tensors
        self.declared = {k: (tuple(t.shape), t.dtype) for k, t in tensors.items()}
        order = sorted(self.declared, key=lambda k: (-self.declared[k][1].itemsize, k))
        header, offset, sizes = {"__metadata__": dict(metadata)}, 0, []
        for k in order:
            shape, dtype = self.declared[k]
            size = math.prod(shape) * dtype.itemsize
            header[k] = {"dtype": names[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            sizes.append(size)
            offset += size
        head = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        head += b" " * (-len(head) % 8)
        self.head = len(head).to_bytes(8, "little") + head
        # (key, where its bytes start in the file), in file order
        self.placed = list(zip(order, itertools.accumulate([len(self.head), *sizes[:-1]]), strict=True))
        self.size = len(self.head) + offset

    def shares(self, n: int) -> list[tuple[int, int]]:
        """The file's bytes cut into n contiguous [start, end) ranges at tensor boundaries,
        about equal in size (the first holds the header; a range may be empty)."""
        data = max(1, self.size - len(self.head))
        first_of = [0] + [self.size] * n  # the start of each share; share i holds tensors placed in it
        for _, start in reversed(self.placed):
            first_of[min(n - 1, (start - len(self.head)) * n // data)] = start
        for i in range(n - 1, 0, -1):  # an empty share starts where the next one does
            first_of[i] = min(first_of[i], first_of[i + 1])
        first_of[0] = 0
        return list(zip(first_of[:-1], first_of[1:], strict=True))

    def create(self, path: Path) -> None:
        """The file at its full size, its bytes still to be written by write_share."""
        with open(path, "wb") as f:
            f.truncate(self.size)

    def write_share(self, path: Path, i: int, n: int, progress: str | None = None) -> dict:
        """Writes share i of n into the created file at `path`, synced to disk; returns
        {"bytes", "sha256"} of that byte range (hashed as written, not read back)."""
        import torch
        from tqdm import tqdm

        lo, hi = self.shares(n)[i]
        h = hashlib.sha256()
        with (
            open(path, "r+b") as f,
            tqdm(total=hi - lo, unit="B", unit_scale=True, desc=progress, disable=progress is None) as bar,
        ):
            f.seek(lo)
            if lo == 0:
                f.write(self.head)
                h.update(self.head)
            for k, start in self.placed:
                if not lo <= start < hi:
                    continue
                t = self.tensors[k]
                t = t.make() if isinstance(t, Deferred) else t
                if (tuple(t.shape), t.dtype) != self.declared[k]:
                    raise ValueError(
                        f"{k}: made as {list(t.shape)} {t.dtype}, declared "
                        f"{list(self.declared[k][0])} {self.declared[k][1]}"
                    )
                data = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
                f.write(data.data)
                h.update(data.data)
                bar.update(data.nbytes)
                del t, data
            f.flush()
            os.fsync(f.fileno())
        return {"bytes": hi - lo, "sha256": h.hexdigest()}


def save_safetensors_atomically(
    path: Path, tensors: Mapping, metadata: dict[str, str], progress: str | None = None
) -> str:
    """SafetensorsFile(tensors, metadata) written by this process as write_atomically writes;
    `progress` names a tqdm bar over its bytes. Returns the file's sha256."""
    file = SafetensorsFile(tensors, metadata)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        file.create(tmp)
        written = file.write_share(tmp, 0, 1, progress)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return written["sha256"]


def read_deferred_tensors(file: Path) -> dict[str, Deferred]:
    """The tensors of a .safetensors file or a PyTorch weights file (loaded weights-only),
    as fp32, each read from the file only when made: a file larger than memory is read one
    tensor at a time."""
    import torch

    file = Path(file)
    if file.suffix == ".safetensors":
        from safetensors import safe_open

        def read(key: str) -> torch.Tensor:
            with safe_open(str(file), "pt") as f:
                return f.get_tensor(key).to(torch.float32)

        with safe_open(str(file), "pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 (not a dict)
        return {k: Deferred(shape, torch.float32, functools.partial(read, k)) for k, shape in shapes.items()}
    try:  # mapped from the file; the legacy (non-zip) format cannot be, and is read whole
        tensors = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:
        tensors = torch.load(file, map_location="cpu", weights_only=True)
    return {
        k: Deferred(tuple(t.shape), torch.float32, functools.partial(t.to, torch.float32))
        for k, t in tensors.items()
    }


def _dtype_names() -> dict:
    import torch

    return {
        torch.float64: "F64",
        torch.float32: "F32",
        torch.float16: "F16",
        torch.bfloat16: "BF16",
        torch.int64: "I64",
        torch.int32: "I32",
        torch.int16: "I16",
        torch.int8: "I8",
        torch.uint8: "U8",
        torch.bool: "BOOL",
    }


def write_json_atomically(path: Path, obj) -> None:
    write_atomically(path, json.dumps(obj, indent=1) + "\n")


def file_sha256(path: Path, start: int = 0, length: int | None = None, block: int = 8 << 20) -> str:
    """The sha256 of the file's bytes [start, start + length) (to its end without a length)."""
    h = hashlib.sha256()
    left = math.inf if length is None else length
    with open(path, "rb") as f:
        f.seek(start)
        while left > 0 and (data := f.read(int(min(block, left)))):
            h.update(data)
            left -= len(data)
    return h.hexdigest()


def read_jsonl(path: Path) -> list[dict]:
    """Rows of a JSON-lines file (metrics.jsonl, events.jsonl); none if it does not exist."""
    path = Path(path)
    return (
        [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    )
