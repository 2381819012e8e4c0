"""The model states a live DeepSpeed engine allocates, against the planner's (launched on
2 ranks by tests/e2e/test_plan_memory.py).

    deepspeed --num_gpus 2 tests/allocated_model_states.py --data DIR --run-dir DIR --out FILE

For each ZeRO stage in bf16 (and ZeRO-1 in fp32), one Trainer on a ~3.4M-parameter
model takes two steps of two micro-batches. After each backward pass (the gradients held
whole or in part, the activations freed), when the engine's optimizer steps, and each
time that calls its base optimizer (per parameter group or ZeRO-3 sub-group, the fp32
gradients made), the bytes of every live tensor's storage are summed: once per storage
(views share one), with the gradients autograd made (no Python object until asked for).
Storage bytes are what a GPU's allocator holds, whether or not the pages were written.
The largest figure of the second step (the moments exist from the first) less the
figure before the Trainer was built, on the rank holding the most, is the measured model
state; rank 0 writes [{"zero_stage", "precision", "measured", "predicted"}, ...] to FILE.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers import TINY_CONFIG  # noqa: E402

from megatrain.config import load_config  # noqa: E402
from megatrain.layout import Layout  # noqa: E402
from megatrain.plan import per_rank_bytes  # noqa: E402
from megatrain.train import Trainer  # noqa: E402
from megatrain.train import distributed as dist  # noqa: E402
from megatrain.train.callbacks import Callback  # noqa: E402

MEASURED_STEP = 2  # the moments exist from the first step
MODEL = [
    "model.n_layer=4",
    "model.d_model=256",
    "model.n_head=4",
    "train.max_steps=2",
    "train.eval_every=0",
    "checkpoint.every_steps=0",
    "spike.enabled=false",
    # A small reduce bucket, so that the model states are what is measured.
    "deepspeed.zero_optimization.reduce_bucket_size=100000",
]


def tensor_bytes() -> int:
    tensors = [o for o in gc.get_objects() if isinstance(o, torch.Tensor)]
    tensors += [t.grad for t in tensors if t.grad is not None]
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())


class AllocatedTensors(Callback):
    name = "allocated_model_states"

    def __init__(self):
        self.counts: list[int] = []  # bytes, at each point of the measured step

    def on_start(self, trainer):
        engine_optimizer = trainer.module.engine.optimizer
        base = getattr(
            engine_optimizer, "optimizer", engine_optimizer
        )  # ZeRO's, or DeepSpeed's bf16 wrapper's
        for optimizer in {id(o): o for o in (engine_optimizer, base)}.values():
            self._count_before(optimizer, "step", trainer)
        self._count_before(trainer.module.engine, "backward", trainer, after=True)

    def _count_before(self, owner, method: str, trainer, after: bool = False):
        call = getattr(owner, method)

        def count():
            if trainer.progress.step + 1 == MEASURED_STEP:  # counting is slow: the one step that is used
                gc.collect()
                self.counts.append(tensor_bytes())

        def counted(*args, **kwargs):
            if not after:
                count()
            out = call(*args, **kwargs)
            if after:
                count()
            return out

        setattr(owner, method, counted)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--run-dir", required=True)
    p.add_argument("--local_rank", type=int, default=None)
    args = p.parse_args()
    results = []
    for precision, stages in (("bf16", range(4)), ("fp32", [1])):
        for stage in stages:
            cfg = load_config(
                TINY_CONFIG,
                [
                    f"run.dir={args.run_dir}/z{stage}-{precision}",
                    f"data.path={args.data}",
                    f"parallel.zero_stage={stage}",
                    f"train.precision={precision}",
                    *MODEL,
                ],
            )
            gc.collect()
            before = tensor_bytes()
            probe = AllocatedTensors()
            trainer = Trainer(cfg, resume="none", callbacks=[probe])
            trainer.fit()
            predicted = per_rank_bytes(cfg, trainer.model_cfg, Layout.from_config(cfg, dist.world_size()))
            results.append(
                {
                    "zero_stage": stage,
                    "precision": precision,
                    "measured": max(dist.all_gather_object(max(probe.counts) - before)),
                    "predicted": predicted["params"] + predicted["grads"] + predicted["optimizer"],
                }
            )
            del trainer, probe
            gc.collect()
    if dist.is_main():
        Path(args.out).write_text(json.dumps(results, indent=1))
    dist.shutdown()
    sys.stdout.flush()
    os._exit(0)  # as launch/_cli.py leaves a process with Gloo's threads


if __name__ == "__main__":
    main()
