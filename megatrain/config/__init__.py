"""The run configuration: schema (one documented dataclass per section), loading (YAML
plus --set overrides, checked) and the DeepSpeed JSON made from it."""

from megatrain.config.deepspeed import deepspeed_config
from megatrain.config.loading import load_config
from megatrain.config.schema import Config

__all__ = ["Config", "deepspeed_config", "load_config"]
