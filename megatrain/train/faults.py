"""Fault injection for tests: crash, poison the data, or break the loss at named points.

Unset in normal runs, where every check is a dictionary lookup.

MEGATRAIN_FAULTS="point@step[:rank],..." fires at these points:
    checkpoint_write     files written, nothing published yet   -> SIGKILL
    checkpoint_publish   renamed, `latest` not yet replaced       -> SIGKILL
    step                 after optimizer step N                  -> SIGKILL
    nan_loss             step N's loss becomes NaN (real NaN gradients follow)
Each point fires once per process; with MEGATRAIN_FAULT_STATE=DIR also only once across
processes (a supervised run that restarts does not crash again at the same point).

MEGATRAIN_POISON="start:count" replaces the samples at global positions
[start, start + count) with random tokens: a real loss spike, for the spike guard.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np


def _parse(spec: str) -> set[tuple[str, int, int | None]]:
    points = set()
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, _, rest = item.partition("@")
        step, _, rank = rest.partition(":")
        points.add((name, int(step), int(rank) if rank else None))
    return points


_POINTS = _parse(os.environ.get("MEGATRAIN_FAULTS", ""))
_STATE_DIR = os.environ.get("MEGATRAIN_FAULT_STATE")
_fired: set[tuple[str, int]] = set()


def fires(name: str, step: int) -> bool:
    """Whether fault `name` fires at `step` on this rank (at most once)."""
    if not _POINTS:
        return False
    rank = int(os.environ.get("RANK", "0"))
    if (name, step, None) not in _POINTS and (name, step, rank) not in _POINTS:
        return False
    marker = Path(_STATE_DIR, f"{name}@{step}.rank{rank}") if _STATE_DIR else None
    if (name, step) in _fired or (marker is not None and marker.exists()):
        return False
    _fired.add((name, step))
    if marker is not None:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
    return True


def maybe_crash(name: str, step: int) -> None:
    if fires(name, step):
        print(f"[fault injection] rank {os.environ.get('RANK', '0')}: SIGKILL at {name}@{step}", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)


def _parse_poison(spec: str) -> range | None:
    if not spec:
        return None
    start, count = (int(x) for x in spec.split(":"))
    return range(start, start + count)


_POISON = _parse_poison(os.environ.get("MEGATRAIN_POISON", ""))


def poison(batch: np.ndarray, positions: np.ndarray, vocab_size: int) -> np.ndarray:
    """Rows whose global sample position is poisoned become random tokens (seeded by position)."""
    if _POISON is None:
        return batch
    for row, pos in enumerate(positions):
        if pos in _POISON:
            batch[row] = np.random.default_rng(int(pos)).integers(0, vocab_size, batch.shape[1])
    return batch
