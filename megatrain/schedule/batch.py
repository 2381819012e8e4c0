"""Global batch size as a pure function of tokens consumed.

GPT-3 (appendix B) grows the batch linearly from 32K tokens to the model's full batch
over the first 4-12B tokens. The batch is always a whole number of micro_batch x
seq_len x data-parallel ranks (DeepSpeed's gradient accumulation absorbs the rest),
rounded down and never below one micro batch per rank, so it never decreases as
tokens grow. Instead of a ramp, `steps` gives Megatron-style steps: [[tokens, batch
tokens], ...], each batch size holding from its token count on.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BatchSchedule:
    final_tokens: int
    unit_tokens: int  # micro_batch x seq_len x data-parallel ranks of the layout the run started on
    start_tokens: int | None = None
    ramp_tokens: int = 0
    steps: tuple[tuple[int, int], ...] | None = None
    split_tokens: int | None = None  # micro_batch x seq_len x data-parallel ranks now (None: unit_tokens)

    def __post_init__(self):
        if self.steps is not None:
            if not self.steps or self.steps[0][0] != 0:
                raise ValueError(f"batch steps must start at 0 tokens, got {list(self.steps)}")
            pairs = zip(self.steps, self.steps[1:], strict=False)
            if any(b[0] <= a[0] or b[1] < a[1] for a, b in pairs) or any(size <= 0 for _, size in self.steps):
                raise ValueError(
                    f"batch steps need increasing token counts and non-decreasing positive sizes, "
                    f"got {list(self.steps)}"
                )

    @classmethod
    def from_config(cls, cfg, dp_size: int, unit_tokens: int | None = None) -> BatchSchedule:
        """`unit_tokens`: the rounding unit of the layout the run started on, when resumed."""
        s, t = cfg.schedule, cfg.train
        steps = tuple((a, b) for a, b in s.batch_steps) if s.batch_steps is not None else None
        split = t.micro_batch * t.seq_len * dp_size
        return cls(
            final_tokens=s.batch_final_tokens,
            unit_tokens=unit_tokens or split,
            start_tokens=s.batch_start_tokens,
            ramp_tokens=s.batch_ramp_tokens,
            steps=steps,
            split_tokens=split,
        )

    @property
    def split(self) -> int:
        return self.split_tokens or self.unit_tokens

    def target_tokens(self, tokens: int) -> float:
        """The schedule before rounding."""
        if self.steps is not None:
            return next(size for start, size in reversed(self.steps) if tokens >= start)
        if not self.ramp_tokens or self.start_tokens is None or tokens >= self.ramp_tokens:
            return self.final_tokens
        return self.start_tokens + (self.final_tokens - self.start_tokens) * tokens / self.ramp_tokens

    def micro_batches(self, tokens: int) -> int:
        """Micro-batches per rank per optimizer step at this point of training."""
        return self(tokens) // self.split

    def sizes_from(self, tokens: int) -> list[int]:
        """The global batch sizes the schedule can still produce from `tokens` on: a ramp
        passes through every multiple of the unit up to its final batch."""
        if self.steps is not None:
            return sorted(
                {self(tokens), *(self._rounded(size) for start, size in self.steps if start >= tokens)}
            )
        first, last = (
            self(tokens) // self.unit_tokens,
            self(max(tokens, self.ramp_tokens)) // self.unit_tokens,
        )
        return [m * self.unit_tokens for m in range(first, last + 1)]

    def rounding_notes(self) -> list[str]:
        """One line per configured batch size that rounding moves by more than 1%."""
        if self.steps is not None:
            configured = [size for _, size in self.steps]
        else:
            configured = [self.start_tokens] * bool(self.ramp_tokens and self.start_tokens) + [
                self.final_tokens
            ]
        notes = []
        for size in dict.fromkeys(configured):
            actual = max(1, size // self.unit_tokens) * self.unit_tokens
            if abs(actual - size) > 0.01 * size:
                notes.append(
                    f"global batch {size:,} tokens is rounded to {actual:,}: a whole number of micro_batch "
                    f"x seq_len x data-parallel ranks ({self.unit_tokens:,} tokens), at least one per rank"
                )
        return notes

    def _rounded(self, size: float) -> int:
        return max(1, int(size) // self.unit_tokens) * self.unit_tokens

    def __call__(self, tokens: int) -> int:
        """Global batch in tokens at this point of training."""
        return self._rounded(self.target_tokens(tokens))
