"""Learning rate as a pure function of tokens consumed (GPT-3, Brown et al. 2020, appendix B).

Linear warmup from 0 to the peak over `warmup_tokens`; then cosine (or linear) decay to
`min_lr_ratio` x peak at `decay_tokens`; constant after that. GPT-3: 375M warmup tokens,
cosine to 10% at 260B tokens, training continuing at 10% beyond.
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
    shape: str = "cosine"  # cosine | linear | constant

    def __post_init__(self):
        if self.shape not in ("cosine", "linear", "constant"):
            raise ValueError(f"unknown LR shape {self.shape!r}")
        if self.warmup_tokens < 0 or (self.shape != "constant" and self.warmup_tokens > self.decay_tokens):
            raise ValueError(
                f"need 0 <= warmup_tokens ({self.warmup_tokens}) <= decay_tokens ({self.decay_tokens})"
            )

    @classmethod
    def from_config(cls, cfg) -> LRSchedule:
        s = cfg.schedule
        return cls(
            peak=cfg.optim.lr,
            warmup_tokens=s.warmup_tokens,
            decay_tokens=s.decay_tokens,
            min_lr_ratio=s.min_lr_ratio,
            shape=s.lr_shape,
        )

    def __call__(self, tokens: int) -> float:
        if tokens < self.warmup_tokens:
            return self.peak * tokens / self.warmup_tokens
        if self.shape == "constant":
            return self.peak
        floor = self.min_lr_ratio * self.peak
        if tokens >= self.decay_tokens:
            return floor
        progress = (tokens - self.warmup_tokens) / (self.decay_tokens - self.warmup_tokens)
        if self.shape == "linear":
            return self.peak - (self.peak - floor) * progress
        return floor + (self.peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
