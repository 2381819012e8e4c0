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

from _bench import arg_parser, launched_step_time, machine, print_table, stdlib_data, write_json

import shutil
import tempfile
from pathlib import Path

MODEL = [
    "model.n_layer=4",
    "model.d_model=128",
    "model.n_head=4",
    "train.seq_len=64",
    "train.micro_batch=4",
    "train.eval_samples=0",
    "checkpoint.every_steps=0",
    "logging.progress=false",
    "schedule.warmup_tokens=0",
    "schedule.lr_shape=constant",
    "schedule.batch_ramp_tokens=0",
    "train.peak_flops=1e11",
    "train.precision=fp32",
]


def step_time(work: Path, data: Path, stages: int, micro_batches: int, steps: int) -> float:
    tokens = micro_batches * 4 * 64  # one data-parallel rank in both layouts
    # One thread per process: P=1 gets 1 core, P=2 gets 2.
    return launched_step_time(
        work / f"p{stages}-m{micro_batches}",
        [
            *MODEL,
            f"data.path={data}",
            f"parallel.pipeline_stages={stages}",
            "parallel.zero_stage=1",
            f"schedule.batch_final_tokens={tokens}",
            f"train.max_steps={steps}",
            "train.max_tokens=null",
        ],
        nproc=stages,
    )


def main():
    p = arg_parser(__doc__)
    p.add_argument("--micro-batches", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--steps", type=int, default=6)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-pipe-"))
    data = stdlib_data(work)
    P, rows, results = 2, [], []
    for m in args.micro_batches:
        t1 = step_time(work, data, 1, m, args.steps)
        t2 = step_time(work, data, P, m, args.steps)
        efficiency, ideal = t1 / (P * t2), m / (m + P - 1)
        results.append(
            {
                "micro_batches": m,
                "p1_step_s": t1,
                "p2_step_s": t2,
                "efficiency": efficiency,
                "ideal_efficiency": ideal,
                "bubble": 1 - efficiency,
                "ideal_bubble": 1 - ideal,
            }
        )
        rows.append(
            [
                m,
                t1,
                t2,
                f"{t1 / t2:.2f}x",
                f"{efficiency:.2f}",
                f"{ideal:.2f}",
                f"{1 - efficiency:.2f}",
                f"{1 - ideal:.2f}",
            ]
        )
    print_table(
        f"pipeline P={P} vs P=1, same global batch (micro batch 4 x 64 tokens, 1 thread per process)",
        [
            "m",
            "P=1 s/step",
            "P=2 s/step",
            "speedup",
            "efficiency",
            "ideal m/(m+P-1)",
            "bubble",
            "ideal bubble",
        ],
        rows,
    )
    shutil.rmtree(work, ignore_errors=True)
    write_json(args.json, {"machine": machine(), "stages": P, "rows": results})


if __name__ == "__main__":
    main()
