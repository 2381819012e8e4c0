"""Training throughput: megatrain against a bare PyTorch loop on the same model and data.

Rows per model (tiny-cpu; ~20M parameters as GPT-3 and as llama) and precision (fp32, bf16): a bare loop
(torch AdamW fused=True, clip_grad_norm_, gradient accumulation, no DeepSpeed; bf16
through torch.autocast) and megatrain's Trainer with ZeRO-0 and ZeRO-1, one rank, in
train.precision fp32, or bf16 and bf16-autocast, timed round-robin in one process.
tokens/s is the median over the measured steps; MFU is against this machine's matmul
peak in that precision, measured in the same run.
Goal: megatrain >= 0.95x the bare loop.

bf16 rows use a smaller batch (the same for every row of a model) to keep the run short
on CPUs without AVX-512 BF16, where bf16 matmuls are much slower than fp32 (with it,
they are ~2x faster: compare the two matmul peaks the run prints).

With --device cuda (one GPU; the data-sheet peak of megatrain/devices.py, no probe) both
loops run there, bf16 keeps its batch, and gpt3-125m (GPT-3 Small's shape, 2048-token
context) is the model to ask for.

    python bench/train.py [--json FILE] [--steps 4] [--repeat 2]
    python bench/train.py --device cuda --models gpt3-125m --precisions bf16
"""

from __future__ import annotations

from _bench import GPT_20M, arg_parser, machine, print_table, stdlib_data, write_json

import contextlib
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from megatrain.config import load_config
from megatrain.data import ResumableSampler, TokenDataset
from megatrain.model import GPT, GPTConfig, flops_per_token
from megatrain.optim import param_groups
from megatrain.schedule import BatchSchedule
from megatrain.train import Trainer
from megatrain.train.metrics import read_metrics
from megatrain.train.mfu import measure_cpu_matmul_flops, table_peak

REPO = Path(__file__).resolve().parents[1]
MODELS = {
    # name: (overrides, bf16 overrides that shrink the batch)
    "tiny-cpu": (
        ["schedule.batch_ramp_tokens=0"],
        ["schedule.batch_final_tokens=1024", "train.micro_batch=8"],
    ),
    "gpt-20m": (GPT_20M, ["train.micro_batch=1", "schedule.batch_final_tokens=256"]),
    # The llama architecture at the same size: 6 query heads sharing 2 key/value heads, SwiGLU.
    "llama-20m": (
        ["model.arch=llama", "model.n_kv_head=2", *GPT_20M],
        ["train.micro_batch=1", "schedule.batch_final_tokens=256"],
    ),
    # GPT-3 Small's blocks and context for a GPU (93M parameters with the 8192-token vocabulary
    # trained here): 8 x 2048 tokens per micro-batch, 2 micro-batches per step.
    "gpt3-125m": (
        [
            "model.n_layer=12",
            "model.d_model=768",
            "model.n_head=12",
            "train.seq_len=2048",
            "train.micro_batch=8",
            "schedule.batch_final_tokens=32768",
            "schedule.batch_ramp_tokens=0",
        ],
        [],
    ),
}


# Open for the whole run: DeepSpeed's logger keeps the stdout it first saw, which is this.
QUIET = open(os.devnull, "w")  # noqa: SIM115


def megatrain_run(cfg_overrides: list[str], zero: int, steps: int, peak: float, work: Path) -> list[float]:
    run_dir = work / f"run-{time.monotonic_ns()}"
    cfg = load_config(
        REPO / "configs" / "tiny-cpu.yaml",
        cfg_overrides
        + [
            f"parallel.zero_stage={zero}",
            f"train.max_steps={steps}",
            f"run.dir={run_dir}",
            "train.eval_samples=0",
            "checkpoint.every_steps=0",
            "logging.progress=false",
            f"train.peak_flops={peak}",
        ],
    )
    with contextlib.redirect_stdout(QUIET):
        Trainer(cfg, resume="none").fit()
    times = [r["step_time"] for r in read_metrics(run_dir) if r["kind"] == "train"]
    shutil.rmtree(run_dir, ignore_errors=True)
    return times


def bare_run(cfg_overrides: list[str], steps: int, data_dir: Path, device: torch.device) -> list[float]:
    cfg = load_config(REPO / "configs" / "tiny-cpu.yaml", cfg_overrides)
    t = cfg.train
    data = TokenDataset(data_dir, t.seq_len)
    torch.manual_seed(cfg.run.seed)
    model = GPT(GPTConfig.from_config(cfg, data.manifest["vocab_size"])).to(device)
    opt = torch.optim.AdamW(
        param_groups(model, cfg.optim.weight_decay),
        lr=cfg.optim.lr,
        betas=tuple(cfg.optim.betas),
        eps=cfg.optim.eps,
        fused=True,
    )
    sampler = ResumableSampler(len(data), seed=cfg.run.seed)
    gas = BatchSchedule.from_config(cfg, dp_size=1).micro_batches(0)
    bf16 = t.precision == "bf16"
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        for _ in range(gas):
            batch = torch.from_numpy(data.batch(sampler.next(t.micro_batch))).to(device).long()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = model(batch[:, :-1], batch[:, 1:]) / gas
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return times


