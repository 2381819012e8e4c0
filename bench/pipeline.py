"""Pipeline efficiency: step time of a 2-stage pipeline against one process, by micro-batches.

For m = 1, 2, 4, 8, 16 micro-batches per step: the step time with P=2 stages (2
processes) and with P=1 (1 process) on the same global batch, each process one thread,
through the real deepspeed launcher. Efficiency = T(P=1) / (P x T(P=2)); the ideal of
DeepSpeed's 1F1B schedule is m / (m + P - 1), so the bubble is (P - 1) / (m + P - 1).
The table puts the measured bubble (1 - efficiency) next to that; communication and
the embedding/head imbalance between stages add to the measured one.

    python bench/pipeline.py [--json FILE] [--micro-batches 1 2 4 8 16] [--steps 6]
"""

from __future__ import annotations

from _bench import arg_parser, machine, print_table, write_json

import os
import shutil
import statistics
import subprocess
import tempfile
from pathlib import Path

from helpers import REPO, pretrain_command

from megatrain.data import prepare_dataset
from megatrain.train.metrics import read_metrics
from tokenizer import TrainerOptions, train_tokenizer

MODEL = ["model.n_layer=4", "model.d_model=128", "model.n_head=4", "train.seq_len=64", "train.micro_batch=4",
         "train.eval_samples=0", "checkpoint.every_steps=0", "logging.progress=false", "schedule.warmup_tokens=0",
         "schedule.lr_shape=constant", "schedule.batch_ramp_tokens=0", "train.peak_flops=1e11", "train.precision=fp32"]


def step_time(work: Path, data: Path, stages: int, micro_batches: int, steps: int) -> float:
    run = work / f"p{stages}-m{micro_batches}"
    tokens = micro_batches * 4 * 64  # one data-parallel rank in both layouts
    cmd = pretrain_command(REPO / "configs" / "tiny-cpu.yaml",
                           [*MODEL, f"run.dir={run}", f"data.path={data}", f"parallel.pipeline_stages={stages}",
                            "parallel.zero_stage=1", f"schedule.batch_final_tokens={tokens}",
                            f"train.max_steps={steps}", "train.max_tokens=null"], nproc=stages, resume="none")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # one core per process: P=1 gets 1 core, P=2 gets 2
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    times = [r["step_time"] for r in read_metrics(run) if r["kind"] == "train"][2:]  # after warm-up
    shutil.rmtree(run, ignore_errors=True)
    return statistics.median(times)


def main():
    p = arg_parser(__doc__)
    p.add_argument("--micro-batches", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--steps", type=int, default=6)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-pipe-"))
    train_tokenizer(["builtin:stdlib"], work / "tok", TrainerOptions(vocab_size=4096, sample_bytes=int(3e6)),
                    progress=False)
    prepare_dataset(work / "tok", ["builtin:stdlib"], work / "data", valid_fraction=0.0, progress=False)
    P, rows, results = 2, [], []
    for m in args.micro_batches:
        t1 = step_time(work, work / "data", 1, m, args.steps)
        t2 = step_time(work, work / "data", P, m, args.steps)
        efficiency, ideal = t1 / (P * t2), m / (m + P - 1)
        results.append({"micro_batches": m, "p1_step_s": t1, "p2_step_s": t2, "efficiency": efficiency,
                        "ideal_efficiency": ideal, "bubble": 1 - efficiency, "ideal_bubble": 1 - ideal})
        rows.append([m, t1, t2, f"{t1 / t2:.2f}x", f"{efficiency:.2f}", f"{ideal:.2f}", f"{1 - efficiency:.2f}",
                     f"{1 - ideal:.2f}"])
    print_table(f"pipeline P={P} vs P=1, same global batch (micro batch 4 x 64 tokens, 1 thread per process)",
                ["m", "P=1 s/step", "P=2 s/step", "speedup", "efficiency", "ideal m/(m+P-1)", "bubble",
                 "ideal bubble"], rows)
    shutil.rmtree(work, ignore_errors=True)
    write_json(args.json, {"machine": machine(), "stages": P, "rows": results})


if __name__ == "__main__":
    main()
