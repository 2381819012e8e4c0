"""The command of a cooldown branch: a warmup-stable-decay trunk's final loss at a token budget.

    python launch/cooldown.py runs/trunk --budget 2e9 [--fraction 0.2] [--run-dir DIR] [--nproc 8]

prints a normal `deepspeed launch/pretrain.py` command on the trunk's config.yaml that starts
from the trunk's newest checkpoint at or before budget x (1 - fraction) (run.branch_from) and
cools down from there to the budget, in its own run directory (default TRUNK-cool-BUDGET).
Run it as it is, under launch/supervise.py, or on a cluster (docs/scaling.md).
"""

import argparse
import shlex
from pathlib import Path

from megatrain.scaling import branch_overrides

from _cli import run


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("trunk", type=Path, help="the warmup-stable-decay run directory")
    p.add_argument("--budget", type=float, required=True, help="tokens the branch ends at")
    p.add_argument("--fraction", type=float, default=0.2, help="the cooldown's share of the budget (0.2)")
    p.add_argument("--run-dir", type=Path, help="the branch's run directory (default TRUNK-cool-BUDGET)")
    p.add_argument("--nproc", type=int, default=1, help="ranks of the deepspeed launcher on this node")
    args = p.parse_args()
    budget = int(args.budget)
    run_dir = args.run_dir or args.trunk.with_name(f"{args.trunk.name}-cool-{budget:.3g}")
    sets = branch_overrides(args.trunk, budget, args.fraction, run_dir)
    script = Path(__file__).with_name("pretrain.py")
    cmd = [
        "deepspeed",
        "--num_gpus",
        str(args.nproc),
        str(script),
        "--config",
        str(args.trunk / "config.yaml"),
    ]
    print(shlex.join([*cmd, *(a for s in sets for a in ("--set", s)), "--resume", "auto"]))


if __name__ == "__main__":
    run(main)
