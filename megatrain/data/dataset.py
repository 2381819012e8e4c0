"""Training samples: fixed windows over a split's token stream.

Sample i of a `TokenDataset` is tokens [i*seq_len, i*seq_len + seq_len + 1) of the
concatenated shards: inputs are the first seq_len tokens, targets the last seq_len.
Windows cross document boundaries (the eod token separates documents), as in GPT-3.
Shards are memory-mapped and read zero-copy; a window is a view into the map unless
it straddles two record batches.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from megatrain.data.shards import MANIFEST, open_shard, read_manifest
from megatrain.errors import UserError


def split_dir(path: str | Path, split: str) -> Path:
    """`path` is a split directory (has manifest.json) or a prepared dataset root."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such data directory")
    return path if (path / MANIFEST).is_file() else path / split


class TokenDataset:
    def __init__(self, path: str | Path, seq_len: int, split: str = "train"):
        self.dir = split_dir(path, split)
        self.manifest = read_manifest(self.dir)
        self.seq_len = seq_len
        if not self.manifest["complete"]:
            raise UserError(
                f"{self.dir / MANIFEST}: the split is incomplete (prepare_data.py stopped early); re-run it"
            )
        self.dtype = np.dtype(self.manifest["dtype"])
        chunks = []
        for entry in self.manifest["shards"]:
            shard = self.dir / entry["file"]
            if not shard.is_file():
                raise UserError(f"{shard}: listed in the manifest but missing")
            if shard.stat().st_size != entry["bytes"]:
                raise UserError(
                    f"{shard}: {shard.stat().st_size} bytes, the manifest says {entry['bytes']} (damaged)"
                )
            chunks.extend(open_shard(shard, self.dtype))
        self._chunks = [c for c in chunks if len(c)]
        lengths = np.array([len(c) for c in self._chunks], dtype=np.int64)
        self._starts = np.concatenate([[0], np.cumsum(lengths)])
        self.num_tokens = int(self._starts[-1])
        if self.num_tokens != self.manifest["num_tokens"]:
            raise UserError(
                f"{self.dir}: shards hold {self.num_tokens} tokens, the manifest says "
                f"{self.manifest['num_tokens']}"
            )
        self.num_samples = max(0, (self.num_tokens - 1) // seq_len)
        if self.num_samples == 0 and seq_len > 0:
            raise UserError(
                f"{self.dir}: {self.num_tokens} tokens are fewer than one sample of {seq_len + 1}"
            )

    @property
    def bytes_per_token(self) -> float | None:
        """UTF-8 bytes of text per token of the split (None for data prepared before this
        was recorded): turns a loss per token into bits per byte."""
        return self.manifest["num_bytes"] / self.num_tokens if self.manifest.get("num_bytes") else None

    @property
    def tokenizer_sha256(self) -> str:
        return self.manifest["tokenizer_sha256"]

    def __len__(self) -> int:
        return self.num_samples

    def tokens(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) of the stream (a view when they lie in one record batch)."""
        k = int(np.searchsorted(self._starts, start, side="right")) - 1
        offset = start - int(self._starts[k])
        if stop <= self._starts[k + 1]:
            return self._chunks[k][offset : offset + stop - start]
        parts, pos = [], start
        while pos < stop:
            end = min(stop, int(self._starts[k + 1]))
            parts.append(self._chunks[k][pos - int(self._starts[k]) : end - int(self._starts[k])])
            pos, k = end, k + 1
        return np.concatenate(parts)

    def __getitem__(self, i: int) -> np.ndarray:
        if not 0 <= i < self.num_samples:
            raise IndexError(f"sample {i} out of range [0, {self.num_samples})")
        start = i * self.seq_len
        return self.tokens(start, start + self.seq_len + 1)

    def batch(self, indices) -> np.ndarray:
        """Samples stacked into an array of shape [len(indices), seq_len + 1], in the shards'
        token dtype (uint16 or uint32: the compact form travels to the device, widened there)."""
        return stack_samples(self, indices)


def stack_samples(dataset, indices) -> np.ndarray:
    out = np.empty((len(indices), dataset.seq_len + 1), dtype=dataset.dtype)
    for row, i in enumerate(indices):
        out[row] = dataset[int(i)]
    return out
