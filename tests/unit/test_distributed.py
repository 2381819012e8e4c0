"""Starting the process group: who a process is, from whichever launcher started it, and
each rank of a node on its own device."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch.multiprocessing as mp

from megatrain.errors import UserError
from megatrain.train import distributed as dist

# --- who a process is ----------------------------------------------------------------------

OPEN_MPI = {
    "OMPI_COMM_WORLD_RANK": "5",
    "OMPI_COMM_WORLD_SIZE": "16",
    "OMPI_COMM_WORLD_LOCAL_RANK": "1",
    "OMPI_COMM_WORLD_LOCAL_SIZE": "4",
}
SRUN = {
    "SLURM_JOB_ID": "123456",
    "SLURM_NTASKS": "12",
    "SLURM_PROCID": "9",
    "SLURM_STEP_NUM_TASKS": "12",
    "SLURM_LOCALID": "1",
    "SLURM_NODEID": "2",
    "SLURM_STEP_TASKS_PER_NODE": "4(x2),3,1",
    "SLURM_STEP_NODELIST": "gpu[007-009,012]",
    "SLURM_JOB_NODELIST": "gpu[001-012]",
}


def test_the_deepspeed_launcher_and_torchrun_say_it_themselves():
    assert dist.launcher_environment({"RANK": "3", "WORLD_SIZE": "8", **OPEN_MPI}) == {}


def test_a_plain_process_is_a_world_of_one():
    env = dist.launcher_environment(
        {"SLURM_NTASKS": "8", "SLURM_PROCID": "0"}
    )  # a batch script: no step of srun
    assert {k: env[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")} == {
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
    }


def test_mpirun_processes_take_their_ranks_from_mpi():
    env = dist.launcher_environment({**OPEN_MPI, "MASTER_ADDR": "node0"})
    assert env == {
        "RANK": "5",
        "WORLD_SIZE": "16",
        "LOCAL_RANK": "1",
        "LOCAL_SIZE": "4",
        "MASTER_PORT": "29500",
    }
    hydra = {
        "PMI_RANK": "2",
        "PMI_SIZE": "4",
        "MPI_LOCALRANKID": "0",
        "MPI_LOCALNRANKS": "2",
        "MASTER_ADDR": "n0",
        "MASTER_PORT": "6000",
    }
    assert dist.launcher_environment(hydra) == {
        "RANK": "2",
        "WORLD_SIZE": "4",
        "LOCAL_RANK": "0",
        "LOCAL_SIZE": "2",
    }


def test_srun_tasks_meet_on_the_first_node_of_the_step():
    assert dist.launcher_environment(SRUN) == {
        "RANK": "9",
        "WORLD_SIZE": "12",
        "LOCAL_RANK": "1",
        "LOCAL_SIZE": "3",
        "MASTER_ADDR": "gpu007",
        "MASTER_PORT": str(20000 + 123456 % 40000),
    }
    assert [dist.first_host(s) for s in ("n1,n2", "gpu[3-4]-ib,x", "login")] == ["n1", "gpu3-ib", "login"]


def test_mpirun_without_a_master_address(monkeypatch):
    """DeepSpeed's MPI discovery needs mpi4py; without it the processes cannot meet."""
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(UserError, match="^Open MPI started 16 processes and MASTER_ADDR is not set: export "):
        dist.launcher_environment(OPEN_MPI)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object())  # mpi4py: DeepSpeed discovers
    assert dist.launcher_environment(OPEN_MPI) == {}


# --- each rank on its device -----------------------------------------------------------------


def _rank(rank: int, tmp_path, port: int) -> None:
    import torch.distributed as torch_dist
    from deepspeed.accelerator import set_accelerator
    from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator

    class Recording(CPU_Accelerator):
        """The CPU accelerator, noting each set_device and whether the group had started."""

        def __init__(self):
            super().__init__()
            self.told = []

        def set_device(self, device_index):
            self.told.append([device_index, torch_dist.is_initialized()])

    accelerator = Recording()
    set_accelerator(accelerator)
    os.environ.update(
        {
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": "2",
            "LOCAL_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
    )
    dist.init_distributed()
    (tmp_path / f"rank{rank}.json").write_text(json.dumps(accelerator.told))
    dist.barrier()


def test_each_rank_is_set_on_its_local_device(tmp_path):
    """The model is built and the ranks talk before DeepSpeed's engine would set the device,
    and on GPUs every rank would otherwise use device 0: two real processes join a Gloo group
    through init_distributed, DeepSpeed's CPU accelerator recording what it is told."""
    mp.start_processes(_rank, args=(tmp_path, dist.free_port()), nprocs=2, start_method="spawn")
    told = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    # device r for local rank r, once the group exists (before the first collective), once
    assert told == [[[0, True]], [[1, True]]]
