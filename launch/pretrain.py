"""Pretrain a GPT model with DeepSpeed.

    deepspeed --num_gpus 2 launch/pretrain.py --config configs/tiny-cpu.yaml --set train.max_steps=100
    python launch/pretrain.py --config configs/tiny-cpu.yaml            # one process
    deepspeed --hostfile hosts launch/pretrain.py --config configs/gpt3-1.3b.yaml --resume auto

Exit status (megatrain.errors.ExitCode): 0 done, or stopped by SIGTERM/SIGINT with a
checkpoint; 1 a crash or a checkpoint that could not be written (restartable); 2 bad
input; 3 the loss kept spiking (more than spike.max_rollbacks rollbacks), checkpoint written.
"""

import argparse

from megatrain.config import load_config
from megatrain.errors import ExitCode
from megatrain.train import Trainer
from megatrain.train import distributed as dist

from _cli import run


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML run config (configs/*.yaml)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set train.max_steps=50 (repeatable)",
    )
    p.add_argument(
        "--resume",
        default="auto",
        help="auto: the newest intact checkpoint in run.dir if any (default); none; "
        "or a checkpoint directory",
    )
    p.add_argument(
        "--local_rank", type=int, default=None, help=argparse.SUPPRESS
    )  # passed by the deepspeed launcher
    return p.parse_args(argv)


def main(argv=None, callbacks=()):
    args = parse_args(argv)
    cfg = load_config(args.config, args.set)
    summary = Trainer(cfg, resume=args.resume, callbacks=callbacks).fit()
    dist.shutdown()
    return ExitCode.GAVE_UP if summary["outcome"] == "gave_up" else ExitCode.OK


if __name__ == "__main__":
    run(main)
