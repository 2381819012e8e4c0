"""Draw a run's training curves.

    python launch/plot.py RUN_DIR              # writes RUN_DIR/curves.png
    python launch/plot.py RUN_DIR --out loss.png
"""

import argparse

from megatrain.errors import UserError
from megatrain.plots import plot_run

from _cli import run


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="a run directory with metrics.jsonl")
    p.add_argument("--out", help="PNG path (default RUN_DIR/curves.png)")
    return p.parse_args()


def main():
    args = parse_args()
    try:
        out = plot_run(args.run_dir, args.out)
    except (ValueError, FileNotFoundError) as e:
        raise UserError(str(e)) from None
    print(f"wrote {out}")


if __name__ == "__main__":
    run(main)
