"""Each rank of a node is put on its own device when the process group starts: the model
is built and the ranks talk before DeepSpeed's engine would set it, and on GPUs every rank
would otherwise use device 0. Two real processes join a Gloo group through
distributed.init_distributed, with DeepSpeed's CPU accelerator recording what it is told."""

from __future__ import annotations

import json
import os

import torch.multiprocessing as mp

from megatrain.train import distributed as dist


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
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_SIZE": "2",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    dist.init_distributed()
    (tmp_path / f"rank{rank}.json").write_text(json.dumps(accelerator.told))
    dist.barrier()


def test_each_rank_is_set_on_its_local_device(tmp_path):
    mp.start_processes(_rank, args=(tmp_path, dist.free_port()), nprocs=2, start_method="spawn")
    told = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    # device r for local rank r, once the group exists (before the first collective), once
    assert told == [[[0, True]], [[1, True]]]
