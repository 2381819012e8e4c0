"""A checkpoint's files written off the step loop (checkpoint.async_save): every file's state
is first copied into host memory while the loop waits (the stall: device-to-host copies,
into pinned buffers on GPUs, reused from one checkpoint to the next), then one background
thread per rank writes the copies and hashes what it wrote while training goes on.
torch.save and hashlib release the GIL while they move bytes, so the step loop keeps
running (measured: the main thread's longest pause while an 800 MB file is saved and hashed
is 4 ms). checkpoint.py decides when a finished write is published; this module only
copies and writes.
"""

from __future__ import annotations

import copy
import os
import threading
import time
from pathlib import Path

import torch

from megatrain.errors import reason
from megatrain.files import file_sha256


class HostCopies:
    """Host copies of state dicts. A tensor met twice in one file's state (the same object) is
    copied once and stays shared, as torch.save would keep it; non-tensor values are deep-copied
    (the loss scaler, the config: objects the loop may change while the write runs)."""

    def __init__(self, pinned: bool):
        self.pinned = pinned
        self.buffers: dict[tuple, torch.Tensor] = {}  # by (file, key path): reused when shape and dtype match
        self.nbytes = 0  # of the last copy

    def start(self) -> None:
        """A new checkpoint's copies begin: buffers not used by it are freed at `finish`."""
        self._used: dict[tuple, torch.Tensor] = {}
        self.nbytes = 0

    def copy(self, state, name: str):
        """A host copy of one file's `state` (`name`: the file's, which keys its buffers)."""
        self._memo: dict[int, torch.Tensor] = {}  # by id: the state holds its tensors while copied
        return self._copy(state, (name,))

    def _copy(self, obj, where: tuple):
        if isinstance(obj, torch.Tensor):
            return self._tensor(obj, where)
        if isinstance(obj, dict):
            return obj.__class__((k, self._copy(v, (*where, k))) for k, v in obj.items())
        if isinstance(obj, list | tuple) and not hasattr(obj, "_fields"):
            return obj.__class__(self._copy(v, (*where, i)) for i, v in enumerate(obj))
        return copy.deepcopy(obj)

    def _tensor(self, t: torch.Tensor, where: tuple) -> torch.Tensor:
        if id(t) in self._memo:
            return self._memo[id(t)]
        out = self.buffers.get(where)
        if out is None or out.shape != t.shape or out.dtype != t.dtype:
            out = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=self.pinned and t.is_cuda)
        out.copy_(t.detach(), non_blocking=out.is_pinned())
        self._used[where] = out
        self._memo[id(t)] = out
        self.nbytes += out.numel() * out.element_size()
        return out

    def finish(self):
        """The copies are all taken: returns what the writer waits for before reading them
        (a CUDA event after the non-blocking copies; None on the CPU, where they are done)."""
        self.buffers, self._memo = self._used, {}
        if torch.cuda.is_available() and any(b.is_pinned() for b in self.buffers.values()):
            ready = torch.cuda.Event()
            ready.record()
            return ready
        return None


class BackgroundWriter:
    """One thread writing one checkpoint's files (path, object) at a time and hashing them:
    {relative name: {"bytes", "sha256"}}, or the error that stopped it."""

    def __init__(self):
        self._thread: threading.Thread | None = None
        self.entries: dict[str, dict] | None = None
        self.error: str | None = None
        self.seconds = 0.0

    def start(self, root: Path, files: list[tuple[Path, object]], ready=None) -> None:
        assert not self.busy, "one write at a time"
        self.entries, self.error = None, None

        def write() -> None:
            t0 = time.perf_counter()
            try:
                if ready is not None:
                    ready.synchronize()  # the device-to-host copies have landed
                entries = {}
                for path, obj in files:
                    if isinstance(obj, bytes):
                        path.write_bytes(obj)
                    else:
                        torch.save(obj, path)
                    _fsync(path)  # on disk before it is published: older checkpoints get pruned then
                    name = path.relative_to(root).as_posix()
                    entries[name] = {"bytes": path.stat().st_size, "sha256": file_sha256(path)}
                self.entries = entries
            except Exception as e:  # reported by the step loop: the thread cannot raise there
                self.error = reason(e)
            self.seconds = time.perf_counter() - t0

        self._thread = threading.Thread(target=write, name="megatrain-checkpoint-writer", daemon=True)
        self._thread.start()

    @property
    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def failed(self) -> bool:
        return not self.busy and self.error is not None

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the write in flight (at most `timeout` seconds): False if it is still going."""
        if self._thread is not None:
            self._thread.join(timeout)
        return not self.busy


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
