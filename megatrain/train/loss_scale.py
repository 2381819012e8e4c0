"""fp16's dynamic loss scale, wherever DeepSpeed keeps it.

DeepSpeed holds it in two forms: ZeRO 1-3's optimizers have a `loss_scaler` (a
DynamicLossScaler with hysteresis under fp16, a static LossScaler otherwise) and a
`cur_scale` property; ZeRO-0's fp16 optimizers (FP16_Optimizer, FP16_UnfusedOptimizer, with
or without a pipeline) keep a `loss_scale_config` and have no `cur_scale`. The state is the
same on every rank (the ranks agree on an overflow before the scale moves), so a checkpoint
stores it once and a resume on another layout carries it over instead of starting again
from the initial scale and skipping steps to find it; a rollback point keeps it likewise.
"""

from __future__ import annotations

_STATE = ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis")  # the parts that move


def _holder(optimizer):
    """The object that holds the optimizer's loss scale, or None."""
    for name in ("loss_scaler", "loss_scale_config"):
        found = getattr(optimizer, name, None)
        if found is not None:
            return found
    return None


def current(optimizer) -> float:
    """The scale the last step used (nan without one)."""
    found = _holder(optimizer)
    return float(found.cur_scale) if found is not None else float("nan")


def _dynamic(found) -> bool:
    return bool(getattr(found, "dynamic", False) or getattr(found, "dynamic_loss_scale", False))


def state(optimizer) -> dict | None:
    """The dynamic scale's state as plain numbers (for megatrain.json), or None without one."""
    found = _holder(optimizer)
    if found is None or not _dynamic(found):
        return None
    return {k: getattr(found, k) for k in _STATE if hasattr(found, k)}


def load_state(optimizer, saved: dict | None) -> bool:
    """Set the dynamic scale from `state()`'s output, of either form (a field this form lacks
    is ignored, one the other lacked keeps its value); False, changing nothing, when nothing
    was saved or this optimizer has no dynamic scale (fp16 resumed as bf16)."""
    found = _holder(optimizer)
    if not saved or found is None or not _dynamic(found):
        return False
    for k, v in saved.items():
        if hasattr(found, k):
            setattr(found, k, v)
    return True
