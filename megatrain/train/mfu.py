"""The MFU denominator: a device's dense peak FLOP/s in the precision the matmuls run in.

On GPUs the peak comes from the vendors' data sheets (dense, no sparsity), by
`torch.cuda.get_device_name`; an unknown GPU logs no MFU rather than a wrong one
(`train.peak_flops` sets it). On a CPU there is no data sheet figure to use: a matmul
timed at start stands in, and every place that shows the MFU says it is a CPU probe.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from megatrain.devices import MATMUL_DTYPE, gpu_by_name
from megatrain.train import distributed as dist

CPU_PROBE = "CPU matmul probe"


def table_peak(device_name: str, matmul_dtype: str) -> tuple[float, str] | None:
    """(FLOP/s, "H100 SXM bf16 data sheet") for a known GPU, else None."""
    gpu = gpu_by_name(device_name)
    return (gpu.tflops[matmul_dtype] * 1e12, f"{gpu.name} {matmul_dtype} data sheet") if gpu else None


def peak_flops(train, device: torch.device) -> tuple[float | None, str]:
    """`train`: cfg.train. The peak per rank and where it came from; None when the device is
    not known (collective on CPU, where all ranks time the probe at once, as they train)."""
    if train.peak_flops:
        return float(train.peak_flops), "train.peak_flops"
    dtype = MATMUL_DTYPE[train.precision]
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


def device_memory() -> tuple[float, str]:
    """(bytes, what they are) of the memory one rank trains in: its GPU's, or on a CPU
    accelerator the host's available RAM shared by the ranks on this machine."""
    import psutil
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() == "cuda":
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        return float(props.total_memory), f"GPU {props.name}"
    local = dist.local_world_size()
    return psutil.virtual_memory().available / local, f"host RAM available to each of {local} local rank(s)"
