"""How GPT is split over a tensor-parallel group: megatrain's own partition specs for
DeepSpeed's AutoTP, and the same split for checkpoints (gathering shards into whole
parameters, cutting whole parameters into a rank's shard).

Megatron's layout (Shoeybi et al. 2019): in each block the fused q|k|v projection and the
MLP's first layer are split by output columns (each rank keeps whole attention heads and
a slice of the MLP's hidden units, biases split with them), attention's output
projection and the MLP's second layer by input rows (their biases and the LayerNorms stay
whole on every rank: replicated; QK-norm's scales too, their
gradients summed over the group). q|k|v is three sub-parameters: rank
r keeps part r of q, of k and of v, so its heads stay whole; with grouped-query attention
k and v are narrower than q (whole key/value heads per rank: n_kv_head must divide by the
size). SwiGLU's packed gate|up is two sub-parameters the same way. The token embedding
(tied to the output) and an untied output head are split by vocabulary rows, by megatrain
(cut_vocabulary, model/vocab_parallel.py: the full-vocabulary logits are never gathered).
"""

from __future__ import annotations

import re

import torch

from megatrain.model.gpt import GPT, GPTConfig, Positions


def specs(cfg: GPTConfig) -> list[tuple[str, str, tuple[int, ...] | None]]:
    """(pattern of a weight's name, AutoTP partition type, sub-parameter sizes along the
    split dimension or None for one) for each split weight of `cfg`'s model."""
    q, kv = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim
    return [
        (r".*\.attn\.qkv\.weight$", "column", (q, kv, kv)),
        (r".*\.attn\.proj\.weight$", "row", None),
        (r".*\.mlp\.fc\.weight$", "column", (cfg.ffn_hidden, cfg.ffn_hidden) if cfg.gated else None),
        (r".*\.mlp\.proj\.weight$", "row", None),
    ]


def summed_gradients(cfg: GPTConfig, sequence_parallel: bool = False) -> list[str]:
    """Patterns of parameters every rank keeps whole but applies to its own heads alone:
    QK-norm's scales (one per head dimension, shared by all heads). Each rank's gradient is
    the sum over its heads only, so the group sums them (AutoTP's grad_allreduce hook, as
    Hugging Face's replicated_with_grad_allreduce) and the copies stay equal. With sequence
    parallelism every whole parameter's gradient is summed, by megatrain
    (sequence_parallel.sum_gradients): none here."""
    return [r".*\.attn\.[qk]_norm\.weight$"] if cfg.qk_norm and not sequence_parallel else []


def autotp_config(size: int, cfg: GPTConfig, sequence_parallel: bool = False) -> dict:
    """DeepSpeed's `tensor_parallel` section for `size` ranks."""
    out = []
    for pattern, kind, sizes in specs(cfg):
        spec = {"patterns": [pattern], "partition_type": kind}
        if sizes:  # equal sub-parameters as a count, unequal ones (grouped-query q|k|v) by size
            spec.update(shape=[len(sizes) if len(set(sizes)) == 1 else list(sizes), -1], partition_dim=0)
        out.append(spec)
    out += [
        {"patterns": [p], "partition_type": "skip", "grad_allreduce": True}
        for p in summed_gradients(cfg, sequence_parallel)
    ]
    return {"autotp_size": size, "partition_config": {"use_default_specs": False, "layer_specs": out}}


# Split by vocabulary rows, by megatrain itself rather than AutoTP (model/vocab_parallel.py):
# the token embedding (tied to the output) and an untied output head.
VOCAB_ROWS = (r"embed\.wte\.weight", r"head\.lm_head\.weight")


def is_vocabulary_table(name: str) -> bool:
    return any(re.fullmatch(pattern, name) for pattern in VOCAB_ROWS)


def split_of(name: str, cfg: GPTConfig) -> tuple[int, tuple[int, ...] | None] | None:
    """(dimension, sub-parameter sizes or None) along which parameter `name` is split, or
    None if every rank keeps it whole."""
    if is_vocabulary_table(name):
        return 0, None
    for pattern, kind, sizes in specs(cfg):
        weight = re.fullmatch(pattern, name)
        bias = name.endswith(".bias") and re.fullmatch(pattern, name.removesuffix(".bias") + ".weight")
        if weight or (bias and kind == "column"):
            return (0 if kind == "column" else 1), sizes
    return None


def shard_ranges(
    name: str, shape, rank: int, size: int, cfg: GPTConfig
) -> tuple[int, list[tuple[int, int]]] | None:
    """(dimension, [(start, stop), ...]): the slices of whole parameter `name` (of `shape`)
    that rank `rank`'s shard is made of, one per sub-parameter, in order; None when every
    rank keeps it whole. A reader can take just these (layout_free.load_into)."""
    split = split_of(name, cfg)
    if split is None or size == 1:
        return None
    dim, sizes = split
    ranges, offset = [], 0
    for n in sizes or (shape[dim],):
        part = n // size
        ranges.append((offset + rank * part, offset + (rank + 1) * part))
        offset += n
    return dim, ranges


def cut_vocabulary(model: torch.nn.Module, rows) -> None:
    """The (meta) model's vocabulary tables cut to this rank's rows (a VocabParallel), marked
    as split like AutoTP's shards, and the model told which rows it holds: the plain GPT, or
    a pipeline stage (its VocabularyTable and OutputHead layers, where it has them)."""
    from megatrain.model.pipeline import OutputHead, VocabularyTable

    if isinstance(model, GPT):
        tables = [model.embed.wte] + ([model.head.lm_head] if model.head.lm_head is not None else [])
        holders = [model.embed]
    else:
        tables = holders = [m for m in model.modules() if isinstance(m, (VocabularyTable, OutputHead))]
    for table in tables:
        whole = table.weight
        part = torch.nn.Parameter(whole.new_empty(rows.stop - rows.start, whole.shape[1]))
        vars(part).update(vars(whole))  # DeepSpeed's marks (ds_pipe_replicated on a later stage's tied copy)
        part.tensor_model_parallel = True  # as AutoTP marks its shards: counted once per rank in norms
        table.weight = part
    for holder in holders:
        holder.vocab_parallel = rows
    model.loss_fn.vocab_parallel = rows
    for positions in (m for m in model.modules() if isinstance(m, Positions)):
        positions.sequence_slice = rows


def shard(name: str, full: torch.Tensor, rank: int, size: int, cfg: GPTConfig) -> torch.Tensor:
    """Rank `rank`'s part of whole parameter `name` (the tensor itself when replicated)."""
    cut = shard_ranges(name, full.shape, rank, size, cfg)
    if cut is None:
        return full
    dim, ranges = cut
    return torch.cat([full.narrow(dim, a, b - a) for a, b in ranges], dim)


def gather(name: str, shards: list[torch.Tensor], cfg: GPTConfig) -> torch.Tensor:
    """Whole parameter `name` from every rank's part, in rank order (shard's inverse)."""
    split = split_of(name, cfg)
    if split is None or len(shards) == 1:
        return shards[0]
    if is_vocabulary_table(name) and shards[0].shape[0] == cfg.vocab_size:
        return shards[0]  # a vocabulary table every rank kept whole (checkpoints before it was split)
    dim, sizes = split
    local = [n // len(shards) for n in sizes] if sizes else [shards[0].shape[dim]]
    pieces = [s.split(local, dim) for s in shards]
    return torch.cat([torch.cat([p[i] for p in pieces], dim) for i in range(len(local))], dim)
