"""Optimizers and parameter groups."""

from megatrain.optim.param_groups import build_optimizer, param_groups

__all__ = ["build_optimizer", "param_groups"]
