"""megatrain: GPT-3-style pretraining on DeepSpeed. See README.md and design notes."""

__version__ = "0.1.0"
