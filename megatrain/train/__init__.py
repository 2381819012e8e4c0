"""The trainer: DeepSpeed engine, step loop, checkpoints, logs."""

from megatrain.train.trainer import Trainer, TrainState

__all__ = ["TrainState", "Trainer"]
