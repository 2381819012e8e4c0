"""Compile DeepSpeed's JIT ops for this machine once, at install time.

DeepSpeed builds its CPU shared-memory collective op the first time a process group
starts (about 1-2 minutes on 2 cores). The build is cached in torch's extension
directory, so doing it here keeps the first training run and the first test fast.
"""

import deepspeed  # noqa: F401  (sets up the accelerator)
from deepspeed.accelerator import get_accelerator


def main() -> None:
    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None or not builder.is_compatible(verbose=False):
        print("warm_ops: no shared-memory comm op for this accelerator; nothing to build")
        return
    builder.load(verbose=False)
    print(f"warm_ops: {builder.absolute_name()} ready")


if __name__ == "__main__":
    main()
