"""Write one consolidated fp32 state dict from a checkpoint of any layout (ZeRO 0-3,
pipeline), loadable by the plain GPT, as safetensors (no pickle: safe to share); the
model's shape is in the file's header. Or, with --layout-free, write the checkpoint's
layout-free training state (weights, AdamW moments, step count) into the checkpoint
itself, ahead of a resume on another layout (which otherwise converts at start).

    python launch/convert_checkpoint.py runs/x/checkpoints/step-00001000 --out gpt.safetensors
    python launch/convert_checkpoint.py runs/x --out gpt.safetensors     # the newest intact checkpoint
    python launch/convert_checkpoint.py runs/x --layout-free             # -> step-N/layout-free.safetensors

    from megatrain.train.convert import load_consolidated
    model = load_consolidated("gpt.safetensors")   # megatrain.model.GPT
"""

import argparse

from megatrain.train.convert import save_consolidated, save_layout_free

from _cli import run


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "checkpoint", help="a checkpoint directory (RUN_DIR/checkpoints/step-N) or a run directory"
    )
    out = p.add_mutually_exclusive_group(required=True)
    out.add_argument("--out", help="output file (.safetensors) of the consolidated weights")
    out.add_argument(
        "--layout-free",
        action="store_true",
        help="write the layout-free training state into the checkpoint directory",
    )
    return p.parse_args()


def main():
    args = parse_args()
    if args.layout_free:
        print(f"wrote {save_layout_free(args.checkpoint)}")
    else:
        print(f"wrote {save_consolidated(args.checkpoint, args.out)}")


if __name__ == "__main__":
    run(main)
