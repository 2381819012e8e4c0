"""In-memory rollback points: cheap, frequent copies of everything a step changes.

A point holds a host-memory copy of every tensor that is training state (the model's
parameters; the optimizer's parameters, which under DeepSpeed are its fp32 masters or
flat ZeRO partitions; the optimizer's moments and step counts), the engine's counters,
and megatrain's own state (step, tokens, sampler, spike guard, RNG). Restoring copies
the tensors back in place, so the run continues exactly as it would have from that
step. Each rank keeps its own shard. Cost: one copy of this rank's parameters and
optimizer state per point (about 16 bytes per fp32 parameter with AdamW).

ZeRO-3 keeps parameters in DeepSpeed-private partitions: there, and with
spike.snapshots = 0, rollbacks go to disk checkpoints instead.
"""

from __future__ import annotations

import copy
from collections import deque
from dataclasses import dataclass, field

import torch


def base_optimizer(engine, client_optimizer):
    """The optimizer that owns the moments: ours, or the one inside DeepSpeed's wrapper."""
    return client_optimizer if client_optimizer is not None else getattr(engine.optimizer, "optimizer", engine.optimizer)


def state_tensors(engine, optimizer) -> dict[str, torch.Tensor]:
    """Every tensor that is training state, by a key that stays the same within a process."""
    found: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, tuple]] = set()

    def add(key: str, t: torch.Tensor) -> None:
        ident = (t.data_ptr(), tuple(t.shape))
        if t.numel() and ident not in seen:
            seen.add(ident)
            found[key] = t

    for i, p in enumerate(engine.module.parameters()):
        add(f"module.{i}", p.data)
    for gi, group in enumerate(optimizer.param_groups):
        for pi, p in enumerate(group["params"]):
            add(f"opt.param.{gi}.{pi}", p.data)
            for name, value in optimizer.state.get(p, {}).items():
                if torch.is_tensor(value):
                    add(f"opt.state.{gi}.{pi}.{name}", value)
    return found


_ENGINE_COUNTERS = ("global_steps", "global_samples", "skipped_steps")


@dataclass
class RollbackPoint:
    step: int
    trainer_state: dict  # sampler, spike guard, data skips: whatever the trainer needs back
    rng: dict
    tensors: dict[str, torch.Tensor] = field(repr=False)
    engine_counters: dict = field(default_factory=dict)
    loss_scaler: dict | None = None


def capture(engine, optimizer, step: int, trainer_state: dict, rng: dict) -> RollbackPoint:
    tensors = {k: t.detach().to("cpu", copy=True) for k, t in state_tensors(engine, optimizer).items()}
    scaler = getattr(engine.optimizer, "loss_scaler", None)
    return RollbackPoint(step=step, trainer_state=copy.deepcopy(trainer_state), rng=copy.deepcopy(rng),
                         tensors=tensors, engine_counters={k: getattr(engine, k) for k in _ENGINE_COUNTERS},
                         loss_scaler=copy.deepcopy(vars(scaler)) if scaler is not None else None)


def restore(engine, optimizer, point: RollbackPoint) -> None:
    """Copy a point back in place. Optimizer state created after the point (the moments
    appear at the first step) is zeroed: the same as a fresh optimizer at that point."""
    with torch.no_grad():
        for key, t in state_tensors(engine, optimizer).items():
            saved = point.tensors.get(key)
            if saved is not None:
                t.copy_(saved)
            elif key.startswith("opt.state."):
                t.zero_()
            else:
                raise RuntimeError(f"rollback point has no copy of {key}: the model changed since it was taken")
    for name, value in point.engine_counters.items():
        setattr(engine, name, value)
    scaler = getattr(engine.optimizer, "loss_scaler", None)
    if scaler is not None and point.loss_scaler is not None:
        vars(scaler).update(copy.deepcopy(point.loss_scaler))


class RollbackPoints:
    """The last `keep` points, one every `every` steps."""

    def __init__(self, every: int, keep: int):
        self.every, self.keep = every, keep
        self.points: deque[RollbackPoint] = deque(maxlen=max(keep, 1))

    def due(self, step: int) -> bool:
        return self.keep > 0 and step % self.every == 0 and not (self.points and self.points[-1].step == step)

    def add(self, point: RollbackPoint) -> None:
        self.points.append(point)

    def before(self, step: int) -> RollbackPoint | None:
        """The newest point taken before `step` (the state after a step < `step`)."""
        return next((p for p in reversed(self.points) if p.step < step), None)

    def drop_after(self, step: int) -> None:
        """Forget points of an abandoned timeline (after a rollback to `step`)."""
        while self.points and self.points[-1].step > step:
            self.points.pop()
