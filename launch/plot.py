"""Draw a run's training curves, or a config's schedules without training.

python launch/plot.py RUN_DIR                          # writes RUN_DIR/curves.png
python launch/plot.py --schedule configs/gpt3-175b.yaml --json schedule.json [--dp 64]
"""

import argparse
import json
from pathlib import Path

from megatrain.config import load_config
from megatrain.errors import UserError
from megatrain.plots import plot_run, plot_schedule, schedule_points

from _cli import run


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", nargs="?", help="a run directory with metrics.jsonl")
    p.add_argument(
        "--schedule", metavar="CONFIG", help="plot this config's LR, batch and mixture schedules instead"
    )
    p.add_argument("--json", metavar="FILE", help="with --schedule: also write the sampled points as JSON")
    p.add_argument("--dp", type=int, default=1, help="with --schedule: data-parallel ranks (batch rounding)")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="with --schedule: config overrides"
    )
    p.add_argument("--out", help="PNG path (default RUN_DIR/curves.png, or CONFIG's name + .schedule.png)")
    args = p.parse_args()
    if bool(args.run_dir) == bool(args.schedule):
        p.error("give either RUN_DIR or --schedule CONFIG")
    return args


def main():
    args = parse_args()
    if args.schedule:
        cfg = load_config(args.schedule, args.set)
        out = plot_schedule(cfg, args.dp, args.out or Path(args.schedule).with_suffix(".schedule.png").name)
        if args.json:
            Path(args.json).write_text(json.dumps(schedule_points(cfg, args.dp), indent=1) + "\n")
            print(f"wrote {args.json}")
    else:
        try:
            out = plot_run(args.run_dir, args.out)
        except (ValueError, FileNotFoundError) as e:
            raise UserError(str(e)) from None
    print(f"wrote {out}")


if __name__ == "__main__":
    run(main)
