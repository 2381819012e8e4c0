"""The GPU architectures the fused op's CUDA kernels are built for (setup.py loads this file
by path, before megatrain is installed: it imports nothing).

Machine code (SASS) for each architecture in MEGATRAIN_CUDA_ARCHES (default sm_80 and
sm_90: A100, H100/H200), plus PTX of the newest, which the driver compiles just in time on
a later GPU (sm_100, sm_120). Without the PTX such a GPU has no kernel to run: every launch
raises "no kernel image is available for execution on the device".
"""

from __future__ import annotations

import os

DEFAULT = "80;90"


def arches() -> list[str]:
    return [a.strip() for a in os.environ.get("MEGATRAIN_CUDA_ARCHES", DEFAULT).split(";") if a.strip()]


def gencode_flags(archs: list[str]) -> list[str]:
    """nvcc's -gencode flags: SASS for each, PTX for the newest."""
    newest = max(archs, key=int)
    return [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs] + [
        f"-gencode=arch=compute_{newest},code=compute_{newest}"
    ]
