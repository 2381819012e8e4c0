"""Learning rate as a pure function of tokens consumed (GPT-3, Brown et al. 2020, appendix B).

Linear warmup from 0 to the peak over `warmup_tokens`; then cosine (or linear) decay to
`min_lr_ratio` x peak at `decay_tokens`; constant after that. GPT-3: 375M warmup tokens,
cosine to 10% at 260B tokens, training continuing at 10% beyond.

Warmup-stable-decay (decay="wsd"; Hagele et al. 2024, "Scaling Laws and Compute-Optimal
Training Beyond Fixed Training Durations"): after the warmup the peak holds until the
cooldown's `cooldown_tokens` before `decay_tokens`, then falls to the floor, linearly or as
1 - sqrt(progress). The stable phase does not depend on where the run ends, so cooldowns
branched from one long run give the final loss at many token budgets (docs/scaling.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class LRSchedule:
    peak: float
    warmup_tokens: int
    decay_tokens: int
    min_lr_ratio: float = 0.1
    shape: str = "cosine"  # cosine | linear | constant (decay="cosine")
    decay: str = "cosine"  # cosine: GPT-3's, in `shape`; wsd: warmup-stable-decay
    cooldown_tokens: int = 0  # wsd: the cooldown ends at decay_tokens
    cooldown_shape: str = "linear"  # wsd: linear | 1-sqrt

    def __post_init__(self):
        if self.shape not in ("cosine", "linear", "constant") or self.decay not in ("cosine", "wsd"):
            raise ValueError(f"unknown LR shape {self.shape!r} or decay {self.decay!r}")
        if self.decay == "wsd" and self.cooldown_shape not in ("linear", "1-sqrt"):
            raise ValueError(f"unknown cooldown shape {self.cooldown_shape!r}: linear or 1-sqrt")
        if self.decay == "wsd" and self.cooldown_tokens <= 0:
            raise ValueError(f"a wsd cooldown needs cooldown_tokens > 0, got {self.cooldown_tokens}")
        decays = self.decay == "wsd" or self.shape != "constant"
        if self.warmup_tokens < 0 or (decays and self.warmup_tokens > self.decay_start):
            raise ValueError(
                f"need 0 <= warmup_tokens ({self.warmup_tokens}) <= the decay's start ({self.decay_start})"
            )

    @property
    def decay_start(self) -> int:
        """Where the learning rate starts to fall: the warmup's end, or a wsd cooldown's start."""
        return self.decay_tokens - self.cooldown_tokens if self.decay == "wsd" else self.warmup_tokens

    @classmethod
    def from_config(cls, cfg) -> LRSchedule:
        s = cfg.schedule
        return cls(
            peak=cfg.optim.lr,
            warmup_tokens=s.warmup_tokens,
            decay_tokens=s.decay_tokens,
            min_lr_ratio=s.min_lr_ratio,
            shape=s.lr_shape,
            decay=s.decay,
            cooldown_tokens=s.cooldown_length() if s.decay == "wsd" else 0,
            cooldown_shape=s.cooldown_shape,
        )

    def __call__(self, tokens: int) -> float:
        if tokens < self.warmup_tokens:
            return self.peak * tokens / self.warmup_tokens
        if (self.decay == "cosine" and self.shape == "constant") or tokens < self.decay_start:
            return self.peak
        floor = self.min_lr_ratio * self.peak
        if tokens >= self.decay_tokens:
            return floor
        progress = (tokens - self.decay_start) / (self.decay_tokens - self.decay_start)
        if self.decay == "wsd":
            left = 1.0 - (math.sqrt(progress) if self.cooldown_shape == "1-sqrt" else progress)
            return floor + (self.peak - floor) * left
        if self.shape == "linear":
            return self.peak - (self.peak - floor) * progress
        return floor + (self.peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
