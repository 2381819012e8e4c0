"""FusedAdamWClip as DeepSpeed's client optimizer, 2 ranks through the real launcher."""

from __future__ import annotations

import pytest
from helpers import pretrain

from megatrain.train.metrics import read_metrics

COMMON = [
    "train.max_steps=6",
    "train.eval_every=0",
    "checkpoint.every_steps=0",
    "optim.lr=1e-2",
    "optim.grad_clip=1.0",
    "train.precision=fp32",
]


def _rows(run):
    return [r for r in read_metrics(run) if r["kind"] == "train"]


@pytest.mark.parametrize("stage", [1, 2])
def test_fused_equals_deepspeed_adamw_with_clipping(stage, tmp_path, small_data):
    """Same loss trajectory as DeepSpeed's stock AdamW with gradient_clipping=1.0 (fp32), with
    clipping active in some steps: the norm is taken over both ranks' gradient shards (one
    all-reduce), and weight decay still skips biases, norms and embeddings inside the flat
    ZeRO partition."""
    pretrain(
        tmp_path / "fused", small_data, *COMMON, f"parallel.zero_stage={stage}", "optim.name=fused_adamw"
    )
    pretrain(tmp_path / "stock", small_data, *COMMON, f"parallel.zero_stage={stage}", "optim.name=adamw")
    fused, stock = _rows(tmp_path / "fused"), _rows(tmp_path / "stock")
    assert [r["loss"] for r in fused] == pytest.approx([r["loss"] for r in stock], rel=2e-5)
    assert [r["grad_norm"] for r in fused] == pytest.approx([r["grad_norm"] for r in stock], rel=1e-4)
    clipped = [r["grad_norm"] > 1.0 for r in fused]
    assert any(clipped), [r["grad_norm"] for r in fused]  # clipping really happened
    assert all(r["skipped_steps"] == 0 for r in fused)
    assert fused[-1]["loss"] < fused[0]["loss"]
