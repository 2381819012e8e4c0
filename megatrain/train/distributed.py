"""Process-group set-up and the few collectives the trainer needs.

Under the `deepspeed` launcher (and torchrun) RANK, WORLD_SIZE, MASTER_ADDR/PORT come from
the environment. MPI-style launchers (mpirun, srun; `deepspeed --launcher
openmpi|mvapich|slurm`) say who each process is in their own variables: we map those
(launcher_environment). A plain `python launch/pretrain.py` is a world of one, for which
we fill them in before DeepSpeed looks (it would otherwise try MPI discovery).
"""

from __future__ import annotations

import os
import re
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

    from megatrain.train import prebuilt_ops

    os.environ.update(launcher_environment(os.environ))
    if not dist.is_initialized():
        prebuilt_ops.load_all(log=lambda line: print(line, flush=True))  # no op is built from here on
        deepspeed.init_distributed(dist_init_required=True, verbose=False)
        # Each rank on its own device before anything is allocated or sent (NCCL makes its
        # communicators at the first collective): DeepSpeed sets it in its engine and in
        # zero.Init, but the model is built (ZeRO 0-2, pipelines) and the ranks talk
        # (init_from, a resume's conversion) before either; without it every rank of a
        # node would build on device 0 and NCCL would refuse two ranks on one GPU.
        get_accelerator().set_device(int(os.environ.get("LOCAL_RANK", 0)))
        _unlink_shm_buffer()
        _share_cores()


# What MPI-style launchers tell each process: (rank, world size, local rank, local size).
_MPI_VARIABLES = {
    "Open MPI": (
        "OMPI_COMM_WORLD_RANK",
        "OMPI_COMM_WORLD_SIZE",
        "OMPI_COMM_WORLD_LOCAL_RANK",
        "OMPI_COMM_WORLD_LOCAL_SIZE",
    ),
    "MVAPICH": (
        "MV2_COMM_WORLD_RANK",
        "MV2_COMM_WORLD_SIZE",
        "MV2_COMM_WORLD_LOCAL_RANK",
        "MV2_COMM_WORLD_LOCAL_SIZE",
    ),
    "MPICH / Intel MPI": ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"),
}


def launcher_environment(env) -> dict[str, str]:
    """The variables torch.distributed needs (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_SIZE,
    MASTER_ADDR, MASTER_PORT) that `env` lacks: none under the deepspeed launcher or
    torchrun; from an MPI launcher's or srun's own variables; else a world of one. Without
    a MASTER_ADDR, srun's first node is rank 0's; other MPI launchers leave it to DeepSpeed's
    MPI discovery (mpi4py), or it is a one-line error."""
    if "RANK" in env:
        return {}
    found = _mpi_world(env)
    if found is None:  # plain python
        return {
            "RANK": "0",
            "LOCAL_RANK": "0",
            "WORLD_SIZE": "1",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(free_port()),
        }
    launcher, out = found
    if "MASTER_ADDR" not in env and launcher == "srun":
        out["MASTER_ADDR"] = first_host(env.get("SLURM_STEP_NODELIST") or env["SLURM_JOB_NODELIST"])
    if "MASTER_ADDR" not in env and "MASTER_ADDR" not in out:
        import importlib.util

        if importlib.util.find_spec("mpi4py") is not None:
            return {}  # DeepSpeed's MPI discovery sets every variable from MPI itself
        raise UserError(
            f"{launcher} started {out['WORLD_SIZE']} processes and MASTER_ADDR is not set: export "
            "MASTER_ADDR (rank 0's host) and MASTER_PORT to every process, or install mpi4py "
            "(DeepSpeed then discovers them through MPI)"
        )
    if "MASTER_PORT" not in env:  # a port of the job's own under Slurm: two jobs may share a node
        out["MASTER_PORT"] = str(20000 + int(env["SLURM_JOB_ID"]) % 40000 if "SLURM_JOB_ID" in env else 29500)
    return out


