"""Compile DeepSpeed's JIT ops for this machine once, at install time.

DeepSpeed builds its CPU shared-memory collective op the first time a process group
starts, and its fused Adam op the first time its stock AdamW is used (each 1-2 minutes
on 2 cores). The builds are cached in torch's extension directory, so doing them here
keeps the first training run and the first test fast.
"""

import deepspeed  # noqa: F401  (sets up the accelerator)
from deepspeed.accelerator import get_accelerator

OPS = ("ShareMemCommBuilder", "FusedAdamBuilder")


def main() -> None:
    for name in OPS:
        builder = get_accelerator().create_op_builder(name)
        if builder is None or not builder.is_compatible(verbose=False):
            print(f"warm_ops: {name} does not apply to this accelerator")
            continue
        builder.load(verbose=False)
        print(f"warm_ops: {builder.absolute_name()} ready")


if __name__ == "__main__":
    main()
