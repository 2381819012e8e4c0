"""Who computes the global gradient norm, who clips, and what DeepSpeed is told: decided once
(GradNormPolicy.decide) from the optimizer, the precision and the layout; read by the
DeepSpeed config, the optimizer's build and wiring (train/optimizer.py) and the train module.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatrain.config.deepspeed import bf16_optimizer


@dataclass(frozen=True)
class GradNormPolicy:
    kernel_clips: bool
    """FusedAdamWClip computes the norm and clips in its kernel (optim.name: fused_adamw), but
    not under ZeRO-3, where DeepSpeed steps sub-groups separately: no call sees every gradient."""
    source: str
    """The logged pre-clip norm's source: "kernel"; "measured" by the train module (ZeRO-0,
    fp32 weights, no pipeline: DeepSpeed reports none); "deepspeed"."""
    deepspeed_clip: float
    """DeepSpeed's `gradient_clipping`: 0 when the kernel clips, else optim.grad_clip."""
    deepspeed_norm: bool
    """DeepSpeed's own norm pass under ZeRO 1-2 (`compute_grad_norm`): off when the kernel
    computes one, except in DeepSpeed's BF16_Optimizer, which always runs it."""
    single_group: bool
    """DeepSpeed gets one parameter group (ZeRO 1-2, the kernel clipping): FusedAdamWClip's
    segments map the flat partition back to parameters."""

    @classmethod
    def decide(cls, optim, train, layout) -> GradNormPolicy:
        """From cfg.optim, cfg.train and the Layout."""
        kernel = optim.name == "fused_adamw" and not layout.partitioned_parameters
        whole_fp32 = (
            layout.zero_stage == 0 and train.precision in ("fp32", "bf16-autocast") and not layout.pipeline
        )
        return cls(
            kernel_clips=kernel,
            source="kernel" if kernel else "measured" if whole_fp32 else "deepspeed",
            deepspeed_clip=0.0 if kernel else optim.grad_clip,
            deepspeed_norm=not (kernel and layout.flat_partitions)
            or bf16_optimizer(train, layout.zero_stage),
            single_group=kernel and layout.flat_partitions,
        )
