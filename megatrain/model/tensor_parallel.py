"""How GPT is split over a tensor-parallel group: megatrain's own partition specs for
DeepSpeed's AutoTP, and the same split for checkpoints (gathering shards into whole
parameters, cutting whole parameters into a rank's shard).

Megatron's layout (Shoeybi et al. 2019): in each block the fused q|k|v projection and the
MLP's first layer are split by output columns (each rank keeps whole attention heads and
a slice of the MLP's hidden units, biases split with them), attention's output
projection and the MLP's second layer by input rows (their biases, the LayerNorms and the
tied embedding stay whole on every rank: replicated). q|k|v is three sub-parameters: rank
r keeps rows r of q, of k and of v, so its heads stay whole.
"""

from __future__ import annotations

import re

import torch

# (pattern of a weight's name, AutoTP partition type, sub-parameter shape)
SPECS = (
    (r".*\.attn\.qkv\.weight$", "column", [3, -1]),
    (r".*\.attn\.proj\.weight$", "row", None),
    (r".*\.mlp\.fc\.weight$", "column", None),
    (r".*\.mlp\.proj\.weight$", "row", None),
)


def autotp_config(size: int) -> dict:
    """DeepSpeed's `tensor_parallel` section for `size` ranks."""
    specs = [{"patterns": [pattern], "partition_type": kind, **({"shape": shape, "partition_dim": 0} if shape else {})}
             for pattern, kind, shape in SPECS]
    return {"autotp_size": size, "partition_config": {"use_default_specs": False, "layer_specs": specs}}


def split_of(name: str) -> tuple[int, int] | None:
    """(dimension, sub-parameters) along which parameter `name` is split, or None if every
    rank keeps it whole."""
    for pattern, kind, shape in SPECS:
        weight = re.fullmatch(pattern, name)
        bias = name.endswith(".bias") and re.fullmatch(pattern, name.removesuffix(".bias") + ".weight")
        if weight or (bias and kind == "column"):
            return (0 if kind == "column" else 1), (shape[0] if shape else 1)
    return None


def shard(name: str, full: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    """Rank `rank`'s part of whole parameter `name` (the tensor itself when replicated)."""
    split = split_of(name)
    if split is None or size == 1:
        return full
    dim, parts = split
    return torch.cat([sub.chunk(size, dim)[rank] for sub in full.chunk(parts, dim)], dim)


def gather(name: str, shards: list[torch.Tensor]) -> torch.Tensor:
    """Whole parameter `name` from every rank's part, in rank order (shard's inverse)."""
    split = split_of(name)
    if split is None or len(shards) == 1:
        return shards[0]
    dim, parts = split
    pieces = [s.chunk(parts, dim) for s in shards]
    return torch.cat([torch.cat([p[i] for p in pieces], dim) for i in range(parts)], dim)
