"""Atomic writes: a reader sees the old file or the new one, never a part; the streamed
safetensors writer writes what safetensors itself writes."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save

from megatrain.files import Deferred, SafetensorsFile, file_sha256, save_safetensors_atomically


def test_streamed_safetensors_are_safetensors_own_bytes(tmp_path):
    tensors = {
        "b": torch.randn(3, 5),
        "a.weight": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "c": torch.randn(7, dtype=torch.float64).to(torch.bfloat16),
        "d": torch.tensor(2.5),
    }
    path = tmp_path / "state.safetensors"
    made = []

    def later(key):
        made.append(key)
        return tensors[key].clone()

    lazy = {k: Deferred(tuple(t.shape), t.dtype, lambda k=k: later(k)) for k, t in tensors.items()}
    save_safetensors_atomically(path, {**lazy, "b": tensors["b"]}, {"format": "test/1"}, progress="writing")
    assert path.read_bytes() == save(tensors, metadata={"format": "test/1"})
    assert sorted(made) == ["a.weight", "c", "d"]  # each made once, when written
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"format": "test/1"}
        assert all(torch.equal(f.get_tensor(k), v) for k, v in tensors.items())


@pytest.mark.parametrize("n", [2, 3, 9])
def test_writers_of_shares_write_the_same_file(tmp_path, n):
    """Several writers (here one after another, in a scrambled order) each write and hash
    their byte share of one file: the same bytes, and shares that tile it."""
    tensors = {f"layer{i}": torch.randn(i + 1, 3) for i in range(5)} | {"emb": torch.randn(40, 3)}
    file = SafetensorsFile(tensors, {"format": "test/1"})
    path = tmp_path / "state.safetensors"
    file.create(path)
    parts = {i: file.write_share(path, i, n) for i in reversed(range(n))}
    expected = save(tensors, metadata={"format": "test/1"})
    assert path.read_bytes() == expected
    shares = file.shares(n)
    assert shares[0][0] == 0 and shares[-1][1] == len(expected)
    assert all(a[1] == b[0] for a, b in zip(shares[:-1], shares[1:], strict=True))
    assert sum(hi > lo for lo, hi in shares) >= 2  # the work is split
    for i, (lo, hi) in enumerate(shares):
        assert parts[i] == {"bytes": hi - lo, "sha256": file_sha256(path, lo, hi - lo)}
    assert file_sha256(path, 0, len(expected)) == file_sha256(path)


def test_a_failed_write_leaves_the_old_file(tmp_path):
    path = tmp_path / "state.safetensors"
    first = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3)}
    save_safetensors_atomically(path, first, {"format": "test/1"})
    before = path.read_bytes()

    def broken():
        raise RuntimeError("the checkpoint is unreadable")

    with pytest.raises(RuntimeError, match="unreadable"):  # a tensor that cannot be made, half-way through
        save_safetensors_atomically(
            path, {"a": torch.ones(3), "z": Deferred((2,), torch.float32, broken)}, {"format": "test/1"}
        )
    with pytest.raises(ValueError, match="z: made as \\[3\\]"):  # one made other than declared
        save_safetensors_atomically(
            path,
            {"a": torch.ones(3), "z": Deferred((2,), torch.float32, lambda: torch.ones(3))},
            {"format": "test/1"},
        )
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == [path.name]
