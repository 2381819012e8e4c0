"""Checkpoint stall: synchronous saves against background ones (checkpoint.async_save).

A ~100M-parameter GPT (12 x 768, GPT-3 Small's blocks) on 2 ranks through the real
deepspeed launcher, ZeRO-2 and ZeRO-3, fp32, a checkpoint every 4 steps: each layout is run
once with synchronous checkpoints and once with background ones, alternately, in one
invocation. Per checkpoint, from metrics.jsonl: the step loop's stall (synchronous: the
whole save; background: the copy into host memory plus any wait for the write), the
background write's own time, and the steps' time while a write runs against the steps
with none. Goal: the stall at most 15% of the synchronous save.

    python bench/checkpoint.py [--json FILE] [--stages 2 3] [--steps 16]
"""

from __future__ import annotations

from _bench import REPO, arg_parser, machine, print_table, stdlib_data, write_json

import statistics
import subprocess
import tempfile
from pathlib import Path

from helpers import pretrain_command

from megatrain.model import GPTConfig, param_count
from megatrain.train.metrics import read_metrics

MODEL = (
    "model.n_layer=12 model.d_model=768 model.n_head=12 train.seq_len=128 train.micro_batch=1 "
    "schedule.batch_final_tokens=256 schedule.batch_ramp_tokens=0 schedule.warmup_tokens=0 "
    "train.eval_every=0 train.max_tokens=null spike.enabled=false"
).split()
EVERY = 4


def run(work: Path, data: Path, stage: int, background: bool, steps: int) -> dict:
    run_dir = work / f"zero{stage}-{'async' if background else 'sync'}"
    sets = [
        *MODEL,
        f"run.dir={run_dir}",
        f"data.path={data}",
        f"parallel.zero_stage={stage}",
        f"train.max_steps={steps}",
        f"checkpoint.every_steps={EVERY}",
        "checkpoint.keep=1",
        f"checkpoint.async_save={str(background).lower()}",
    ]
    cmd = pretrain_command(REPO / "configs" / "tiny-cpu.yaml", sets, nproc=2, resume="none")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    rows = read_metrics(run_dir)
    train = {r["step"]: r["step_time"] for r in rows if r["kind"] == "train"}
    saves = [r for r in rows if r["kind"] == "checkpoint" and r["step"] < steps]  # the final one waits
    writing = {s for c in saves for s in range(c["step"] + 1, c.get("published_at_step", c["step"]) + 1)}
    quiet = [t for s, t in train.items() if s > 2 and s not in writing and s % EVERY]
    return {
        "stall_s": statistics.median(c["stall_s"] for c in saves),
        "write_s": statistics.median(c["write_s"] for c in saves) if background else None,
        "steps_during_write": len(writing),
        "step_s_writing": statistics.median(train[s] for s in writing) if writing else None,
        "step_s_quiet": statistics.median(quiet),
        "checkpoint_mib": saves[0].get("bytes", 0) / 2**20 if background else None,
    }


def main() -> None:
    p = arg_parser(__doc__)
    p.add_argument("--stages", type=int, nargs="+", default=[2, 3])
    p.add_argument("--steps", type=int, default=16)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = stdlib_data(work, vocab_size=4096)
        from megatrain.config import load_config

        cfg = load_config(REPO / "configs" / "tiny-cpu.yaml", [*MODEL, "train.max_steps=1"])
        params = param_count(GPTConfig.from_config(cfg, 4096))
        results = {}
        for stage in args.stages:
            for background in (False, True):  # side by side: sync, async, sync, async
                results[f"zero{stage}-{'async' if background else 'sync'}"] = run(
                    work, data, stage, background, args.steps
                )
    rows = []
    for stage in args.stages:
        sync, bg = results[f"zero{stage}-sync"], results[f"zero{stage}-async"]
        share = bg["stall_s"] / sync["stall_s"]
        bg["stall_share_of_sync"] = share
        rows.append([f"ZeRO-{stage}", "synchronous", sync["stall_s"], "-", "-", sync["step_s_quiet"], "-"])
        rows.append(
            [
                f"ZeRO-{stage}",
                "background",
                bg["stall_s"],
                bg["write_s"],
                bg["step_s_writing"] or "-",
                bg["step_s_quiet"],
                f"{100 * share:.1f}%",
            ]
        )
    print_table(
        f"Checkpoint stall, {params / 1e6:.0f}M parameters, 2 ranks, fp32 "
        "(seconds, medians over the checkpoints)",
        ["layout", "checkpoints", "stall", "write", "step while writing", "step otherwise", "stall / sync"],
        rows,
    )
    write_json(args.json, {"machine": machine(), "params": params, "every": EVERY, "results": results})


if __name__ == "__main__":
    main()
