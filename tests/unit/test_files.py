"""Atomic writes: a reader sees the old file or the new one, never a part."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from megatrain.files import save_safetensors_atomically


def test_safetensors_are_written_whole_or_not_at_all(tmp_path):
    path = tmp_path / "state.safetensors"
    first = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(4)}
    save_safetensors_atomically(path, first, {"format": "test/1"})
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"format": "test/1"}
        assert all(torch.equal(f.get_tensor(k), v) for k, v in first.items())
    before = path.read_bytes()
    with pytest.raises(ValueError):  # safetensors refuses a non-contiguous tensor
        save_safetensors_atomically(path, {"a": torch.ones(3), "t": torch.zeros(2, 3).t()}, {"format": "test/1"})
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == [path.name]
