"""A run config translated into DeepSpeed's JSON config."""

from __future__ import annotations

import copy

from megatrain.config.schema import Config, TrainConfig


def deep_merge(base: dict, top: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in top.items():
        out[k] = (
            deep_merge(out[k], v)
            if isinstance(v, dict) and isinstance(out.get(k), dict)
            else copy.deepcopy(v)
        )
    return out


def fp32_accumulation(train: TrainConfig, zero_stage: int) -> bool:
    """bf16 gradients summed over micro-batches and reduced in fp32: train.grad_accum_dtype,
    where DeepSpeed has the path (ZeRO 1-2; without ZeRO it refuses the mix)."""
    return train.precision == "bf16" and train.grad_accum_dtype == "fp32" and zero_stage in (1, 2)


def bf16_optimizer(train: TrainConfig, zero_stage: int) -> bool:
    """DeepSpeed wraps the optimizer in its BF16_Optimizer (whole fp32 gradient buffers,
    ZeRO-1 partitions of the masters) rather than its ZeRO optimizer: ZeRO-1 with fp32
    accumulation."""
    return fp32_accumulation(train, zero_stage) and zero_stage == 1


def deepspeed_config(cfg: Config, layout, grad_accum: int, norm) -> dict:
    """DeepSpeed's JSON config for this run on `layout` (megatrain.layout.Layout), with `norm`
    (optim.grad_norm.GradNormPolicy) saying who clips. The learning rate is set by the
    trainer every step (no DeepSpeed scheduler)."""
    t, o = cfg.train, cfg.optim
    ds: dict = {
        "train_micro_batch_size_per_gpu": t.micro_batch,
        "gradient_accumulation_steps": grad_accum,
        # DeepSpeed checks this against the whole world when its config is read, before it
        # knows the tensor-parallel groups; the engine then divides by the data-parallel size.
        # A pipeline's engine checks it against its grid's data-parallel size.
        "train_batch_size": t.micro_batch
        * grad_accum
        * layout.data_parallel
        * (1 if layout.pipeline else layout.tensor_parallel),
        "zero_optimization": {"stage": layout.zero_stage},
        "bf16": {"enabled": t.precision == "bf16"},
        "fp16": {"enabled": t.precision == "fp16"},
        "steps_per_print": 2**31 - 1,  # the trainer logs
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
    }
    if layout.pipeline and layout.sequence_parallel:
        # The tensor ranks of a stage hold different slices of the sequence: each sends its own
        # (DeepSpeed would otherwise send 1/T of one tensor it takes to be the same on all).
        ds["pipeline"] = {"pipe_partitioned": False, "grad_partitioned": False}
    if fp32_accumulation(t, layout.zero_stage):  # else DeepSpeed sums and reduces bf16 gradients in bf16
        ds["data_types"] = {"grad_accum_dtype": "fp32"}
        ds["communication_data_type"] = "fp32"
    ds["gradient_clipping"] = norm.deepspeed_clip
    if not norm.deepspeed_norm:
        ds["zero_optimization"]["compute_grad_norm"] = False
    if o.name == "adamw":  # DeepSpeed builds its own optimizer; otherwise the trainer passes one
        # lr 0 until the trainer sets it before the first step (train/optimizer.py: CONSTRUCTION_LR).
        ds["optimizer"] = {
            "type": "AdamW",
            "params": {"lr": 0.0, "betas": list(o.betas), "eps": o.eps, "weight_decay": o.weight_decay},
        }
    if t.precision == "bf16-autocast":
        ds["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    if t.precision == "fp16":
        # Dynamic loss scaling: start at 2^16, halve on overflow, double after 1000 clean steps.
        ds["fp16"].update(
            {
                "loss_scale": 0,
                "initial_scale_power": 16,
                "loss_scale_window": 1000,
                "hysteresis": 2,
                "min_loss_scale": 1,
            }
        )
    return deep_merge(ds, cfg.deepspeed)
