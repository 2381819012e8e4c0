"""Plan a run before launching it: per-rank memory, host memory, checkpoint size, step
time and training days for a config on a layout; or every layout that fits, fastest first.

    python launch/plan.py --config configs/gpt3-13b.yaml --gpus 64 --gpu h100
    python launch/plan.py --config configs/gpt3-13b.yaml --gpus 64 --gpu h100 --search
    python launch/plan.py --config configs/gpt3-1.3b.yaml --gpus 8 --gpu-mem-gb 24 --peak-tflops 165 \
        --json plan.json

No data is needed: the vocabulary comes from model.vocab_size, else the data's manifest when
it exists, else --vocab-size (GPT-3's 50257 padded to a multiple of 128, 50304, as Megatron-LM
pads it: the tensor-parallel ranks split the vocabulary, which must divide by their number).
Estimates, not measurements: docs/planning.md.
"""

import argparse
import json
from pathlib import Path

from megatrain.config import load_config
from megatrain.devices import GPUS, MATMUL_DTYPE, gpu_by_key
from megatrain.errors import UserError
from megatrain.files import write_atomically
from megatrain.layout import Layout
from megatrain.model import GPTConfig, param_count
from megatrain.plan import Links, plan, search, smallest_fitting_gpus, token_budget
from megatrain.scaling.fit import Fit
from megatrain.train.init_from import model_config, open_source

from _cli import run

