"""The GPT model (gpt.py) and its pipeline-parallel layout."""

from megatrain.model.gpt import GPT, GPTConfig, flops_per_token, matmul_params

__all__ = ["GPT", "GPTConfig", "flops_per_token", "matmul_params"]
