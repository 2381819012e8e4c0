"""Gradient accumulation in bf16: the error summing micro-batch gradients adds.

One bf16 step of 16 micro-batches (a 4-layer, d_model 256 GPT, seq 32, 4 sequences per
micro-batch) on one rank, for each ZeRO stage and train.grad_accum_dtype. The gradient
megatrain's optimizer is handed is compared with the same bf16 model's micro-batch
gradients summed exactly (float64): `accumulation_error`. For scale, `compute_error` is
what bf16 arithmetic itself costs against a float64 model (the same in every row).
Each row runs in its own process (a world of one). Rows whose layout DeepSpeed 0.19.8
cannot give an fp32 sum (ZeRO-0) say so.

    python bench/grad_accum.py [--json FILE] [--micro-batches 16]
"""

from __future__ import annotations

from _bench import REPO, arg_parser, machine, print_table, write_json

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

MARK = "row: "


def row(data: str, stage: int, dtype: str, micro_batches: int) -> None:
    """One row, in this process (a world of one): its result on the last line."""
    from helpers import accumulation_error

    got = accumulation_error(data, stage, micro_batches, f"train.grad_accum_dtype={dtype}", size=(256, 4))
    print(MARK + json.dumps(got))


def main():
    p = arg_parser(__doc__)
    p.add_argument("--micro-batches", type=int, default=16)
    p.add_argument("--row", nargs=3, metavar=("DATA", "STAGE", "DTYPE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.row:
        return row(args.row[0], int(args.row[1]), args.row[2], args.micro_batches)
    from helpers import SMALL_CORPUS

    from megatrain.config import load_config
    from megatrain.config.deepspeed import fp32_accumulation
    from megatrain.data import prepare_dataset
    from tokenizer import TrainerOptions, train_tokenizer

    rows, results = [], []
    with tempfile.TemporaryDirectory() as tmp:
        train_tokenizer(SMALL_CORPUS, Path(tmp) / "tok", TrainerOptions(vocab_size=1024), progress=False)
        data = Path(tmp) / "data"
        prepare_dataset(Path(tmp) / "tok", SMALL_CORPUS, data, progress=False)
        for stage in (0, 1, 2):
            for dtype in ("bf16", "fp32"):
                cfg = load_config(
                    REPO / "tests" / "configs" / "tiny.yaml",
                    [
                        f"data.path={data}",
                        f"parallel.zero_stage={stage}",
                        "train.precision=bf16",
                        f"train.grad_accum_dtype={dtype}",
                    ],
                )
                summed = "fp32" if fp32_accumulation(cfg.train, stage) else "bf16"
                proc = subprocess.run(
                    [
                        sys.executable,
                        __file__,
                        "--row",
                        str(data),
                        str(stage),
                        dtype,
                        "--micro-batches",
                        str(args.micro_batches),
                    ],
                    capture_output=True,
                    text=True,
                )
                lines = [line for line in proc.stdout.splitlines() if line.startswith(MARK)]
                if proc.returncode or not lines:
                    raise RuntimeError(f"row ZeRO-{stage} {dtype} failed:\n{proc.stderr[-3000:]}")
                got = json.loads(lines[-1][len(MARK) :])
                results.append({"zero_stage": stage, "grad_accum_dtype": dtype, "summed_in": summed, **got})
                rows.append([stage, dtype, summed, got["wrapper"], got["error"], got["compute_error"]])
    print_table(
        f"bf16 gradients of {args.micro_batches} micro-batches: relative error against their exact sum",
        ["ZeRO", "grad_accum_dtype", "summed in", "DeepSpeed wrapper", "accumulation_error", "compute_error"],
        rows,
    )
    write_json(args.json, {"machine": machine(), "micro_batches": args.micro_batches, "rows": results})


if __name__ == "__main__":
    main()
