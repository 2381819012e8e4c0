"""Global batch size: from tokens to micro-batches per optimizer step."""

from __future__ import annotations


def micro_batches_per_step(batch_tokens: int, micro_batch: int, seq_len: int, dp_size: int) -> int:
    """Gradient-accumulation steps for a global batch of `batch_tokens`: rounded down to a
    whole number of micro_batch x seq_len x dp_size, never below one micro batch per rank."""
    return max(1, int(batch_tokens) // (micro_batch * seq_len * dp_size))
