"""The planner against measured memory on this machine: the peak resident memory each
training rank adds (from just before the Trainer is built to the end of a few steps)
against the planner's per-rank prediction, for small configs spanning ZeRO 0-3, a 2-stage
pipeline, activation checkpointing on and off, two sequence lengths, a model whose
vocabulary dominates on one rank and split over 2 tensor-parallel ranks, tensor
parallelism with and without sequence parallelism, and a model whose experts dominate with
every rank keeping every expert or each 1/E of them (DeepSpeed's CPU accelerator: the device
memory is the host's). Multi-rank layouts go through the real
launcher; each rank measures itself and the largest is reported.

What a CPU cannot show about GPUs: the CUDA caching allocator's fragmentation and NCCL's
buffers (the planner's 10% and 1 GiB stand for them, unmeasured); what it shows instead
is a CPU process's own overhead (the planner's 160 MiB for the CPU accelerator, measured
here).

    python bench/plan.py [--json FILE] [--steps 4] [--only TEXT]
"""

from __future__ import annotations

from _bench import REPO, arg_parser, machine, print_table, stdlib_data, write_json

import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from helpers import DEEPSPEED

from megatrain.train.distributed import free_port

MODEL = [
    "model.n_layer=10",
    "model.d_model=384",
    "model.n_head=6",
    "train.micro_batch=4",
    "schedule.batch_ramp_tokens=0",
    "train.eval_samples=0",
    "checkpoint.every_steps=0",
    "logging.progress=false",
    "schedule.warmup_tokens=0",
    "train.peak_flops=1e11",
    "spike.enabled=false",
    "train.precision=fp32",
]
SEQ256 = ["train.seq_len=256", "schedule.batch_final_tokens=2048"]
# A model whose vocabulary dominates (8.4M of its 10M parameters in the tied table; the 4096
# pieces of the tokenizer padded to 32768 rows), where splitting the vocabulary shows.
VOCAB_HEAVY = ["model.vocab_size=32768", "model.n_layer=2", "model.d_model=256", "model.n_head=4", *SEQ256]
# Activations dominating (the model's 10 blocks at 1024 positions), where splitting the
# sequence between the tensor-parallel regions shows.
SEQ1024 = ["train.seq_len=1024", "schedule.batch_final_tokens=4096"]
# Experts dominating (8 experts of width 1536 in each of 4 blocks: 38M of the model's 45M
# parameters), where keeping 1/E of them per rank shows.
EXPERT_HEAVY = [
    "model.n_layer=4",
    "model.moe.experts=8",
    "model.moe.top_k=2",
    "model.moe.ffn_hidden=1536",
    "schedule.batch_final_tokens=4096",
    *SEQ256[:1],
]
LAYOUTS = {  # name: (ranks, settings)
    "ZeRO-0, seq 256": (1, ["parallel.zero_stage=0", *SEQ256]),
    "ZeRO-0, seq 256, activation checkpointing": (
        1,
        ["parallel.zero_stage=0", *SEQ256, "model.activation_checkpointing=true"],
    ),
    "ZeRO-0, seq 512": (
        1,
        ["parallel.zero_stage=0", "train.seq_len=512", "schedule.batch_final_tokens=4096"],
    ),
    "ZeRO-2, seq 256": (1, ["parallel.zero_stage=2", *SEQ256]),
    "ZeRO-1, 2 ranks": (2, ["parallel.zero_stage=1", *SEQ256]),
    "ZeRO-3, 2 ranks": (2, ["parallel.zero_stage=3", *SEQ256]),
    "2-stage pipeline, ZeRO-1": (2, ["parallel.pipeline_stages=2", "parallel.zero_stage=1", *SEQ256]),
    "vocabulary-heavy, 1 rank, ZeRO-0": (1, ["parallel.zero_stage=0", *VOCAB_HEAVY]),
    "vocabulary-heavy, tensor parallel 2, ZeRO-0": (
        2,
        ["parallel.tensor_parallel=2", "parallel.zero_stage=0", *VOCAB_HEAVY],
    ),
    "vocabulary-heavy, tensor parallel 2, sequence parallel, ZeRO-0": (
        2,
        [
            "parallel.tensor_parallel=2",
            "parallel.sequence_parallel=true",
            "parallel.zero_stage=0",
            *VOCAB_HEAVY,
        ],
    ),
    "seq 1024, tensor parallel 2, ZeRO-0": (
        2,
        ["parallel.tensor_parallel=2", "parallel.zero_stage=0", *SEQ1024],
    ),
    "seq 1024, tensor parallel 2, sequence parallel, ZeRO-0": (
        2,
        ["parallel.tensor_parallel=2", "parallel.sequence_parallel=true", "parallel.zero_stage=0", *SEQ1024],
    ),
    "expert-heavy, 2 ranks, ZeRO-0": (2, ["parallel.zero_stage=0", *EXPERT_HEAVY]),
    "expert-heavy, 2 ranks, expert-parallel 2, ZeRO-0": (
        2,
        ["parallel.zero_stage=0", "parallel.expert_parallel=2", *EXPERT_HEAVY],
    ),
    "expert-heavy, 4 ranks, ZeRO-1": (4, ["parallel.zero_stage=1", *EXPERT_HEAVY]),
    "expert-heavy, 4 ranks, expert-parallel 2, ZeRO-1": (
        4,
        ["parallel.zero_stage=1", "parallel.expert_parallel=2", *EXPERT_HEAVY],
    ),
}


