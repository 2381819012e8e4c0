"""Optimizer step speed: megatrain's fused AdamW + clip against torch and DeepSpeed.

25M fp32 parameters in a handful of tensors, all threads of this machine. Rows, timed
round-robin in one run (median of --repeat):
  megatrain_fused          FusedAdamWClip.step() through the compiled CPU op (norm + clip + update)
  torch_fused_clip         clip_grad_norm_ + torch.optim.AdamW(fused=True)
  torch_fused_noclip       torch.optim.AdamW(fused=True) alone (a reference: it cannot clip)
  torch_foreach_clip       clip_grad_norm_ + torch.optim.AdamW(foreach=True)
  deepspeed_cpu_adam_clip  clip_grad_norm_ + DeepSpeedCPUAdam (adamw_mode)
The floor is the memory traffic of the fused step, 32 bytes per parameter (gradient read
twice, parameter and both moments read and written), over the in-place read-modify-write
bandwidth measured in the same run (b.add_(a) on two large fp32 tensors: 12 bytes per
element). Goal: megatrain <= 1.10x the floor.

    python bench/optimizer.py [--json FILE] [--params 25e6] [--repeat 7]
"""

from __future__ import annotations

from _bench import arg_parser, interleaved_medians, machine, print_table, write_json

import torch

from megatrain.optim import FusedAdamWClip, fused_op_available

HYPER = dict(lr=6e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)


def make_tensors(n_params: int, seed: int = 0) -> list[torch.Tensor]:
    shares = [0.4, 0.3, 0.15, 0.1, 0.05]  # a handful of tensors, as in a model's groups
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(max(1, int(n_params * s)), generator=g) for s in shares]


def rmw_bandwidth(n: int = 64 << 20, repeat: int = 7) -> float:
    """Bytes per second of b += a over two n-element fp32 tensors (12 bytes per element)."""
    a, b = torch.randn(n), torch.randn(n)
    times = interleaved_medians({"add": lambda: b.add_(a)}, repeat=repeat, warmup=2)
    return 12 * n / times["add"]


def setup_rows(n_params: int) -> dict:
    rows = {}

    def with_grads(make_opt, clip: bool):
        params = make_tensors(n_params)
        for p in params:
            p.grad = torch.randn_like(p)
        opt = make_opt(params)

        def step():
            if clip:
                torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
        return step

    if fused_op_available():
        rows["megatrain_fused"] = with_grads(lambda ps: FusedAdamWClip(ps, max_grad_norm=1.0, **HYPER), clip=False)
    rows["torch_fused_clip"] = with_grads(lambda ps: torch.optim.AdamW(ps, fused=True, **HYPER), clip=True)
    rows["torch_fused_noclip"] = with_grads(lambda ps: torch.optim.AdamW(ps, fused=True, **HYPER), clip=False)
    rows["torch_foreach_clip"] = with_grads(lambda ps: torch.optim.AdamW(ps, foreach=True, **HYPER), clip=True)
    try:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        rows["deepspeed_cpu_adam_clip"] = with_grads(
            lambda ps: DeepSpeedCPUAdam(ps, adamw_mode=True, **HYPER), clip=True)
    except Exception as e:  # its JIT op needs a compiler; say so instead of a silent gap
        print(f"note: DeepSpeedCPUAdam unavailable ({type(e).__name__}: {e}); row left out")
    return rows


def main():
    p = arg_parser(__doc__)
    p.add_argument("--params", type=float, default=25e6)
    p.add_argument("--repeat", type=int, default=7)
    args = p.parse_args()
    n = int(args.params)
    torch.set_num_threads(torch.get_num_threads())  # all threads (the default)
    rows = setup_rows(n)
    times = interleaved_medians(rows, repeat=args.repeat, warmup=2)
    bw = rmw_bandwidth()
    floor = 32 * n / bw
    table = [[name, t * 1e3, f"{t / floor:.2f}x"] for name, t in times.items()]
    table.append(["floor (32 B/param at RMW bandwidth)", floor * 1e3, "1.00x"])
    print_table(f"optimizer step, {n / 1e6:.0f}M fp32 parameters, {torch.get_num_threads()} threads "
                f"(goal: megatrain_fused <= 1.10x floor)", ["row", "ms (median)", "vs floor"], table)
    print(f"in-place read-modify-write bandwidth: {bw / 1e9:.1f} GB/s")
    if "megatrain_fused" in times:
        for peer in ("torch_fused_clip", "deepspeed_cpu_adam_clip"):
            if peer in times:
                print(f"megatrain_fused is {times[peer] / times['megatrain_fused']:.2f}x faster than {peer}")
    write_json(args.json, {"machine": machine(), "params": n, "rmw_gbps": bw / 1e9, "floor_ms": floor * 1e3,
                           "rows": [{"name": k, "ms": v * 1e3} for k, v in times.items()]})


if __name__ == "__main__":
    main()
