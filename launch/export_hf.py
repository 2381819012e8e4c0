"""Export a megatrain checkpoint as a Hugging Face transformers model (GPT2LMHeadModel).

    python launch/export_hf.py runs/x --out hf/gpt      # the newest intact checkpoint
    python launch/export_hf.py runs/x/checkpoints/step-00001000 --out hf/gpt --dtype bf16

    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained("hf/gpt")   # offline
    tokenizer = AutoTokenizer.from_pretrained("hf/gpt")      # megatrain's ids

Any layout (ZeRO 0-3, pipeline); a damaged checkpoint is refused with the checksum error.
The directory is written under a temporary name and renamed.
"""

import argparse

import torch

from megatrain.train.convert import export_hf

from _cli import add_tokenizer_arg, run

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a run directory or a checkpoint directory")
    add_tokenizer_arg(p)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument(
        "--dtype", choices=sorted(DTYPES), default="fp32", help="weights in fp32 (default) or bf16"
    )
    return p.parse_args()


def main():
    args = parse_args()
    print(f"wrote {export_hf(args.checkpoint, args.out, args.tokenizer, DTYPES[args.dtype])}")


if __name__ == "__main__":
    run(main)