GIB = 1 << 30


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML run config (configs/*.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--gpus", type=int, required=True, help="GPUs in all")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--gpu", help=f"a known GPU: {', '.join(g.key for g in GPUS)}")
    p.add_argument("--gpu-mem-gb", type=float, help="device memory in GB (instead of --gpu)")
    p.add_argument(
        "--peak-tflops", type=float, help="dense peak TFLOP/s in the training precision (with --gpu-mem-gb)"
    )
    p.add_argument("--mfu", type=float, default=0.4, help="assumed model FLOPs utilisation (default 0.4)")
    p.add_argument("--intra-node-gbs", type=float, default=300, help="all-reduce GB/s per GPU within a node")
    p.add_argument("--inter-node-gbs", type=float, default=25, help="all-reduce GB/s per GPU between nodes")
    p.add_argument("--vocab-size", type=int, default=50304, help="when neither the config nor data gives it")
    p.add_argument(
        "--fit", metavar="FILE", help="launch/scaling.py --json FILE: also the predicted final loss"
    )
    p.add_argument("--search", action="store_true", help="every layout that fits, fastest first")
    p.add_argument("--top", type=int, default=10, help="with --search: how many to print")
    p.add_argument("--json", metavar="FILE", help="also write the answer as JSON")
    return p.parse_args()


def device(args, precision: str) -> tuple[float, float, str]:
    """(memory bytes, peak FLOP/s, description)."""
    if args.gpu:
        gpu = gpu_by_key(args.gpu)
        if gpu is None:
            raise UserError(
                f"--gpu {args.gpu}: not a known GPU; known: {', '.join(g.key for g in GPUS)} "
                "(or give --gpu-mem-gb and --peak-tflops)"
            )
        dtype = MATMUL_DTYPE[precision]
        return gpu.memory_gb * 1e9, gpu.tflops[dtype] * 1e12, f"{gpu.name}, {dtype} peak"
    if args.gpu_mem_gb is None or args.peak_tflops is None:
        raise UserError("give --gpu NAME, or both --gpu-mem-gb and --peak-tflops")
    return args.gpu_mem_gb * 1e9, args.peak_tflops * 1e12, "as given"


def vocab_size(cfg, default: int) -> tuple[int, str]:
    if cfg.model.vocab_size:
        return cfg.model.vocab_size, "model.vocab_size"
    for path, _ in cfg.data.sources():
        for manifest in (Path(path) / "train" / "manifest.json", Path(path) / "manifest.json"):
            if manifest.is_file():
                return json.loads(manifest.read_text())["vocab_size"], str(manifest)
    return default, "--vocab-size"


def show(p: dict) -> None:
    mem, lay = p["per_rank_bytes"], p["layout"]
    print(
        f"layout: ZeRO-{lay['zero_stage']}, {lay['pipeline_stages']} pipeline x {lay['tensor_parallel']} "
        "tensor x "
        f"{lay['data_parallel']} data parallel"
        + (f" (experts split over {lay['expert_parallel']})" if lay["expert_parallel"] > 1 else "")
        + f", micro_batch {lay['micro_batch']}, activation checkpointing "
        f"{'on' if lay['activation_checkpointing'] else 'off'}"
    )
    if p["active_params"] != p["params"]:
        held = (
            f"each rank keeps 1/{lay['expert_parallel']} of them and 1/{lay['data_parallel']} of their "
            "optimizer state"
            if Layout(**lay).experts_split
            else "held like the rest"
        )
        print(
            f"parameters: {p['params'] / 1e9:.2f}B, {p['active_params'] / 1e9:.2f}B active per token; the "
            f"routed experts' {p['expert_params'] / 1e9:.2f}B: {held} (docs/moe.md)"
        )
    print(
        "per rank: "
        + ", ".join(f"{k} {v / GIB:.2f}" for k, v in mem.items() if k != "total")
        + f" GiB; total {mem['total'] / GIB:.2f} GiB of {p['device_bytes'] / GIB:.1f}: "
        + ("fits" if p["fits"] else f"DOES NOT FIT by {(mem['total'] - p['device_bytes']) / GIB:.2f} GiB")
    )
    print(
        f"host per node: {p['host_bytes_per_node'] / GIB:.1f} GiB of rollback points; checkpoint "
        f"{p['checkpoint_bytes'] / GIB:.1f} GiB on disk"
    )
    print(
        f"step {p['step_time_s']:.2f}s at the full batch ({p['comm_time_s']:.2f}s of it communication), "
        f"{p['tokens_per_s']:,.0f} tokens/s (MFU "
        f"{p['assumed_mfu']:.0%} assumed); {p['train_days']:.1f} days, {p['gpu_hours']:,.0f} GPU-hours"
    )
    for st in p["ramp_stages"]:
        print(
            f"  tokens {st['from_tokens']:.3g}-{st['to_tokens']:.3g}: batch {st['batch_tokens']:,.0f}, "
            f"step {st['step_time_s']:.2f}s, {st['days']:.2f} days, {st['gpu_hours']:,.0f} GPU-hours"
        )


def predicted_loss(fit: Fit, model: GPTConfig, tokens: float, source: str) -> dict:
    n = param_count(model)
    loss, (lo, hi) = fit.predict(n, tokens), fit.interval(n, tokens)
    where = f"{n:,} parameters, {tokens:.3g} tokens"
    print(f"predicted final loss {loss:.4f} [{lo:.4f}, {hi:.4f}] at {where} ({source})")
    for warning in [*fit.warnings, *fit.beyond(n, tokens)]:
        print(f"  the fit is not to be trusted as it is: {warning}")
    return {"loss": loss, "interval": [lo, hi], "params": n, "tokens": tokens}


def main():
    args = parse_args()
    cfg = load_config(args.config, args.set)
    memory, peak, source = device(args, cfg.train.precision)
    vocab, vocab_source = vocab_size(cfg, args.vocab_size)
    model = GPTConfig.from_config(cfg, vocab)
    if cfg.model.init_from:  # continued pretraining: the model is the source's
        start = open_source(cfg.model.init_from, verify=False)
        model = model_config(cfg, start, start.shape["vocab_size"], None)
        vocab, vocab_source = model.vocab_size, f"model.init_from {start.path}"
    print(f"{args.config}: {args.gpus} GPUs ({source}), vocabulary {vocab} ({vocab_source})")
    model_parallel = cfg.parallel.tensor_parallel * cfg.parallel.pipeline_stages
    if args.gpus < 1 or args.gpus % model_parallel:
        raise UserError(
            f"--gpus {args.gpus}: the config's layout needs a multiple of parallel.tensor_parallel x "
            f"parallel.pipeline_stages = {model_parallel} GPUs"
        )
    links = Links(args.intra_node_gbs * 1e9, args.inter_node_gbs * 1e9)
    mine = plan(
        cfg,
        model,
        Layout.from_config(cfg, args.gpus),
        memory,
        peak,
        args.mfu,
        args.gpus_per_node,
        links=links,
    )
    show(mine)
    out = dict(mine)
    if args.fit:
        out["predicted_loss"] = predicted_loss(Fit.read(args.fit), model, token_budget(cfg), args.fit)
    if args.search:
        found = search(cfg, model, args.gpus, args.gpus_per_node, memory, peak, args.mfu, links=links)
        if not found:
            fewest = smallest_fitting_gpus(
                cfg, model, args.gpus_per_node, memory, peak, mfu=args.mfu, links=links
            )
            raise UserError(
                f"{args.config}: no layout of {args.gpus} GPUs fits {memory / 1e9:.0f} GB per GPU; "
                + (f"the fewest that can: --gpus {fewest}" if fewest else "nor of any count up to 65536")
            )
        out["candidates"] = found
        print(f"\n{len(found)} layouts fit; the fastest {min(args.top, len(found))}:")
        for p in found[: args.top]:
            lay = p["layout"]
            print(
                f"  {p['step_time_s']:8.2f}s/step {p['per_rank_bytes']['total'] / GIB:7.2f} GiB  "
                f"ZeRO-{lay['zero_stage']} "
                f"TP{lay['tensor_parallel']} PP{lay['pipeline_stages']} DP{lay['data_parallel']} "
                + (f"EP{lay['expert_parallel']} " if lay["expert_parallel"] > 1 else "")
                + f"mb{lay['micro_batch']} ckpt={'on' if lay['activation_checkpointing'] else 'off'}"
                + (" sp" if lay["sequence_parallel"] else "")
            )
        if found:
            print(f"best: {found[0]['sets']}")
    if args.json:
        write_atomically(Path(args.json), json.dumps(out, indent=1))


if __name__ == "__main__":
    run(main)
