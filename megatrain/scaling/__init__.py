"""Predictable scaling: cooldown branches of warmup-stable-decay runs (docs/scaling.md)."""

from megatrain.scaling.cooldown import branch_overrides, branch_point

__all__ = ["branch_overrides", "branch_point"]
