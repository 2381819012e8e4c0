"""Build DeepSpeed's JIT ops for this machine once, at install time (make install runs it).

DeepSpeed builds its CPU shared-memory collective op the first time a process group starts,
and its fused Adam op the first time its stock AdamW is used (each 1-2 minutes on 2 cores),
through torch's JIT loader, whose lock file a killed process leaves behind. This builds them
once and keeps copies that runs load without building or locking
(megatrain/train/prebuilt_ops.py, docs/self-healing.md).
"""

from megatrain.train import prebuilt_ops


def main() -> None:
    prebuilt_ops.build_all()


if __name__ == "__main__":
    main()
