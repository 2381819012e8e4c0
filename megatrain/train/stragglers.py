"""Stragglers: every `logging.straggler_every` steps each rank's time in data loading, the
forward pass, the backward pass and the optimizer step of that step is gathered in the step
loop's one collective (no collective or host sync of its own), and a rank whose own work
takes longer than `logging.straggler_factor` times the ranks' median is named, with its host
and local rank, on the console and in events.jsonl; that step's metrics row carries the
slowest rank's times.

A rank's own work is its data loading and forward pass: under data parallelism (ZeRO 0-2)
no collective runs in them, so a slow rank's time shows there alone, while the backward
pass and the optimizer step end in collectives that make every rank wait for the slowest
(the same time everywhere). Under ZeRO-3, tensor, expert or pipeline parallelism the
forward pass has collectives too, and a slow device may then go unnamed. Differences under
MIN_GAP_S are the host's jitter, not a straggler.
"""

from __future__ import annotations

import contextlib
import socket
import statistics
import time

import torch

from megatrain.train import distributed as dist
from megatrain.train.callbacks import Callback

PHASES = ("data", "forward", "backward", "optimizer")
OWN_WORK = ("data", "forward")
MIN_GAP_S = 0.05
_UNTIMED = contextlib.nullcontext()


class PhaseClock:
    """One rank's seconds per phase over a measured step: host clocks for data loading (and
    everything on a CPU), CUDA events for the device's phases on a GPU, read after the step's
    own host sync (the loss's all-reduce), when they have all completed."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.on = False

    def start(self) -> None:
        self.on = True
        self.host = dict.fromkeys(PHASES, 0.0)
        self.events: dict[str, list] = {p: [] for p in PHASES}

    def phase(self, name: str):
        """A context timing phase `name`; on a step not measured, one that does nothing (the
        training step enters four per micro-batch)."""
        return self._timed(name) if self.on else _UNTIMED

    @contextlib.contextmanager
    def _timed(self, name: str):
        if self.cuda and name != "data":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            yield
            end.record()
            self.events[name].append((begin, end))
        else:
            t0 = time.perf_counter()
            yield
            self.host[name] += time.perf_counter() - t0

    def stop(self) -> list[float]:
        """Seconds per phase (PHASES' order), after the step's sync."""
        self.on = False
        return [self.host[p] + sum(b.elapsed_time(e) for b, e in self.events[p]) / 1e3 for p in PHASES]


def slowest(times: list[list[float]]) -> tuple[int, float, list[float]]:
    """(the rank with the most own work, the median own work, each rank's own work) from
    every rank's PHASES seconds."""
    own = [sum(t[PHASES.index(p)] for p in OWN_WORK) for t in times]
    return max(range(len(own)), key=own.__getitem__), statistics.median(own), own


def stragglers(own: list[float], median: float, factor: float) -> list[int]:
    """The ranks whose own work (slowest's) exceeds `factor` times the median (by MIN_GAP_S at least)."""
    return [r for r, t in enumerate(own) if t > factor * median and t - median > MIN_GAP_S]


class Stragglers(Callback):
    """Names slow ranks from the phase times the loop gathered (trainer.rank_times)."""

    name = "stragglers"

    def __init__(self, every: int, factor: float):
        self.every, self.factor = every, factor

    def measures(self, step: int) -> bool:
        return bool(self.every) and step % self.every == 0

    def on_start(self, trainer) -> None:
        self.places = dist.all_gather_object((socket.gethostname(), dist.local_rank()))

    def on_step(self, trainer, row, flagged):
        times = trainer.rank_times
        if times is None:
            return False
        rank, median, own = slowest(times)
        row.update(slowest_rank=rank, median_own_work_s=median)
        row.update({f"slowest_{p}_s": t for p, t in zip(PHASES, times[rank], strict=True)})
        for r in stragglers(own, median, self.factor):
            host, local = self.places[r]
            trainer.log.print(
                f"straggler at step {row['step']}: rank {r} ({host}, local rank {local}) took {own[r]:.3f} s "
                f"in data loading and forward, {own[r] / median:.1f}x the ranks' median {median:.3f} s "
                f"(logging.straggler_factor={self.factor})"
            )
            trainer.log.event(
                "straggler",
                step=row["step"],
                rank=r,
                host=host,
                local_rank=local,
                own_work_s=own[r],
                median_s=median,
                **{f"{p}_s": t for p, t in zip(PHASES, times[r], strict=True)},
            )
        return False
