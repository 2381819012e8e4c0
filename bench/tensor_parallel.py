"""Tensor parallelism: step time of T=2 (DeepSpeed AutoTP, 2 processes) against one process
on the same global batch, for the ~20M-parameter model of bench/train.py.

Rows: one process on one thread, one process on two threads (the same cores T=2 gets),
and T=2 with one thread per process; ZeRO-1, fp32, through the real deepspeed launcher.
Efficiency = T(1 process, 1 thread) / (2 x T(T=2)). What a CPU can show: the cost of
the split (smaller matmuls, two all-reduces of activations per block in forward and
backward, through shared memory here); not what NVLink-connected GPUs pay, where the
all-reduces run at hundreds of GB/s and the split matmuls stay large.

    python bench/tensor_parallel.py [--json FILE] [--steps 6]
"""

from __future__ import annotations

from _bench import GPT_20M, arg_parser, launched_step_time, machine, print_table, stdlib_data, write_json

import shutil
import tempfile
from pathlib import Path

MODEL = [
    *GPT_20M,
    "train.eval_samples=0",
    "checkpoint.every_steps=0",
    "logging.progress=false",
    "schedule.warmup_tokens=0",
    "schedule.lr_shape=constant",
    "train.peak_flops=1e11",
    "train.precision=fp32",
    "parallel.zero_stage=1",
]


def step_time(work: Path, data: Path, tp: int, threads: int, steps: int) -> float:
    return launched_step_time(
        work / f"tp{tp}-t{threads}",
        [
            *MODEL,
            f"data.path={data}",
            f"parallel.tensor_parallel={tp}",
            f"train.max_steps={steps}",
            "train.max_tokens=null",
        ],
        nproc=tp,
        threads=threads,
    )


def main():
    p = arg_parser(__doc__)
    p.add_argument("--steps", type=int, default=6)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-tp-"))
    data = stdlib_data(work)
    layouts = [("1 process, 1 thread", 1, 1), ("1 process, 2 threads", 1, 2), ("T=2, 1 thread each", 2, 1)]
    times = {name: step_time(work, data, tp, threads, args.steps) for name, tp, threads in layouts}
    base = times["1 process, 1 thread"]
    rows = [[name, t, f"{base / t:.2f}x"] for name, t in times.items()]
    efficiency = base / (2 * times["T=2, 1 thread each"])
    print_table(
        "tensor parallel T=2 vs one process, same global batch (2048 tokens, ~20M parameters, fp32)",
        ["layout", "s/step", "speedup"],
        rows,
    )
    print(f"T=2 efficiency on 2 cores: {efficiency:.2f}")
    shutil.rmtree(work, ignore_errors=True)
    write_json(args.json, {"machine": machine(), "step_s": times, "tp2_efficiency": efficiency})


if __name__ == "__main__":
    main()
