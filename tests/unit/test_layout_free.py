"""Loading the layout-free form: each rank reads only what it keeps (tensor-parallel shards,
flat ranges for ZeRO 1-3's fragments and partitions), never the whole parameter for it."""

from __future__ import annotations

import types

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from megatrain.layout import Layout
from megatrain.model import GPTConfig
from megatrain.model import tensor_parallel as tp
from megatrain.train.layout_free import _Parts

CFG = GPTConfig(vocab_size=64, seq_len=8, n_layer=1, n_head=4, d_model=16, arch="llama", n_kv_head=2)


class Counting:
    """A safetensors handle that counts the elements each read returns."""

    def __init__(self, f):
        self.f, self.read = f, 0

    def get_tensor(self, key):
        t = self.f.get_tensor(key)
        self.read += t.numel()
        return t

    def get_slice(self, key):
        sliced, outer = self.f.get_slice(key), self

        class Slice:
            def get_shape(self):
                return sliced.get_shape()

            def __getitem__(self, index):
                t = sliced[index]
                outer.read += t.numel()
                return t

        return Slice()


def test_parts_read_only_the_slices_a_rank_keeps(tmp_path):
    torch.manual_seed(0)
    tensors = {
        "exp_avg/blocks.0.attn.qkv.weight": torch.randn(32, 16),  # q|k|v: 16 + 8 + 8 rows
        "exp_avg/blocks.0.attn.proj.weight": torch.randn(16, 16),  # split by columns
        "exp_avg/head.ln_f.weight": torch.randn(16),
    }
    save_file(tensors, tmp_path / "f.safetensors")
    with safe_open(str(tmp_path / "f.safetensors"), "pt") as f:
        for rank in (0, 1):
            counting = Counting(f)
            parts = _Parts(
                counting, types.SimpleNamespace(layout=Layout(1, 2, 1, 1, rank=rank), model_cfg=CFG)
            )
            for key, whole in tensors.items():
                name = key.partition("/")[2]
                before = counting.read
                got = parts.shard("exp_avg", name)
                assert torch.equal(got, tp.shard(name, whole, rank, 2, CFG))
                split = tp.split_of(name, CFG) is not None
                assert counting.read - before == whole.numel() // (2 if split else 1)  # the shard alone
        counting = Counting(f)
        parts = _Parts(counting, types.SimpleNamespace(layout=Layout(1, 1, 1, 1), model_cfg=CFG))
        whole = tensors["exp_avg/blocks.0.attn.qkv.weight"]
        for start, n in [(0, 5), (37, 100), (500, 12), (511, 1), (0, 512)]:
            before = counting.read
            assert torch.equal(
                parts.flat("exp_avg", "blocks.0.attn.qkv.weight", start, n),
                whole.reshape(-1)[start : start + n],
            )
            assert counting.read - before <= n + 2 * 16  # the rows the range lies in
        assert torch.equal(
            parts.flat("exp_avg", "head.ln_f.weight", 3, 9), tensors["exp_avg/head.ln_f.weight"][3:12]
        )
