"""Optimizers and parameter groups."""

from megatrain.optim.fused_adamw import FusedAdamWClip, fused_op_available
from megatrain.optim.param_groups import param_groups

__all__ = ["FusedAdamWClip", "fused_op_available", "param_groups"]
