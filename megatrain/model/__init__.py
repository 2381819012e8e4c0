"""The GPT model (gpt.py) and its pipeline-parallel layout."""

from megatrain.model.gpt import (
    GPT,
    GPTConfig,
    flops_per_token,
    matmul_params,
    param_count,
    recompute_flops_per_token,
)
from megatrain.model.pipeline import build_pipeline, canonical_name

__all__ = [
    "GPT",
    "GPTConfig",
    "build_pipeline",
    "canonical_name",
    "flops_per_token",
    "matmul_params",
    "param_count",
    "recompute_flops_per_token",
]
