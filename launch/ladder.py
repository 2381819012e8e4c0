"""Train a model ladder for a target config and collect its final losses (docs/scaling.md).

    python launch/ladder.py --config configs/gpt3-1.3b.yaml --out runs/ladder --sizes 5 \\
        --multiples 0.5 1 2 4 [--mode branches|runs] [--nproc 8] [--print]

Smaller models of the target's family (megatrain/scaling/ladder.py: the shape rule and the
learning-rate rule), each trained to --multiples x --ratio (20) tokens per parameter: in
branches mode (default) one warmup-stable-decay run per size to its longest budget, the
shorter budgets cooled down from its checkpoints (launch/cooldown.py); in runs mode one run
per budget. Runs one after another here, or with --print writes the commands (normal
`deepspeed launch/pretrain.py` ones) for a cluster. Stopped and run again, it reuses finished
runs and resumes unfinished ones. OUT/ladder.csv and ladder.json: one row per finished run
(params, non-embedding params, tokens, FLOPs, final held-out loss and bits per byte), what
launch/scaling.py --points reads.
"""

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

from megatrain.config import load_config
from megatrain.data.shards import read_manifest
from megatrain.errors import UserError
from megatrain.model import GPTConfig
from megatrain.scaling import branch_overrides
from megatrain.scaling import ladder as lad
from megatrain.train.distributed import free_port

from _cli import run

LAUNCH = Path(__file__).resolve().parent


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, required=True, help="the target's config")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="for the target and every run"
    )
    p.add_argument(
        "--out", type=Path, required=True, help="the ladder's directory (one run directory per run)"
    )
    p.add_argument("--sizes", type=int, default=4, help="models in the ladder (4)")
    p.add_argument("--smallest", type=float, help="non-embedding parameters of the smallest (largest / 30)")
    p.add_argument("--largest", type=float, help="non-embedding parameters of the largest (target's / 100)")
    p.add_argument("--ratio", type=float, default=20.0, help="tokens per parameter (Chinchilla's 20)")
    p.add_argument(
        "--multiples", type=float, nargs="+", default=[0.5, 1.0, 2.0], help="of the ratio (0.5 1 2)"
    )
    p.add_argument("--mode", choices=["branches", "runs"], default="branches")
    p.add_argument("--fraction", type=float, default=0.2, help="the cooldown's share of each budget (0.2)")
    p.add_argument("--lr-exponent", type=float, default=0.8, help="lr = target's x (d_target / d)^this (0.8)")
    p.add_argument(
        "--batch-tokens",
        type=int,
        help="global batch of every run (default: the target's, "
        "at most a 50th of the smallest budget, in whole micro-batches)",
    )
    p.add_argument("--nproc", type=int, default=1, help="ranks per run on this node (1: no launcher)")
    p.add_argument("--print", action="store_true", help="write the commands instead of running them")
    return p.parse_args()


def main():
    args = parse_args()
    target = load_config(args.config, args.set)
    vocab = (
        target.model.vocab_size or read_manifest(Path(target.data.sources()[0][0]) / "train")["vocab_size"]
    )
    full = GPTConfig.from_config(target, vocab)
    largest = args.largest or lad.Rung("target", full, target.optim.lr).non_embedding / 100
    rungs = lad.rungs(target, vocab, args.sizes, args.smallest or largest / 30, largest, args.lr_exponent)
    unit = target.train.micro_batch * target.train.seq_len * args.nproc
    smallest_budget = min(args.multiples) * args.ratio * min(r.params for r in rungs)
    batch = args.batch_tokens or max(
        unit, min(target.schedule.batch_final_tokens, int(smallest_budget / 50)) // unit * unit
    )
    jobs = lad.jobs(
        rungs,
        args.ratio,
        args.multiples,
        args.out.resolve(),
        args.mode,
        args.fraction,
        batch,
        target.schedule.warmup_tokens,
    )
    print(f"ladder: {len(rungs)} sizes, {len(jobs)} runs, global batch {batch} tokens, in {args.out}")
    for r in rungs:
        print(f"  {r.name}: {r.params:,} parameters ({r.non_embedding:,} without embeddings), lr {r.lr:.3g}")
    if args.print:
        for job in jobs:
            if job.trunk is not None:
                print(f"# once {job.trunk} has finished: this prints the branch's command")
            print(shlex.join(command(args, job)))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    for i, job in enumerate(jobs, 1):
        if lad.result(job.run_dir) is not None:
            print(
                f"[{i}/{len(jobs)}] {job.run_dir.name} of {job.rung.name}: finished before, reused",
                flush=True,
            )
            continue
        print(f"[{i}/{len(jobs)}] {job.run_dir.name} of {job.rung.name}: training", flush=True)
        proc = subprocess.run(
            command(args, job), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        if proc.returncode != 0:
            last = proc.stderr.strip().splitlines()[-1:] or ["(no output)"]
            raise UserError(
                f"{job.run_dir}: the run failed (exit {proc.returncode}): {last[0]}; rerun to resume"
            )
        lad.write_table(lad.table(jobs), args.out)
    rows = lad.table(jobs)
    lad.write_table(rows, args.out)
    for r in rows:
        bpb = r["bpb"] or float("nan")
        print(f"  {r['rung']:>16} {r['tokens']:>12,} tokens  loss {r['loss']:.4f}  bpb {bpb:.4f}")
    table = args.out / "ladder.csv"
    print(f"wrote {table} and ladder.json: launch/scaling.py --points {table}")


def command(args, job: lad.Job) -> list[str]:
    """The run's command: on the target's config with the rung's overrides, or for a branch on
    its trunk's config.yaml (launch/cooldown.py's command; with --print, cooldown.py itself)."""
    if job.trunk is not None and args.print:
        return [
            sys.executable,
            str(LAUNCH / "cooldown.py"),
            str(job.trunk),
            "--budget",
            str(job.tokens),
            "--fraction",
            str(args.fraction),
            "--run-dir",
            str(job.run_dir),
            "--nproc",
            str(args.nproc),
        ]
    if job.trunk is not None:
        config, sets = (
            job.trunk / "config.yaml",
            branch_overrides(job.trunk, job.tokens, args.fraction, job.run_dir),
        )
    else:
        config, sets = args.config, [*args.set, *job.sets]
    script = [str(LAUNCH / "pretrain.py"), "--config", str(config), *(a for s in sets for a in ("--set", s))]
    script += ["--resume", "auto"]
    if args.print:
        return ["deepspeed", "--num_gpus", str(args.nproc), *script]
    if args.nproc == 1:
        return [sys.executable, *script]
    return ["deepspeed", "--num_gpus", str(args.nproc), "--master_port", str(free_port()), *script]


if __name__ == "__main__":
    run(main)
