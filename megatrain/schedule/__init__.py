"""Learning-rate and batch-size schedules, as pure functions of tokens consumed."""

from megatrain.schedule.batch import BatchSchedule
from megatrain.schedule.lr import LRSchedule

__all__ = ["BatchSchedule", "LRSchedule"]
