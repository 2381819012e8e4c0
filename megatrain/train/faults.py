"""Fault injection for tests: crash this process at a named point of the run.

MEGATRAIN_FAULTS="checkpoint_write@4" kills (SIGKILL) every rank that reaches the
checkpoint write of step 4; "checkpoint_write@4:1" only rank 1. Points:
checkpoint_write (files written, nothing published), checkpoint_publish (renamed,
`latest` not yet replaced), step (after optimizer step N). Unset in normal runs, where
each call is a dictionary lookup.
"""

from __future__ import annotations

import os
import signal


def _parse(spec: str) -> set[tuple[str, int, int | None]]:
    points = set()
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, _, rest = item.partition("@")
        step, _, rank = rest.partition(":")
        points.add((name, int(step), int(rank) if rank else None))
    return points


_POINTS = _parse(os.environ.get("MEGATRAIN_FAULTS", ""))


def maybe_crash(name: str, step: int) -> None:
    if not _POINTS:
        return
    rank = int(os.environ.get("RANK", "0"))
    if (name, step, None) in _POINTS or (name, step, rank) in _POINTS:
        print(f"[fault injection] rank {rank}: SIGKILL at {name}@{step}", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
