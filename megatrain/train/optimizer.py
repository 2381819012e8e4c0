"""Building the optimizer for DeepSpeed, and wiring FusedAdamWClip into its wrappers.

optim.name:
  fused_adamw  megatrain's FusedAdamWClip: the global norm, the clipping and the update in
               two passes (csrc/). DeepSpeed's own clipping is off.
  torch_adamw  torch.optim.AdamW; DeepSpeed clips.
  adamw        DeepSpeed's stock FusedAdam; DeepSpeed clips.

What DeepSpeed does with a client optimizer decides the wiring of fused_adamw:
  ZeRO-0       fp32: DeepSpeed calls our step() on the model's parameters, whose gradients
               every rank holds whole; bf16: its FP16_UnfusedOptimizer hands us fp32 master
               copies with whole gradients. The norm needs no collective.
  ZeRO-1/2     DeepSpeedZeroOptimizer flattens each parameter group into one fp32 partition
               per rank and steps the groups one at a time, each gradient made just before
               its step. So DeepSpeed gets a single group, and set_segments() maps the
               partition back to parameters (weight decay by role) through each parameter's
               `_hp_mapping`; the squared norm is all-reduced over the data-parallel ranks
               (one scalar); DeepSpeed's own norm is off (zero_optimization.compute_grad_norm).
  ZeRO-3       DeepSpeed steps parameter sub-groups separately, so no call sees every
               gradient: DeepSpeed computes the norm and clips, and FusedAdamWClip only updates.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from megatrain.config import Config, optimizer_clips
from megatrain.optim import FusedAdamWClip, param_groups

DS_OPTIMIZER = {"adamw"}  # names DeepSpeed builds itself from its JSON config


def uses_single_group(cfg: Config) -> bool:
    return optimizer_clips(cfg) and cfg.parallel.zero_stage in (1, 2)


def build_optimizer(cfg: Config, model: nn.Module):
    """(parameter groups for DeepSpeed, client optimizer or None)."""
    o = cfg.optim
    groups = param_groups(model, o.weight_decay)
    if o.name in DS_OPTIMIZER:
        return groups, None
    if o.name == "torch_adamw":
        return groups, torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, foreach=True)
    if uses_single_group(cfg):
        groups = [{"params": [p for g in groups for p in g["params"]], "weight_decay": 0.0}]
    max_norm = o.grad_clip if optimizer_clips(cfg) else 0.0  # ZeRO-3: DeepSpeed clips
    return groups, FusedAdamWClip(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay,
                                  max_grad_norm=max_norm)


def attach(optimizer, model: nn.Module, cfg: Config, dp_group) -> None:
    """After deepspeed.initialize: tell FusedAdamWClip how its tensors relate to the model."""
    if not isinstance(optimizer, FusedAdamWClip) or not uses_single_group(cfg):
        return
    flat = optimizer.param_groups[0]["params"][0]
    decayed = {id(p) for g in param_groups(model, 1.0) if g["weight_decay"] > 0 for p in g["params"]}
    segments = []
    for p in model.parameters():
        fragment = getattr(p, "_hp_mapping", None)
        if fragment is None:  # no part of this parameter lives in this rank's partition
            continue
        address = fragment.get_hp_fragment_address()
        segments.append((address.start, address.numel, cfg.optim.weight_decay if id(p) in decayed else 0.0, True))
    if not segments and flat.numel():
        raise RuntimeError("DeepSpeed did not map any parameter to this rank's partition (_hp_mapping missing)")
    optimizer.set_segments(flat, segments)
    optimizer.norm_group = dp_group
