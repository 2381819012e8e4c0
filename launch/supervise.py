"""Run a training command and relaunch it after crashes.

    python launch/supervise.py --max-restarts 10 -- \\
        deepspeed --num_gpus 8 launch/pretrain.py --config configs/gpt3-1.3b.yaml --resume auto

    # a multi-node run that goes on with the nodes left after one is lost (the scheduler
    # or an operator removes it from the hostfile; the run resumes on the smaller layout):
    python launch/supervise.py --hostfile hosts --min-ranks 8 -- \
        deepspeed --hostfile hosts launch/pretrain.py --config configs/gpt3-1.3b.yaml --resume auto

    # a run whose heartbeat stops for 30 minutes (or that has not started 20 minutes after
    # its launch) is taken as hung, stopped and relaunched
    python launch/supervise.py --heartbeat runs/x/heartbeat --hang-timeout 1800 --start-timeout 1200 -- \
        deepspeed --num_gpus 8 launch/pretrain.py --config c.yaml --set run.dir=runs/x --resume auto

Exit 0, 2 (bad input) and 3 (too many loss spikes) end supervision; any other exit is
retried after --delay seconds. SIGTERM/SIGINT are passed to the run's ranks (they checkpoint
and exit 0) and end supervision; a second one goes to the whole run.
"""

import argparse
from pathlib import Path

from megatrain.supervisor import supervise

from _cli import run


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--max-restarts", type=int, default=10)
    p.add_argument("--delay", type=float, default=5.0, help="seconds between a crash and the relaunch")
    p.add_argument(
        "--hostfile", help="DeepSpeed hostfile the command launches on: re-read before every launch"
    )
    p.add_argument(
        "--min-ranks",
        type=int,
        default=1,
        help="with --hostfile: stop instead of relaunching on fewer ranks than this",
    )
    p.add_argument(
        "--heartbeat", help="the run's RUN_DIR/heartbeat, touched after every step (with --hang-timeout)"
    )
    p.add_argument(
        "--hang-timeout",
        type=float,
        default=0.0,
        help="seconds without a heartbeat after which the run is taken as hung and relaunched (0: never); "
        "more than the longest checkpoint write plus evaluation, and than the start",
    )
    p.add_argument(
        "--start-timeout",
        type=float,
        help="seconds from a launch to the run's first heartbeat (it has started: its ops, data, "
        "model and checkpoint loaded) after which it is taken as hung (default: --hang-timeout)",
    )
    p.add_argument(
        "--hang-grace",
        type=float,
        default=60.0,
        help="seconds between the SIGTERM to a hung run and the SIGKILL to what is left of it",
    )
    p.add_argument("cmd", nargs=argparse.REMAINDER, help="the command, after --")
    args = p.parse_args()
    if (args.heartbeat is None) != (args.hang_timeout <= 0):
        p.error("--heartbeat and --hang-timeout go together")
    if args.start_timeout is not None and (args.start_timeout <= 0 or args.hang_timeout <= 0):
        p.error("--start-timeout must be > 0 and goes with --hang-timeout")
    if args.hang_grace < 0:
        p.error("--hang-grace must be >= 0")
    if args.cmd and args.cmd[0] == "--":
        args.cmd = args.cmd[1:]
    if not args.cmd:
        p.error("give the command to run after --")
    return args


def main():
    args = parse_args()
    return supervise(
        args.cmd,
        args.max_restarts,
        args.delay,
        log=lambda m: print(m, flush=True),
        hostfile=args.hostfile and Path(args.hostfile),
        min_ranks=args.min_ranks,
        heartbeat=args.heartbeat and Path(args.heartbeat),
        hang_timeout=args.hang_timeout,
        hang_grace=args.hang_grace,
        start_timeout=args.start_timeout,
    )


if __name__ == "__main__":
    run(main)
