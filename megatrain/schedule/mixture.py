"""The data mixture as a function of tokens: a curriculum over blend weights.

Keyframes (tokens, weights) start at 0 tokens. `stepwise`: each keyframe's weights hold
from its token count until the next keyframe (a general mix, then more code; the
annealing stages of OLMo 2 and Llama 3). `linear`: the weights move linearly from one
keyframe to the next. After the last keyframe its weights hold. Weights are normalised
per keyframe; a source may be 0 in some (not yet, or no longer, in the mix).

    MixtureSchedule(("web", "code"), ((0, (0.7, 0.3)), (200e9, (0.3, 0.7))))(250e9)  # -> [0.3, 0.7]
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SHAPES = ("stepwise", "linear")


@dataclass(frozen=True)
class MixtureSchedule:
    names: tuple[str, ...]
    keyframes: tuple[
        tuple[int, tuple[float, ...]], ...
    ]  # (tokens, weights by source), tokens increasing from 0
    shape: str = "stepwise"

    def __post_init__(self):
        if self.shape not in SHAPES:
            raise ValueError(f"unknown mixture shape {self.shape!r} (one of {', '.join(SHAPES)})")
        starts = [t for t, _ in self.keyframes]
        if not starts or starts[0] != 0:
            raise ValueError(f"the first stage must start at 0 tokens, got {starts}")
        for a, b in zip(starts, starts[1:], strict=False):
            if b <= a:
                raise ValueError(f"stage boundaries must increase: {b:,} tokens comes after {a:,}")
        for t, w in self.keyframes:
            if len(w) != len(self.names):
                raise ValueError(
                    f"the stage at {t:,} tokens has {len(w)} weights for {len(self.names)} sources"
                )
            if any(x < 0 or not np.isfinite(x) for x in w) or not sum(w) > 0:
                raise ValueError(
                    f"the weights of the stage at {t:,} tokens must be non-negative and sum to a "
                    f"positive number, got {list(w)}"
                )

    @classmethod
    def from_config(cls, cfg) -> MixtureSchedule:
        """data.path's weights from 0 tokens, then each of data.stages."""
        d = cfg.data
        sources = d.named_sources()
        names = tuple(name for name, _, _ in sources)
        frames = [(0, tuple(w for _, _, w in sources))]
        for stage in d.stages:
            tokens = int(float(str(stage["tokens"]).replace("_", "")))  # YAML reads 2e11 as a string
            frames.append((tokens, tuple(float(stage["weights"].get(n, 0.0)) for n in names)))
        return cls(names, tuple(frames), d.stage_shape)

    def describe(self) -> dict:
        """The schedule as JSON-ready lists (a run's state records it, to refuse a changed one)."""
        return {
            "sources": list(self.names),
            "shape": self.shape,
            "stages": [[t, list(w)] for t, w in self.keyframes],
        }

    @property
    def staged(self) -> bool:
        return len(self.keyframes) > 1

    def normalised(self, i: int) -> np.ndarray:
        w = np.array(self.keyframes[i][1], dtype=np.float64)
        return w / w.sum()

    def stage(self, tokens: float) -> int:
        """The keyframe in force at `tokens` (the last one at or before it)."""
        return int(np.searchsorted([t for t, _ in self.keyframes], tokens, side="right")) - 1

    def __call__(self, tokens: float) -> np.ndarray:
        """Normalised weights by source at `tokens`."""
        i = self.stage(tokens)
        if self.shape == "stepwise" or i == len(self.keyframes) - 1:
            return self.normalised(i)
        (t0, _), (t1, _) = self.keyframes[i], self.keyframes[i + 1]
        f = (tokens - t0) / (t1 - t0)
        return (1 - f) * self.normalised(i) + f * self.normalised(i + 1)

    def segments(self, seq_len: int) -> list[tuple[int, int | None, np.ndarray, np.ndarray]]:
        """The mixture over sample positions (position p holds tokens from p x seq_len on):
        [(first position, end position or None, weights at the start, at the end)], the
        last open-ended; a stage begins at the first sample that starts at or after its
        token count."""
        starts = [-(-t // seq_len) for t, _ in self.keyframes]
        out = []
        for i, start in enumerate(starts):
            end = starts[i + 1] if i + 1 < len(starts) else None
            w = self.normalised(i)
            linear = self.shape == "linear" and end is not None
            if end is None or end > start:
                out.append((start, end, w, self.normalised(i + 1) if linear else w))
        return out
