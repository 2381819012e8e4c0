"""Learning-rate and batch-size schedules, as pure functions of tokens consumed."""

from megatrain.schedule.batch import micro_batches_per_step

__all__ = ["micro_batches_per_step"]