def child(sets: list[str]) -> None:
    """One training rank: its RSS before the Trainer, its peak RSS after, the prediction."""
    import psutil

    from megatrain.config import load_config
    from megatrain.layout import Layout
    from megatrain.plan import plan
    from megatrain.train import Trainer
    from megatrain.train import distributed as dist

    cfg = load_config(
        REPO / "configs" / "tiny-cpu.yaml", [s for s in sets if not s.startswith("--local_rank")]
    )
    before = psutil.Process().memory_info().rss
    trainer = Trainer(cfg, resume="none")
    predicted = plan(
        cfg,
        trainer.model_cfg,
        Layout.from_config(cfg, dist.world_size()),
        device_memory=float("inf"),
        peak_flops=1.0,
        on_gpu=False,
    )["per_rank_bytes"]
    trainer.fit()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(
        "RESULT " + json.dumps({"rank": dist.rank(), "measured": peak - before, "predicted": predicted}),
        flush=True,
    )
    dist.shutdown()


def main():
    if "--child" in sys.argv:  # the launcher puts its --local_rank first
        return child(sys.argv[sys.argv.index("--child") + 1 :])
    p = arg_parser(__doc__)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--only", metavar="TEXT", help="only the layouts whose name contains TEXT")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-plan-"))
    data = stdlib_data(work)
    rows, results = [], {}
    for name, (ranks, sets) in LAYOUTS.items():
        if args.only and args.only not in name:
            continue
        full = [
            *MODEL,
            *sets,
            f"run.dir={work / 'run'}",
            f"data.path={data}",
            f"train.max_steps={args.steps}",
            "train.max_tokens=null",
        ]
        launcher = (
            [DEEPSPEED, "--num_gpus", str(ranks), "--master_port", str(free_port())]
            if ranks > 1
            else [sys.executable]
        )
        proc = subprocess.run(
            [*launcher, __file__, "--child", *full],
            capture_output=True,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        # The ranks print into one pipe: their lines can run into each other.
        found = [json.loads(x) for x in re.findall(r"RESULT (\{.*?\})(?=RESULT|\n|$)", proc.stdout)]
        if len(found) != ranks:
            raise RuntimeError(f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        shutil.rmtree(work / "run", ignore_errors=True)
        worst = max(found, key=lambda r: r["measured"])
        pred = max(r["predicted"]["total"] for r in found)
        error = worst["measured"] / pred - 1
        results[name] = {"ranks": found, "measured": worst["measured"], "predicted": pred, "error": error}
        rows.append([name, ranks, worst["measured"] / 2**20, pred / 2**20, f"{error:+.0%}"])
    print_table(
        "the planner against each rank's measured peak resident memory (MiB), ~20M parameters "
        "(vocabulary-heavy: 10M), fp32",
        ["layout", "ranks", "measured", "predicted", "error"],
        rows,
    )
    shutil.rmtree(work, ignore_errors=True)
    write_json(args.json, {"machine": machine(), "layouts": results})


if __name__ == "__main__":
    main()
