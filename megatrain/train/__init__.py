"""The trainer: a plain loop around a train module (DeepSpeed engine), callbacks, checkpoints, logs."""

from megatrain.train.trainer import Trainer

__all__ = ["Trainer"]
