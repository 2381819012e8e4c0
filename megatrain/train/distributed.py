"""Process-group set-up and the few collectives the trainer needs.

Under the `deepspeed` launcher RANK, WORLD_SIZE, MASTER_ADDR/PORT come from the
environment; a plain `python launch/pretrain.py` is a world of one, for which we fill
them in before DeepSpeed looks (it would otherwise try MPI discovery).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch
import torch.distributed as dist

from megatrain.errors import UserError

T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> None:
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if "RANK" not in os.environ:  # plain python: a world of one
        os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
                           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())})
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_init_required=True, verbose=False)
        # Each rank on its own device before anything is allocated or sent (NCCL makes its
        # communicators at the first collective): DeepSpeed sets it in its engine and in
        # zero.Init, but the model is built (ZeRO 0-2, pipelines) and the ranks talk
        # (init_from, a resume's conversion) before either; without it every rank of a
        # node would build on device 0 and NCCL would refuse two ranks on one GPU.
        get_accelerator().set_device(int(os.environ.get("LOCAL_RANK", 0)))
        _unlink_shm_buffer()
        _share_cores()


def _share_cores() -> None:
    """On DeepSpeed's CPU accelerator the ranks of a machine share its cores: each gets its
    share of torch's threads (unless OMP_NUM_THREADS says otherwise). Every rank using every
    core oversubscribes them, and the ranks then wait on each other's descheduled threads
    at each collective: steps of the tiny test model took ~6x longer."""
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() != "cpu" or "OMP_NUM_THREADS" in os.environ:
        return
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // local_world_size()))


def _unlink_shm_buffer() -> None:
    """DeepSpeed's CPU backend gives each rank a /dev/shm buffer when all ranks share a
    machine (LOCAL_SIZE == world size, a world of one included; csrc/cpu/comm/shm.cpp) and
    never unlinks it, so every run, killed or not, leaked memory. Once every rank has mapped
    every buffer (after init and a barrier) each unlinks its own: the memory goes with the
    last rank, however it exits."""
    if os.environ.get("LOCAL_SIZE") != str(world_size()):  # a world of one included
        return
    barrier()
    env = os.environ
    name = f"deepspeed_allreduce_buffer_{os.getuid()}_{env.get('MASTER_ADDR', '')}_{env.get('MASTER_PORT', '')}_{rank()}"
    Path("/dev/shm", name).unlink(missing_ok=True)


def shutdown() -> None:
    """After the last collective: wait for every rank, so that none leaves while another
    still talks to it; launch/_cli.py then exits with os._exit. No destroy_process_group:
    tearing Gloo down joins its worker threads, and ranks were seen to abort there
    ("terminate called without an active exception") after a finished run."""
    barrier()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def local_world_size() -> int:
    """Ranks on this machine: the launcher's count (DeepSpeed's LOCAL_SIZE, torchrun's
    LOCAL_WORLD_SIZE), else every rank."""
    return int(os.environ.get("LOCAL_SIZE") or os.environ.get("LOCAL_WORLD_SIZE") or world_size())


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if dist.is_initialized() and world_size() > 1:
        dist.barrier()


def collective_device() -> torch.device:
    """Where every tensor handed to a collective must live: the accelerator's current
    device (NCCL takes CUDA tensors only; a CPU tensor raises there)."""
    from deepspeed.accelerator import get_accelerator

    return torch.device(get_accelerator().current_device_name())


def all_reduce_mean(values: list[float] | torch.Tensor) -> list[float]:
    """Mean over ranks of a few numbers (one collective, one host sync): floats, or a
    float64 tensor already on the collective device (kept there until the reduction)."""
    t = torch.as_tensor(values, dtype=torch.float64, device=collective_device())
    if dist.is_initialized() and world_size() > 1:
        dist.all_reduce(t)
        t = t / world_size()
    return t.reshape(-1).tolist()


def any_rank(flags: list[bool]) -> list[bool]:
    """For each flag: True on every rank if it is True on any rank (one collective)."""
    if not dist.is_initialized() or world_size() == 1:
        return list(flags)
    t = torch.tensor([1.0 if f else 0.0 for f in flags], device=collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(x > 0) for x in t.tolist()]


def on_every_rank(work: Callable[[], T]) -> T:
    """Collective: this rank's work(), returned once every rank has done its own. When it
    raised on any rank, every rank raises (a UserError as one, with its message), so that no
    rank is left waiting in a later collective for one that has given up."""
    try:
        result, failure = work(), None
    except Exception as e:  # every rank is told, then this one raises it
        result, failure = None, e
    told = all_gather_object(None if failure is None else (isinstance(failure, UserError), str(failure)))
    if failure is not None:
        raise failure
    for r, problem in enumerate(told):
        if problem is not None:
            user, message = problem
            raise UserError(message) if user else RuntimeError(f"rank {r} failed: {message}")
    return result


def all_gather_object(obj) -> list:
    if not dist.is_initialized() or world_size() == 1:
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out