def _mpi_world(env) -> tuple[str, dict[str, str]] | None:
    """(launcher, RANK/WORLD_SIZE/LOCAL_RANK/LOCAL_SIZE) when an MPI launcher or srun started
    more than one process; None otherwise (SLURM_NTASKS alone is also set in a batch script)."""
    for launcher, names in _MPI_VARIABLES.items():
        if int(env.get(names[1], 1)) > 1:
            return launcher, dict(
                zip(
                    ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_SIZE"),
                    (env.get(n, "0") for n in names),
                    strict=True,
                )
            )
    if int(env.get("SLURM_STEP_NUM_TASKS", 1)) > 1:  # srun's own step
        per_node = _expand_counts(env.get("SLURM_STEP_TASKS_PER_NODE", env["SLURM_STEP_NUM_TASKS"]))
        return "srun", {
            "RANK": env["SLURM_PROCID"],
            "WORLD_SIZE": env["SLURM_STEP_NUM_TASKS"],
            "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
            "LOCAL_SIZE": str(per_node[int(env.get("SLURM_NODEID", 0))]),
        }
    return None


def _expand_counts(text: str) -> list[int]:
    """Slurm's per-node counts: "4(x2),3" -> [4, 4, 3]."""
    out = []
    for item in text.split(","):
        count, _, times = item.partition("(x")
        out += [int(count)] * int(times.rstrip(")") or 1)
    return out


def first_host(nodelist: str) -> str:
    """The first host of a Slurm node list: "gpu[003-006,9],login1" -> "gpu003"."""
    first = re.match(r"[^,\[]*(\[[^\]]*\])?[^,]*", nodelist).group(0)
    prefix, _, rest = first.partition("[")
    if not rest:
        return first
    ranges, _, suffix = rest.partition("]")
    return prefix + re.split(r"[-,]", ranges)[0] + suffix


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
    address = f"{os.environ.get('MASTER_ADDR', '')}_{os.environ.get('MASTER_PORT', '')}"
    name = f"deepspeed_allreduce_buffer_{os.getuid()}_{address}_{rank()}"
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


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


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


def agree_and_gather(flags: list[bool], values: list[float] | None) -> tuple[list[bool], list | None]:
    """One collective: each flag ORed over all ranks (any_rank) and, when `values` are given
    (on every rank alike, or on none), every rank's values: [[rank 0's], [rank 1's], ...]."""
    if values is None:
        return any_rank(flags), None
    mine = torch.tensor([*map(float, flags), *values], dtype=torch.float64, device=collective_device())
    if dist.is_initialized() and world_size() > 1:
        parts = [torch.empty_like(mine) for _ in range(world_size())]
        dist.all_gather(parts, mine)
        every = torch.stack(parts)
    else:
        every = mine[None]
    every = every.cpu()
    return [bool(x > 0) for x in every[:, : len(flags)].amax(0)], every[:, len(flags) :].tolist()


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


def expert_parallel(layout):
    """This rank's moe.ExpertParallel (None when experts are not split): a process group per
    expert-parallel group, made by every rank for every group, in the same order."""
    from megatrain.model.moe import ExpertParallel

    if layout.expert_parallel == 1:
        return None
    group = _my_group(layout.expert_parallel_groups(), layout.rank)
    return ExpertParallel(group, layout.expert_parallel, layout.ep_rank)


def expert_replicas(layout):
    """The process group of the ranks holding this rank's experts (layout.expert_replica_groups);
    None when this rank holds them alone. Every rank makes every group, in the same order."""
    groups = layout.expert_replica_groups()
    return _my_group(groups, layout.rank) if len(groups[0]) > 1 else None


def _my_group(groups: list[list[int]], rank: int):
    mine = None
    for ranks in groups:
        group = dist.new_group(ranks)
        if rank in ranks:
            mine = group
    return mine
