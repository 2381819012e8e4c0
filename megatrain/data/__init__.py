"""Token shards, training samples, sampling order and blending."""

from megatrain.data.blend import BlendedDataset
from megatrain.data.dataset import TokenDataset
from megatrain.data.permutation import Permutation
from megatrain.data.prepare import PrepareReport, prepare_dataset
from megatrain.data.sampler import ResumableSampler

__all__ = [
    "BlendedDataset",
    "Permutation",
    "PrepareReport",
    "ResumableSampler",
    "TokenDataset",
    "prepare_dataset",
]
