"""Resumable state: one registry of everything besides DeepSpeed's engine that a resume
or a rollback puts back. Disk checkpoints and in-memory rollback points both save and
restore through it, so a piece of state registered once is saved, rolled back and
resumed (docs/trainer.md)."""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch


class Stateful(Protocol):
    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class ResumableState:
    def __init__(self):
        self._shared: dict[str, Stateful] = {}
        self._per_rank: dict[str, Stateful] = {}

    def register(self, name: str, obj: Stateful, per_rank: bool = False) -> None:
        """`obj` joins every checkpoint and rollback point under `name`. Shared state is the
        same on every rank (rank 0 writes it, as JSON); per-rank state is each rank's own."""
        if name in self._shared or name in self._per_rank:
            raise ValueError(f"state {name!r} is registered twice")
        (self._per_rank if per_rank else self._shared)[name] = obj

    def state_dict(self) -> dict:
        """{"shared": {name: state}, "rank": {name: state}}, copied: later changes do not reach it."""
        return copy.deepcopy(
            {
                "shared": {k: v.state_dict() for k, v in self._shared.items()},
                "rank": {k: v.state_dict() for k, v in self._per_rank.items()},
            }
        )

    def load_state_dict(self, state: dict) -> None:
        for part, objs in (("shared", self._shared), ("rank", self._per_rank)):
            for name, obj in objs.items():
                if name in state[part]:
                    obj.load_state_dict(copy.deepcopy(state[part][name]))


@dataclass
class Progress:
    """Optimizer steps taken and tokens consumed: the schedules follow from the tokens."""

    step: int = 0
    tokens: int = 0

    def state_dict(self) -> dict:
        return {"step": self.step, "tokens": self.tokens}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.tokens = state["step"], state["tokens"]


class RNG:
    """This rank's random generators: python, numpy, torch and (when present) its own GPU's.
    Only the rank's device: a rank resumed on a machine with fewer GPUs has no generator for
    another's."""

    def state_dict(self) -> dict:
        return {
            "python": random.getstate(),
            "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        }

    def load_state_dict(self, state: dict) -> None:
        random.setstate(state["python"])
        np.random.set_state(state["numpy"])
        torch.set_rng_state(state["torch"])
        if state.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"])

    @staticmethod
    def seed(seed: int, rank: int) -> None:
        """Per-rank generators for dropout and anything else random during training."""
        s = seed * 1000 + rank + 1
        random.seed(s)
        np.random.seed(s % 2**32)
        torch.manual_seed(s)
