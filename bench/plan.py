"""The planner against measured memory on this machine: the peak resident memory a training
process adds (from just before the Trainer is built to the end of a few steps) against the
planner's per-rank prediction, for the ~20M-parameter model of bench/train.py on one rank
(DeepSpeed's CPU accelerator: the device memory is the host's).

What the measurement also holds that the planner does not model for a GPU: DeepSpeed's
engine and shared-memory communication buffers, pages of the memory-mapped token shards,
torch's CPU allocator caching. So the ratio says how much of a real process the model
explains here; it is not the GPU check (no GPU has been lent to this project).

    python bench/plan.py [--json FILE] [--steps 4]
"""

from __future__ import annotations

from _bench import arg_parser, machine, print_table, write_json

import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from megatrain.data import prepare_dataset
from tokenizer import TrainerOptions, train_tokenizer

REPO = Path(__file__).resolve().parents[1]
MODEL = ["model.n_layer=10", "model.d_model=384", "model.n_head=6", "train.seq_len=256", "train.micro_batch=4",
         "schedule.batch_final_tokens=2048", "schedule.batch_ramp_tokens=0", "train.eval_samples=0",
         "checkpoint.every_steps=0", "logging.progress=false", "schedule.warmup_tokens=0", "train.peak_flops=1e11",
         "spike.enabled=false"]
LAYOUTS = {
    "ZeRO-0 fp32": ["parallel.zero_stage=0", "train.precision=fp32"],
    "ZeRO-0 fp32, activation checkpointing": ["parallel.zero_stage=0", "train.precision=fp32",
                                              "model.activation_checkpointing=true"],
    "ZeRO-2 fp32": ["parallel.zero_stage=2", "train.precision=fp32"],
    "ZeRO-0 bf16": ["parallel.zero_stage=0", "train.precision=bf16"],
}


def child(sets: list[str]) -> None:
    """One training process: RSS before the Trainer, peak RSS after, and the prediction."""
    import psutil

    from megatrain.config import load_config
    from megatrain.model import GPTConfig
    from megatrain.plan import Layout, per_rank_bytes
    from megatrain.train import Trainer
    from megatrain.train import distributed as dist

    cfg = load_config(REPO / "configs" / "tiny-cpu.yaml", sets)
    before = psutil.Process().memory_info().rss
    trainer = Trainer(cfg, resume="none")
    predicted = per_rank_bytes(cfg, GPTConfig.from_config(cfg, trainer.model_cfg.vocab_size),
                               Layout.from_config(cfg, 1))
    trainer.fit()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print("RESULT " + json.dumps({"measured": peak - before, "predicted": predicted}), flush=True)
    dist.shutdown()


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        return child(sys.argv[2:])
    p = arg_parser(__doc__)
    p.add_argument("--steps", type=int, default=4)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-plan-"))
    train_tokenizer(["builtin:stdlib"], work / "tok", TrainerOptions(vocab_size=4096, sample_bytes=int(3e6)),
                    progress=False)
    prepare_dataset(work / "tok", ["builtin:stdlib"], work / "data", valid_fraction=0.0, progress=False)
    rows, results = [], {}
    for name, sets in LAYOUTS.items():
        full = [*MODEL, *sets, f"run.dir={work / 'run'}", f"data.path={work / 'data'}", f"train.max_steps={args.steps}",
                "train.max_tokens=null"]
        proc = subprocess.run([sys.executable, __file__, "--child", *full], capture_output=True, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "2"})
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            raise RuntimeError(f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        got = json.loads(line.removeprefix("RESULT "))
        shutil.rmtree(work / "run", ignore_errors=True)
        pred = got["predicted"]
        model_part = pred["total"] - pred["allowance"]
        results[name] = got
        rows.append([name, got["measured"] / 2**20, pred["total"] / 2**20, model_part / 2**20,
                     f"{got['measured'] / pred['total']:.2f}"])
    print_table("the planner against one CPU process's peak resident memory (MiB), ~20M parameters",
                ["layout", "measured", "predicted total", "predicted without allowance", "measured/predicted"], rows)
    shutil.rmtree(work, ignore_errors=True)
    write_json(args.json, {"machine": machine(), "layouts": results})


if __name__ == "__main__":
    main()
