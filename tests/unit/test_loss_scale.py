"""fp16's dynamic loss scale in both of DeepSpeed's forms (megatrain/train/ds_internals.py):
read, saved as JSON and set again, also from one form into the other, as a checkpoint
resumed on another ZeRO stage does. DeepSpeed's real objects: ZeRO-0's FP16_Optimizer (it
builds on the CPU), and the DynamicLossScaler ZeRO 1-3 create, held as their optimizers
hold it (those optimizers need a process group and refuse fp16 on a CPU). The scalers log
through DeepSpeed's process group as they move, so those tests run in a world of one."""

from __future__ import annotations

import json
import math
import os
import types

import torch
import torch.multiprocessing as mp
from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
from deepspeed.runtime.fp16.loss_scaler import CreateLossScaler

from megatrain.train import distributed as dist
from megatrain.train import ds_internals as wall

ZERO_ARGS = {
    "init_scale": 2**16,
    "scale_window": 1000,
    "delayed_shift": 2,
    "consecutive_hysteresis": False,
    "min_scale": 1,
}  # as DeepSpeed builds them from megatrain's fp16 config


def zero0_fp16():
    param = torch.nn.Parameter(torch.zeros(8, dtype=torch.half))
    return FP16_Optimizer(
        torch.optim.AdamW([param]), dynamic_loss_scale=True, initial_dynamic_scale=2**16, verbose=False
    )


def zero_fp16(dtype=torch.half):
    return types.SimpleNamespace(loss_scaler=CreateLossScaler(dtype, 1.0, True, dict(ZERO_ARGS)))


def overflow(opt, flags):
    """The scale's updates after steps with and without an overflow, as each form makes them."""
    for flag in flags:
        if hasattr(opt, "loss_scaler"):
            opt.loss_scaler.update_scale(flag)
        else:
            opt._update_scale(flag)


def through_json(state):
    return json.loads(json.dumps(state))


def in_a_world_of_one(case) -> None:
    mp.start_processes(_rank, args=(case, dist.free_port()), nprocs=1, start_method="spawn")


def _rank(rank: int, case, port: int) -> None:
    os.environ.update(
        {
            "RANK": "0",
            "LOCAL_RANK": "0",
            "WORLD_SIZE": "1",
            "LOCAL_SIZE": "1",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
    )
    dist.init_distributed()
    case()


def test_the_dynamic_scale_carries_over_in_each_form():
    in_a_world_of_one(carries_over_in_each_form)


def carries_over_in_each_form():
    for make in (zero0_fp16, zero_fp16):
        trained, fresh = make(), make()
        overflow(trained, [True, True, True, False, False])
        assert wall.loss_scale(trained) < 2**16  # it moved: carrying it is not a no-op
        assert wall.load_loss_scale_state(fresh, through_json(wall.loss_scale_state(trained)))
        assert wall.loss_scale_state(fresh) == wall.loss_scale_state(trained)
        assert wall.loss_scale(fresh) == wall.loss_scale(trained)
        steps = [False, True, False, True, True, False]  # and the two move alike from there on
        history = []
        for opt in (trained, fresh):
            seen = []
            for flag in steps:
                overflow(opt, [flag])
                seen.append(wall.loss_scale(opt))
            history.append(seen)
        assert history[0] == history[1]


def test_the_scale_carries_across_forms():
    in_a_world_of_one(carries_across_forms)


def carries_across_forms():
    zero0, zero = zero0_fp16(), zero_fp16()
    overflow(zero, [True, True, True])  # hysteresis 2: halved twice, hysteresis used up
    assert wall.load_loss_scale_state(zero0, through_json(wall.loss_scale_state(zero)))
    assert wall.loss_scale(zero0) == wall.loss_scale(zero) == 2**14
    assert not hasattr(zero0.loss_scale_config, "cur_hysteresis")  # the field ZeRO-0 lacks is ignored

    target = zero_fp16()
    overflow(zero0, [True])
    assert wall.load_loss_scale_state(target, through_json(wall.loss_scale_state(zero0)))
    assert wall.loss_scale(target) == 2**13 and target.loss_scaler.cur_hysteresis == 2  # kept its own


def test_no_dynamic_scale_nothing_saved_or_set():
    saved = wall.loss_scale_state(zero_fp16())
    static = zero_fp16(torch.bfloat16)  # bf16 and fp32 under ZeRO 1-2: a static scale of 1
    assert wall.loss_scale_state(static) is None
    assert not wall.load_loss_scale_state(static, saved) and wall.loss_scale(static) == 1.0
    plain = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))])  # ZeRO-0 without fp16
    assert wall.loss_scale_state(plain) is None and not wall.load_loss_scale_state(plain, saved)
    assert math.isnan(wall.loss_scale(plain))
    assert not wall.load_loss_scale_state(zero_fp16(), None)  # a checkpoint written without fp16
