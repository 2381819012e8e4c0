"""The MFU denominator: a device's dense peak FLOP/s in the precision the matmuls run in.

On GPUs the peak comes from the vendors' data sheets (dense, no sparsity), by
`torch.cuda.get_device_name`; an unknown GPU logs no MFU rather than a wrong one
(`train.peak_flops` sets it). On a CPU there is no data sheet figure to use: a matmul
timed at start stands in, and every place that shows the MFU says it is a CPU probe.
"""

from __future__ import annotations

import re
import time

import torch
import torch.nn.functional as F

from megatrain.train import distributed as dist

# TFLOP/s, dense: NVIDIA A100 (2020), H100 (2023), H200 (2024) and L40S (2023) data sheets.
GPU_PEAKS = [  # (pattern in the device name, name, {matmul dtype: TFLOP/s}); the first match wins
    (r"H100.*PCIe", "H100 PCIe", {"bf16": 756, "fp16": 756, "tf32": 378, "fp32": 51}),
    (r"H100 (SXM|80GB HBM3)", "H100 SXM", {"bf16": 989, "fp16": 989, "tf32": 495, "fp32": 67}),
    (r"H200", "H200", {"bf16": 989, "fp16": 989, "tf32": 495, "fp32": 67}),
    (r"A100", "A100", {"bf16": 312, "fp16": 312, "tf32": 156, "fp32": 19.5}),
    (r"L40S", "L40S", {"bf16": 362, "fp16": 362, "tf32": 183, "fp32": 91.6}),
]
MATMUL_DTYPE = {"bf16": "bf16", "bf16-autocast": "bf16", "fp16": "fp16", "fp32": "fp32"}
CPU_PROBE = "CPU matmul probe"


def table_peak(device_name: str, matmul_dtype: str) -> tuple[float, str] | None:
    """(FLOP/s, "H100 SXM bf16 data sheet") for a known GPU, else None."""
    for pattern, name, peaks in GPU_PEAKS:
        if re.search(pattern, device_name):
            return peaks[matmul_dtype] * 1e12, f"{name} {matmul_dtype} data sheet"
    return None


def peak_flops(cfg, device: torch.device) -> tuple[float | None, str]:
    """The peak per rank and where it came from; None when the device is not known
    (collective on CPU, where all ranks time the probe at once, as they train)."""
    if cfg.train.peak_flops:
        return float(cfg.train.peak_flops), "train.peak_flops"
    dtype = MATMUL_DTYPE[cfg.train.precision]
    if device.type == "cuda":
        if dtype == "fp32" and torch.backends.cuda.matmul.allow_tf32:
            dtype = "tf32"
        name = torch.cuda.get_device_name(device)
        found = table_peak(name, dtype)
        return found if found else (None, f"unknown device {name!r}: set train.peak_flops for MFU")
    if device.type != "cpu":
        return None, f"no peak known for {device.type}: set train.peak_flops for MFU"
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    return dist.all_reduce_mean([measure_cpu_matmul_flops(torch_dtype)])[0], CPU_PROBE


def measure_cpu_matmul_flops(dtype: torch.dtype, n: int = 1024, seconds: float = 0.5) -> float:
    """FLOP/s of an n x n matmul on the CPU, in nn.Linear's layout (x @ w.T): on some CPUs
    a bf16 `a @ b` takes a much slower path, which would not be a peak."""
    x, w = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    F.linear(x, w)  # warm up
    runs, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds or runs < 3:
        F.linear(x, w)
        runs += 1
    return 2.0 * n**3 * runs / (time.perf_counter() - t0)
