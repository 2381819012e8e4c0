"""GPUs by their data sheets: dense peak FLOP/s per matmul precision and memory. The MFU
denominator (train/mfu.py) and the planner (plan.py) read them from here. And the host's
memory as a process may use it (a container's limit included)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class GPU:
    key: str  # what `launch/plan.py --gpu` takes
    name: str
    pattern: str  # in torch.cuda.get_device_name()
    memory_gb: float
    tflops: dict  # matmul dtype -> dense TFLOP/s


# NVIDIA A100 (2020), H100 (2023), H100 NVL and H200 (2024) and L40S (2023) data sheets; dense,
# no sparsity (the sheets' sparse figures halved). The first pattern that matches a device
# name wins: the NVL cards ("NVIDIA H200 NVL", 600 W PCIe) come before the SXM parts they
# share a name with.
GPUS = [
    GPU("h100-pcie", "H100 PCIe", r"H100.*PCIe", 80, {"bf16": 756, "fp16": 756, "tf32": 378, "fp32": 51}),
    GPU("h100-nvl", "H100 NVL", r"H100 NVL", 94, {"bf16": 835, "fp16": 835, "tf32": 418, "fp32": 60}),
    GPU("h100", "H100 SXM", r"H100 (SXM|80GB HBM3)", 80, {"bf16": 989, "fp16": 989, "tf32": 495, "fp32": 67}),
    GPU("h200-nvl", "H200 NVL", r"H200 NVL", 141, {"bf16": 835, "fp16": 835, "tf32": 418, "fp32": 60}),
    GPU("h200", "H200 SXM", r"H200", 141, {"bf16": 989, "fp16": 989, "tf32": 495, "fp32": 67}),
    GPU("a100-40gb", "A100 40GB", r"A100.*40GB", 40, {"bf16": 312, "fp16": 312, "tf32": 156, "fp32": 19.5}),
    GPU("a100", "A100", r"A100", 80, {"bf16": 312, "fp16": 312, "tf32": 156, "fp32": 19.5}),
    GPU("l40s", "L40S", r"L40S", 48, {"bf16": 362, "fp16": 362, "tf32": 183, "fp32": 91.6}),
]
MATMUL_DTYPE = {"bf16": "bf16", "bf16-autocast": "bf16", "fp16": "fp16", "fp32": "fp32"}


def gpu_by_name(device_name: str) -> GPU | None:
    return next((g for g in GPUS if re.search(g.pattern, device_name)), None)


def gpu_by_key(key: str) -> GPU | None:
    return next((g for g in GPUS if g.key == key.lower()), None)


def host_memory(
    cgroup_root: Path = Path("/sys/fs/cgroup"), proc_cgroup: Path = Path("/proc/self/cgroup")
) -> int:
    """Bytes of host memory this process may use: the machine's RAM, or less where its cgroup
    (a container, a Slurm job) is limited to less: cgroup v2's memory.max, v1's
    memory.limit_in_bytes, the smallest on the way from its own group to the root."""
    physical = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    limits = [physical]
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            base, name = cgroup_root, "memory.max"  # v2 (unified)
        elif "memory" in controllers.split(","):
            base, name = cgroup_root / "memory", "memory.limit_in_bytes"  # v1
        else:
            continue
        group = Path(path.lstrip("/"))
        for ancestor in [group, *group.parents]:
            try:
                text = (base / ancestor / name).read_text().strip()
            except OSError:
                continue
            if text.isdigit() and int(text) < physical:  # "max", or v1's 2^63-ish: no limit
                limits.append(int(text))
    return min(limits)
