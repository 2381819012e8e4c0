"""The one Layout (sizes, this rank's coordinates, what ZeRO's stage implies) and the one
gradient-norm policy read from it."""

from __future__ import annotations

import pytest
from helpers import TINY_CONFIG

from megatrain.config import load_config
from megatrain.errors import UserError
from megatrain.layout import Layout
from megatrain.optim.grad_norm import GradNormPolicy


def test_coordinates_follow_deepspeeds_meshes():
    """Stage-major pipelines, consecutive tensor-parallel ranks: for 2 stages x 2
    data-parallel x 2 tensor-parallel ranks, every rank's place, and the ranks that share
    samples (one data-parallel rank) and generators (one tensor-parallel group)."""
    places = [(lay.stage, lay.dp_rank, lay.tp_rank) for lay in (Layout(1, 2, 2, 2, rank=r) for r in range(8))]
    assert places == [(s, d, t) for s in range(2) for d in range(2) for t in range(2)]
    assert [Layout(1, 2, 1, 3, rank=r).rng_index for r in range(6)] == [0, 0, 1, 1, 2, 2]
    assert [Layout(1, 1, 2, 2, rank=r).mp_rank for r in range(4)] == [0, 0, 1, 1]  # the stage's files
    assert [Layout(1, 2, 1, 2, rank=r).mp_rank for r in range(4)] == [0, 1, 0, 1]  # the shard's files
    lay = Layout(3, 1, 1, 4)
    assert lay.partitioned_parameters and not lay.flat_partitions and lay.world == 4
    assert Layout.from_checkpoint(lay.checkpoint_form()) == lay
    assert lay.describe() == "4 data-parallel rank(s), ZeRO-3"
    assert (
        Layout(1, 2, 2, 1).describe()
        == "2 pipeline stages x tensor-parallel 2 x 1 data-parallel rank(s), ZeRO-1"
    )


def test_a_world_that_does_not_divide_is_refused():
    cfg = load_config(TINY_CONFIG, ["data.path=x", "parallel.tensor_parallel=2"])
    assert Layout.from_config(cfg, 6, rank=5).as_dict()["data_parallel"] == 3
    with pytest.raises(UserError, match="^parallel.tensor_parallel=2 does not divide the 3 ranks$"):
        Layout.from_config(cfg, 3)


@pytest.mark.parametrize(
    "sets, source, kernel_clips, deepspeed_norm, single_group",
    [
        (["parallel.zero_stage=0"], "kernel", True, True, False),
        (["parallel.zero_stage=1"], "kernel", True, False, True),
        (
            ["parallel.zero_stage=1", "train.precision=bf16"],
            "kernel",
            True,
            True,
            True,
        ),  # BF16_Optimizer norms anyway
        (["parallel.zero_stage=2", "train.precision=bf16"], "kernel", True, False, True),
        (["parallel.zero_stage=3"], "deepspeed", False, True, False),  # no call sees every gradient
        (["parallel.zero_stage=0", "optim.name=torch_adamw"], "measured", False, True, False),
        (
            ["parallel.zero_stage=0", "optim.name=torch_adamw", "train.precision=bf16"],
            "deepspeed",
            False,
            True,
            False,
        ),
        (["parallel.zero_stage=1", "optim.name=adamw"], "deepspeed", False, True, False),
    ],
)
def test_who_computes_the_norm_and_who_clips(sets, source, kernel_clips, deepspeed_norm, single_group):
    cfg = load_config(TINY_CONFIG, ["data.path=x", *sets])
    norm = GradNormPolicy.decide(cfg.optim, cfg.train, Layout.from_config(cfg, 2))
    assert (norm.source, norm.kernel_clips, norm.deepspeed_norm, norm.single_group) == (
        source,
        kernel_clips,
        deepspeed_norm,
        single_group,
    )
    assert norm.deepspeed_clip == (0.0 if kernel_clips else cfg.optim.grad_clip)