def main():
    p = arg_parser(__doc__)
    p.add_argument("--steps", type=int, default=4, help="measured steps per row and repeat (plus 1 warm-up)")
    p.add_argument("--repeat", type=int, default=2, help="round-robin passes over the rows")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument(
        "--device",
        default="cpu",
        help="cpu, or cuda: one GPU (megatrain through DeepSpeed's CUDA "
        "accelerator, which it finds by itself)",
    )
    args = p.parse_args()
    device = torch.device(args.device)
    work = Path(tempfile.mkdtemp(prefix="bench-train-"))
    data_dir = stdlib_data(work, vocab_size=8192, sample_bytes=int(5e6))  # as in make demo
    if (
        device.type == "cuda"
    ):  # the data sheet's dense peak (fp32 matmuls run as tf32 only when torch allows it)
        fp32 = "tf32" if torch.backends.cuda.matmul.allow_tf32 else "fp32"
        peaks = {
            prec: table_peak(torch.cuda.get_device_name(device), dt)[0]
            for prec, dt in (("fp32", fp32), ("bf16", "bf16"))
            if prec in args.precisions
        }
    else:
        peaks = {
            prec: measure_cpu_matmul_flops(dt, seconds=2.0)
            for prec, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16))
            if prec in args.precisions
        }

    results, rows = [], []
    for model_name in args.models:
        base, bf16_batch = MODELS[model_name]
        for prec in args.precisions:
            smaller = bf16_batch if prec == "bf16" and device.type == "cpu" else []
            overrides = base + [f"train.precision={prec}", f"data.path={data_dir}"] + smaller
            cfg = load_config(REPO / "configs" / "tiny-cpu.yaml", overrides)
            vocab = TokenDataset(data_dir, cfg.train.seq_len).manifest["vocab_size"]
            fpt = flops_per_token(GPTConfig.from_config(cfg, vocab))
            batch_tokens = BatchSchedule.from_config(cfg, dp_size=1)(0)
            variants = {
                "bare PyTorch loop": lambda o=overrides: bare_run(o, args.steps + 1, data_dir, device)[1:]
            }
            # bf16 rows: DeepSpeed's bf16 mode and bf16-autocast (the bare loop's own strategy)
            for mode in [prec] + (["bf16-autocast"] if prec == "bf16" else []):
                label = "" if mode == prec else f" {mode}"
                for zero in (0, 1):
                    variants[f"megatrain ZeRO-{zero}{label}"] = (
                        lambda o=overrides + [f"train.precision={mode}"], z=zero, p=prec: megatrain_run(
                            o, z, args.steps + 1, peaks[p], work
                        )[1:]
                    )
            step_times = {name: [] for name in variants}
            for _ in range(args.repeat):
                for name, fn in variants.items():
                    step_times[name].extend(fn())
            bare_tps = batch_tokens / statistics.median(step_times["bare PyTorch loop"])
            for name, times in step_times.items():
                tps = batch_tokens / statistics.median(times)
                mfu = fpt * tps / peaks[prec]
                results.append(
                    {
                        "model": model_name,
                        "precision": prec,
                        "row": name,
                        "tokens_per_s": tps,
                        "mfu": mfu,
                        "vs_bare": tps / bare_tps,
                        "batch_tokens": batch_tokens,
                    }
                )
                rows.append(
                    [model_name, prec, name, batch_tokens, tps, f"{100 * mfu:.1f}%", f"{tps / bare_tps:.3f}x"]
                )
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print_table(
        f"training throughput, 1 rank on {where} (goal: megatrain >= 0.95x the bare loop)",
        ["model", "precision", "row", "batch tokens", "tokens/s", "MFU", "vs bare"],
        rows,
    )
    print(
        ("data-sheet" if device.type == "cuda" else "matmul")
        + " peak: "
        + ", ".join(f"{k} {v / 1e9:.1f} GFLOP/s" for k, v in peaks.items())
    )
    shutil.rmtree(work, ignore_errors=True)
    write_json(args.json, {"machine": machine(), "device": where, "peak_flops": peaks, "rows": results})


if __name__ == "__main__":
    main()
