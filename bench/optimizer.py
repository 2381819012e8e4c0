"""Optimizer step speed: megatrain's fused AdamW + clip against torch and DeepSpeed.

fp32 parameters in a handful of tensors (25M on the CPU with all its threads; on a GPU
1G, where smaller steps measure launch latency, or fewer where its memory cannot hold every
row). Rows, timed round-robin in one run (median of --repeat; on a GPU each step is
synchronised):
  megatrain_fused          FusedAdamWClip.step() through the compiled op (norm + clip + update)
  torch_fused_clip         clip_grad_norm_ + torch.optim.AdamW(fused=True)
  torch_fused_noclip       torch.optim.AdamW(fused=True) alone (a reference: it cannot clip)
  torch_foreach_clip       clip_grad_norm_ + torch.optim.AdamW(foreach=True)
  deepspeed_cpu_adam_clip  clip_grad_norm_ + DeepSpeedCPUAdam (adamw_mode), on the CPU
  deepspeed_fused_adam_clip  clip_grad_norm_ + DeepSpeed's FusedAdam (adam_w_mode), on a GPU
The floor is the memory traffic of the fused step, 32 bytes per parameter (gradient read
twice, parameter and both moments read and written), over the in-place read-modify-write
bandwidth measured in the same run on the same device (b.add_(a) on two large fp32
tensors: 12 bytes per element). Goal: megatrain <= 1.10x the floor.

    python bench/optimizer.py [--json FILE] [--device cpu|cuda] [--params N] [--repeat 7]
"""

from __future__ import annotations

from _bench import arg_parser, interleaved_medians, machine, print_table, write_json

import torch

from megatrain.optim import FusedAdamWClip, fused_op_available

HYPER = dict(lr=6e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
ROWS = 5  # the most setup_rows makes


def make_tensors(n_params: int, device: torch.device, seed: int = 0) -> list[torch.Tensor]:
    shares = [0.4, 0.3, 0.15, 0.1, 0.05]  # a handful of tensors, as in a model's groups
    g = torch.Generator(device).manual_seed(seed)
    return [torch.randn(max(1, int(n_params * s)), generator=g, device=device) for s in shares]


def synchronised(fn, device: torch.device):
    """`fn` timed to its end on the device (a GPU runs it asynchronously)."""
    if device.type != "cuda":
        return fn

    def run():
        fn()
        torch.cuda.synchronize(device)

    return run


def rmw_bandwidth(device: torch.device, n: int = 64 << 20, repeat: int = 7) -> float:
    """Bytes per second of b += a over two n-element fp32 tensors (12 bytes per element)."""
    a, b = torch.randn(n, device=device), torch.randn(n, device=device)
    times = interleaved_medians({"add": synchronised(lambda: b.add_(a), device)}, repeat=repeat, warmup=2)
    return 12 * n / times["add"]


def default_params(device: torch.device) -> int:
    """25M on a CPU; on a GPU 1e9, or fewer where the device cannot hold every row at once
    (each row keeps parameters, gradients and two moments, 16 B per parameter, and the rows
    are built before they are timed round-robin): an 80 GB device takes ~0.7e9."""
    if device.type != "cuda":
        return int(25e6)
    free, _ = torch.cuda.mem_get_info(device)
    return int(min(1e9, 0.7 * free / (16 * ROWS)))


def setup_rows(n_params: int, device: torch.device) -> dict:
    rows = {}

    def with_grads(make_opt, clip: bool):
        params = make_tensors(n_params, device)
        for p in params:
            p.grad = torch.randn_like(p)
        opt = make_opt(params)

        def step():
            if clip:
                torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()

        return synchronised(step, device)

    if fused_op_available():
        rows["megatrain_fused"] = with_grads(
            lambda ps: FusedAdamWClip(ps, max_grad_norm=1.0, **HYPER), clip=False
        )
    rows["torch_fused_clip"] = with_grads(lambda ps: torch.optim.AdamW(ps, fused=True, **HYPER), clip=True)
    rows["torch_fused_noclip"] = with_grads(lambda ps: torch.optim.AdamW(ps, fused=True, **HYPER), clip=False)
    rows["torch_foreach_clip"] = with_grads(
        lambda ps: torch.optim.AdamW(ps, foreach=True, **HYPER), clip=True
    )
    peer = "deepspeed_fused_adam_clip" if device.type == "cuda" else "deepspeed_cpu_adam_clip"
    try:
        if device.type == "cuda":
            from deepspeed.ops.adam import FusedAdam

            rows[peer] = with_grads(lambda ps: FusedAdam(ps, adam_w_mode=True, **HYPER), clip=True)
        else:
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            rows[peer] = with_grads(lambda ps: DeepSpeedCPUAdam(ps, adamw_mode=True, **HYPER), clip=True)
    except Exception as e:  # its JIT op needs a compiler; say so instead of a silent gap
        print(f"note: {peer} unavailable ({type(e).__name__}: {e}); row left out")
    return rows


def main():
    p = arg_parser(__doc__)
    p.add_argument("--device", default="cpu", help="cpu, or cuda for the CUDA kernel on the current GPU")
    p.add_argument(
        "--params",
        type=float,
        default=None,
        help="parameters (default 25e6 on cpu, up to 1e9 on cuda as memory allows)",
    )
    p.add_argument("--repeat", type=int, default=7)
    args = p.parse_args()
    device = torch.device(args.device)
    n = int(args.params or default_params(device))
    where = (
        torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    )
    rows = setup_rows(n, device)
    times = interleaved_medians(rows, repeat=args.repeat, warmup=2)
    bw = rmw_bandwidth(device)
    floor = 32 * n / bw
    table = [[name, t * 1e3, f"{t / floor:.2f}x", f"{32 * n / t / 1e9:.0f}"] for name, t in times.items()]
    table.append(["floor (32 B/param at RMW bandwidth)", floor * 1e3, "1.00x", f"{bw / 1e9:.0f}"])
    print_table(
        f"optimizer step, {n / 1e6:.0f}M fp32 parameters, {where} (goal: megatrain_fused <= 1.10x floor)",
        ["row", "ms (median)", "vs floor", "GB/s (32 B/param)"],
        table,
    )
    print(f"in-place read-modify-write bandwidth: {bw / 1e9:.1f} GB/s")
    if "megatrain_fused" in times:
        for peer in ("torch_fused_clip", "deepspeed_cpu_adam_clip", "deepspeed_fused_adam_clip"):
            if peer in times:
                print(f"megatrain_fused is {times[peer] / times['megatrain_fused']:.2f}x faster than {peer}")
    write_json(
        args.json,
        {
            "machine": machine(),
            "device": where,
            "params": n,
            "rmw_gbps": bw / 1e9,
            "floor_ms": floor * 1e3,
            "rows": [{"name": k, "ms": v * 1e3} for k, v in times.items()],
        },
    )


if __name__ == "__main__":
    main()
