"""Write one consolidated fp32 state dict from a checkpoint of any layout (ZeRO 0-3,
pipeline), loadable by the plain GPT, as safetensors (no pickle: safe to share); the
model's shape is in the file's header.

    python launch/convert_checkpoint.py runs/x/checkpoints/step-00001000 --out gpt.safetensors
    python launch/convert_checkpoint.py runs/x --out gpt.safetensors     # the newest intact checkpoint

    from megatrain.train.convert import load_consolidated
    model = load_consolidated("gpt.safetensors")   # megatrain.model.GPT
"""

import argparse

from megatrain.train.convert import save_consolidated

from _cli import run


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a checkpoint directory (RUN_DIR/checkpoints/step-N) or a run directory")
    p.add_argument("--out", required=True, help="output file (.safetensors)")
    return p.parse_args()


def main():
    args = parse_args()
    print(f"wrote {save_consolidated(args.checkpoint, args.out)}")


if __name__ == "__main__":
    run(main)
