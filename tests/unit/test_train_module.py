"""The train module and the model as DeepSpeed gets them, built in a fresh process as a
world of one (a spawned process: the test process never starts a process group):
what DeepSpeed's wrappers do at construction, and the pipeline built on the meta device."""

from __future__ import annotations

import json

import pytest
import torch.multiprocessing as mp
from helpers import TINY_CONFIG


def _in_a_world_of_one(fn, *args) -> dict:
    """fn(*args) in a spawned process (plain python: a world of one); what it returned."""
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.json"
        mp.start_processes(_run, args=(fn, args, str(out)), nprocs=1, start_method="spawn")
        return json.loads(out.read_text())


def _run(_rank: int, fn, args, out: str) -> None:
    from pathlib import Path

    Path(out).write_text(json.dumps(fn(*args)))


def _module(data: str, *sets: str):
    from megatrain.config import load_config
    from megatrain.model import GPTConfig
    from megatrain.train.train_module import TrainModule, init_layout

    cfg = load_config(TINY_CONFIG, [f"data.path={data}", *sets])
    return TrainModule(cfg, GPTConfig.from_config(cfg, 1024), 1, init_layout(cfg))


def _after_construction(data: str, optimizer: str) -> dict:
    import torch

    from megatrain.model.gpt import initial_value

    module = _module(data, "parallel.zero_stage=0", "train.precision=bf16", f"optim.name={optimizer}")
    opt = module.engine.optimizer  # FP16_UnfusedOptimizer: fp32 masters of the bf16 weights
    masters = [hp for group in opt.fp32_groups for hp in group]
    names = [n for group in module.optimizer_params for n in group]
    shapes = dict((n, p.shape) for n, p in module.engine.module.named_parameters())
    # the masters are made from the bf16 weights: the initial values rounded to bf16
    moved = [
        n
        for n, hp in zip(names, masters, strict=True)
        if not torch.equal(hp, initial_value(n, shapes[n], module.model_cfg).bfloat16().float())
    ]
    return {"wrapper": type(opt).__name__, "states": len(module.base_optimizer.state), "moved": moved}


@pytest.mark.parametrize("optimizer", ["fused_adamw", "torch_adamw"])
def test_zero0_bf16_starts_at_step_zero_from_the_initial_weights(small_data, optimizer):
    """DeepSpeed's FP16_UnfusedOptimizer (ZeRO-0 in bf16) steps the optimizer once at
    construction with zero gradients: that step must neither decay the weights nor count,
    or the first real update would use t=2 bias corrections."""
    got = _in_a_world_of_one(_after_construction, str(small_data), optimizer)
    assert got["wrapper"] == "FP16_UnfusedOptimizer"
    assert got["states"] == 0  # no step count, no moments: the first update is step 1
    assert got["moved"] == []  # the fp32 masters are the initial values, bitwise


def _pipeline_dtypes() -> dict:
    import torch

    from megatrain.model import GPTConfig, build_pipeline
    from megatrain.train import distributed as dist

    dist.init_distributed()
    cfg = GPTConfig(vocab_size=64, seq_len=8, n_layer=2, n_head=2, d_model=8)
    with torch.device("meta"):
        stage = build_pipeline(cfg, 1, init_weights=False)
    moved = stage.to("cpu")  # what DeepSpeed does while the parameters are still on meta: waits
    cast = stage.to(torch.bfloat16)
    return {
        "moved": sorted({str(p.device) for p in moved.parameters()}),
        "cast": sorted({str(p.dtype) for p in cast.parameters()}),
        "same": cast is stage,
        "checkpointable": [stage._is_checkpointable([layer]) for layer in stage.forward_funcs],
    }


def test_a_pipeline_on_meta_takes_casts_and_waits_for_moves():
    """build.py casts the meta model to the training dtype before allocating it: a pipeline
    stage kept that cast waiting with the move, and was allocated in fp32 first. Only the
    blocks are checkpointable (the embedding's int64 input under the reentrant checkpoint)."""
    got = _in_a_world_of_one(_pipeline_dtypes)
    assert got["moved"] == ["meta"] and got["cast"] == ["torch.bfloat16"] and got["same"]
    # embedding, positions, 2 blocks, final norm, output projection
    assert got["checkpointable"] == [False, False, True, True, False, False]


def _tf32(data: str) -> dict:
    import torch

    before = torch.backends.cuda.matmul.allow_tf32
    _module(data, "train.tf32=true")
    return {"before": before, "after": torch.backends.cuda.matmul.allow_tf32}


def test_train_tf32_lets_fp32_matmuls_use_tf32(small_data):
    assert _in_a_world_of_one(_tf32, str(small_data)) == {"before": False, "after": True}


def _accumulation(data: str, stage: int, dtype: str) -> dict:
    from helpers import accumulation_error

    return accumulation_error(data, stage, 8, f"train.grad_accum_dtype={dtype}")


@pytest.mark.parametrize(
    "stage, dtype, wrapper",
    [
        (1, "fp32", "BF16_Optimizer"),
        (2, "fp32", "DeepSpeedZeroOptimizer"),
        (1, "bf16", "DeepSpeedZeroOptimizer"),
    ],
)
def test_bf16_gradients_accumulate_in_the_configured_dtype(small_data, stage, dtype, wrapper):
    """8 micro-batches in bf16: with train.grad_accum_dtype=fp32 (the default) the optimizer
    is handed the micro-batch gradients' exact sum, as Megatron-LM sums them; in bf16
    (DeepSpeed's own default, and what megatrain did) each addition rounds."""
    got = _in_a_world_of_one(_accumulation, str(small_data), stage, dtype)
    assert got["wrapper"] == wrapper
    if dtype == "fp32":
        assert got["error"] < 1e-6
    else:
        assert got["error"] > 1e-3
