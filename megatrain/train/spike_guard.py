"""Loss-spike detection: each step's loss and gradient norm against their recent history.

    guard = SpikeGuard(cfg.spike)
    verdict = guard.observe(step, {"loss": 3.1, "grad_norm": 0.8})
    if verdict.spike: ...roll back to a point before verdict.began...

A value is *above* when it exceeds the baseline of the last `window` accepted values
by more than `threshold` spreads: median + threshold x 1.4826 x MAD (robust: the
spikes themselves barely move it), or mean + threshold x std. A spike is `patience`
consecutive steps above, or any non-finite loss or norm. Values above the threshold
are not added to the history. The guard is stateful and saves itself (state_dict)
with the rest of the run.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import numpy as np

MAD_TO_STD = 1.4826  # MAD x 1.4826 estimates the standard deviation of a normal distribution


@dataclass
class Verdict:
    spike: bool
    began: int | None = None  # first step of the spike
    signal: str | None = None  # which signal: "loss", "grad_norm"
    value: float | None = None
    baseline: float | None = None
    limit: float | None = None


class SpikeGuard:
    def __init__(self, cfg):
        self.cfg = cfg
        self.history = {name: deque(maxlen=cfg.window) for name in cfg.watch}  # accepted values
        self.pending: list[int] = []  # steps above the threshold, in a row

    def limits(self, name: str) -> tuple[float, float] | None:
        """(baseline, limit) for a signal, or None while its history is too short."""
        values = self.history[name]
        if len(values) < self.cfg.min_history:
            return None
        x = np.fromiter(values, dtype=np.float64)
        if self.cfg.stats == "median_mad":
            base = float(np.median(x))
            spread = MAD_TO_STD * float(np.median(np.abs(x - base)))
        else:
            base, spread = float(x.mean()), float(x.std())
        spread = max(spread, 1e-6 * max(abs(base), 1.0))  # a flat history still allows some noise
        return base, base + self.cfg.threshold * spread

    def observe(self, step: int, values: dict, overflow: bool = False) -> Verdict:
        """Judge one optimizer step. `overflow`: the fp16 loss scaler skipped this step, so its
        infinite gradient norm is the scaler's business, not a spike."""
        for name, value in values.items():  # non-finite: a spike, watched or not
            if value is not None and not (name == "grad_norm" and overflow) and not math.isfinite(value):
                self.pending = []
                return Verdict(True, began=step, signal=name, value=value)
        above = None
        for name in self.cfg.watch:
            value = values.get(name)
            if value is None or (name == "grad_norm" and overflow):
                continue
            bounds = self.limits(name)
            if bounds is not None and value > bounds[1] and above is None:
                above = Verdict(
                    True, began=step, signal=name, value=value, baseline=bounds[0], limit=bounds[1]
                )
        if above is None:
            self.pending = []
            for name in self.cfg.watch:
                value = values.get(name)
                if value is not None and not (name == "grad_norm" and overflow):
                    self.history[name].append(float(value))
            return Verdict(False)
        self.pending.append(step)
        if len(self.pending) >= self.cfg.patience:
            above.began = self.pending[0]
            self.pending = []
            return above
        return Verdict(False)

    def state_dict(self) -> dict:
        return {"history": {k: list(v) for k, v in self.history.items()}, "pending": list(self.pending)}

    def load_state_dict(self, state: dict) -> None:
        for name, values in state["history"].items():
            if name in self.history:
                self.history[name] = deque(values, maxlen=self.cfg.window)
        self.pending = list(state["pending"])
