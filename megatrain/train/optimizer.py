"""Building the optimizer for DeepSpeed, and wiring FusedAdamWClip into its wrappers.
optim.name: fused_adamw (megatrain's FusedAdamWClip, csrc/), torch_adamw (torch's AdamW,
fused), adamw (DeepSpeed's FusedAdam); who computes the norm and who clips is the
GradNormPolicy (megatrain/optim/grad_norm.py).

What DeepSpeed does with a client optimizer decides the wiring of fused_adamw:
  ZeRO-0       fp32: DeepSpeed calls our step() on the model's parameters, whose gradients
               every rank holds whole; bf16: its FP16_UnfusedOptimizer hands us fp32 master
               copies with whole gradients. The norm needs no collective, except across the
               stages of a pipeline and the ranks of a tensor-parallel group.
  ZeRO-1/2     DeepSpeedZeroOptimizer flattens each parameter group into one fp32 partition
               per rank and steps the groups one at a time, each gradient made just before
               its step. So DeepSpeed gets a single group, and set_segments() maps the
               partition back to parameters (weight decay by role) through each parameter's
               `_hp_mapping`; the squared norm is all-reduced over every rank (one scalar:
               data-parallel shards, and pipeline stages); DeepSpeed's own norm is off
               (zero_optimization.compute_grad_norm).
  pipelines    the later stage's copy of the tied embeddings (ds_pipe_replicated) is left
               out of the norm, as DeepSpeed's own clipping does.
  tensor       AutoTP's shards (`tensor_model_parallel`) are distinct on every rank of a
  parallel     group; the parameters it leaves whole count on the group's first rank only;
               under ZeRO-0 the squared norm is all-reduced over the group.
  ZeRO-3       DeepSpeed steps parameter sub-groups separately, so no call sees every
               gradient: DeepSpeed computes the norm and clips, and FusedAdamWClip only updates.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from megatrain.layout import Layout
from megatrain.optim import FusedAdamWClip, param_groups
from megatrain.optim.grad_norm import GradNormPolicy
from megatrain.train import ds_internals as wall

DS_OPTIMIZER = {"adamw"}  # names DeepSpeed builds itself from its JSON config
# The learning rate every optimizer is built with; the trainer sets the schedule's before each
# step. DeepSpeed's ZeRO-0 fp16/bf16 wrappers (FP16_UnfusedOptimizer, FP16_Optimizer) step the
# optimizer once at construction with zero gradients, to create its state: at lr 0 that step
# moves no weight (decoupled weight decay included), and the train module then drops the
# state it made, so the first real update counts as step 1.
CONSTRUCTION_LR = 0.0


def build_optimizer(optim, model: nn.Module, norm: GradNormPolicy):
    """(parameter groups for DeepSpeed, client optimizer or None), from cfg.optim."""
    groups = param_groups(model, optim.weight_decay)
    if optim.name in DS_OPTIMIZER:
        return groups, None
    hyper = dict(lr=CONSTRUCTION_LR, betas=tuple(optim.betas), eps=optim.eps)
    if optim.name == "torch_adamw":
        return groups, torch.optim.AdamW(groups, **hyper, fused=True)
    if norm.single_group:
        groups = [{"params": [p for g in groups for p in g["params"]], "weight_decay": 0.0}]
    max_norm = optim.grad_clip if norm.kernel_clips else 0.0  # ZeRO-3: DeepSpeed clips
    return groups, FusedAdamWClip(groups, **hyper, weight_decay=optim.weight_decay, max_grad_norm=max_norm)


def attach(
    optimizer, model: nn.Module, weight_decay: float, layout: Layout, norm: GradNormPolicy, engine
) -> None:
    """After deepspeed.initialize: tell FusedAdamWClip how its tensors relate to the model,
    and which ranks to all-reduce the squared norm over."""
    if not norm.kernel_clips:
        return
    # Gradients another rank also holds count once: the later pipeline stage's copy of the
    # tied embeddings, and under tensor parallelism every parameter AutoTP left whole
    # (LayerNorms, row-parallel biases, embeddings) except on the group's first rank.
    replicated = {
        id(p)
        for p in model.parameters()
        if getattr(p, "ds_pipe_replicated", False) or (layout.tp_rank > 0 and not is_tensor_parallel(p))
    }
    mapped = {id(p): (p, place) for p in model.parameters() if (place := wall.fragment(p)) is not None}
    if mapped:  # DeepSpeed hands us flat fp32 partitions: every rank holds a distinct shard
        decayed = {id(p) for g in param_groups(model, 1.0) if g["weight_decay"] > 0 for p in g["params"]}
        by_group: dict[int, list] = {}
        for p, (group, start, numel) in mapped.values():
            wd = weight_decay if id(p) in decayed else 0.0
            by_group.setdefault(group, []).append((start, numel, wd, id(p) not in replicated))
        for index, segments in by_group.items():
            optimizer.set_segments(optimizer.param_groups[index]["params"][0], segments)
        optimizer.norm_group = torch.distributed.group.WORLD if layout.world > 1 else None
    else:  # whole gradients: the ranks of one pipeline, or of one tensor-parallel group, hold distinct ones
        masters = wall.master_copies(engine.optimizer)
        optimizer.exclude_from_norm(masters.get(id(p), p) for p in model.parameters() if id(p) in replicated)
        if layout.pipeline:  # the pipeline's stages and tensor ranks: one data-parallel replica
            optimizer.norm_group = engine.grid.get_model_parallel_group()
        elif layout.tensor_parallel > 1:
            optimizer.norm_group = wall.tensor_parallel_group()
        else:
            optimizer.norm_group = None


def is_tensor_parallel(p: torch.Tensor) -> bool:
    """AutoTP split this parameter over the tensor-parallel group (each rank a distinct shard)."""
    return bool(getattr(p, "tensor_model_parallel", False))
