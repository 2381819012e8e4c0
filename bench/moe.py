"""Mixture of experts on this machine: megatrain's expert layer against DeepSpeed's own
(`deepspeed.moe.layer.MoE`) at the same shape, forward and backward, both dropless; and
training throughput and held-out bits per byte of the tiny MoE model (configs/tiny-moe-cpu.yaml:
8 experts of width 256, top-2) against the dense llama of equal active parameters (one
SwiGLU MLP of width 512), trained on the same tokens, side by side (docs/moe.md).

    python bench/moe.py [--json FILE] [--tokens 1.2e6] [--skip-training]

The layer: 8 SwiGLU experts (d 128, width 256), top-2 of 4096 tokens, one process, timed
round-robin. DeepSpeed's layer is its GShard implementation: dense one-hot dispatch and
combine einsums over [tokens, experts, capacity]; dropless (drop_tokens=False) sets the
capacity to the largest expert's count. Training: one launched run each on 2 ranks
(ZeRO-1, the demo's schedule and data), the step times' median and the final validation.
"""

from __future__ import annotations

from _bench import REPO, arg_parser, interleaved_medians, machine, print_table, stdlib_data, write_json

import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from megatrain.model import GPTConfig, param_count
from megatrain.model.moe import MoE
from megatrain.train.metrics import read_metrics

D, WIDTH, EXPERTS, TOP_K, TOKENS = 128, 256, 8, 2, 4096
MOE_CONFIG = REPO / "configs" / "tiny-moe-cpu.yaml"
# The dense llama with the MoE model's active MLP: one SwiGLU of width top_k x 256.
DENSE = ["model.moe.experts=0", "model.ffn_hidden=512"]


class SwiGLU(nn.Module):
    """One expert as DeepSpeed's layer takes it (an nn.Module it copies per expert)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(D, 2 * WIDTH, bias=False)
        self.proj = nn.Linear(WIDTH, D, bias=False)

    def forward(self, x):
        gate, up = self.fc(x).chunk(2, dim=-1)
        return self.proj(F.silu(gate) * up)


def deepspeed_layer():
    import deepspeed
    from deepspeed.moe.layer import MoE as DeepSpeedMoE

    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    deepspeed.init_distributed(dist_backend="gloo")
    layer = DeepSpeedMoE(
        D, SwiGLU(), num_experts=EXPERTS, ep_size=1, k=TOP_K, drop_tokens=False, use_rts=False
    )
    layer.set_deepspeed_parallelism()
    return layer


def layer_rows() -> list[list]:
    torch.manual_seed(0)
    cfg = GPTConfig(
        vocab_size=1, seq_len=TOKENS, n_layer=1, n_head=1, d_model=D, arch="llama", moe_experts=EXPERTS,
        moe_top_k=TOP_K, moe_ffn_hidden=WIDTH,
    )  # fmt: skip
    ours, theirs = MoE(cfg).train(), deepspeed_layer().train()
    x = torch.randn(1, TOKENS, D)

    def step(layer, out_of):
        def run():
            layer.zero_grad(set_to_none=True)
            out_of(layer(x)).sum().backward()

        return run

    times = interleaved_medians(
        {"megatrain": step(ours, lambda y: y), "deepspeed": step(theirs, lambda y: y[0])}, repeat=7, warmup=2
    )
    return [[name, TOKENS / t, t * 1e3] for name, t in times.items()]


def train(work: Path, data: Path, name: str, sets: list[str], tokens: float) -> dict:
    run = work / name
    cmd = [str(REPO / ".venv" / "bin" / "deepspeed"), "--num_gpus", "2", str(REPO / "launch" / "pretrain.py")]
    cmd += ["--config", str(MOE_CONFIG), "--resume", "none"]
    sets = [
        *sets,
        f"run.dir={run}",
        f"data.path={data}",
        f"train.max_tokens={tokens}",
        "logging.progress=false",
    ]
    for s in sets:
        cmd += ["--set", s]
    if not (run / "metrics.jsonl").exists():
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rows = read_metrics(run)
    train_rows = [r for r in rows if r["kind"] == "train"][3:]
    [valid] = [r for r in rows if r["kind"] == "valid"][-1:]
    return {
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in train_rows),
        "val_loss": valid["val_loss"],
        "val_bpb": valid["val_bpb"],
        "tokens": valid["tokens"],
    }


def main():
    p = arg_parser(__doc__)
    p.add_argument("--tokens", type=float, default=1.2e6, help="tokens each model trains on (1.2e6)")
    p.add_argument("--work", type=Path, help="data and runs (default: a temp dir; reused when given)")
    p.add_argument("--skip-training", action="store_true", help="the layer comparison only")
    args = p.parse_args()
    layers = layer_rows()
    print_table(
        f"Expert layer, forward + backward: {EXPERTS} SwiGLU experts (d {D}, width {WIDTH}), top-{TOP_K} of "
        f"{TOKENS} tokens, dropless, one process",
        ["layer", "tokens/s", "ms"],
        layers,
    )
    result = {"machine": machine(), "layer": {r[0]: {"tokens_per_s": r[1], "ms": r[2]} for r in layers}}
    if not args.skip_training:
        work = args.work or Path(tempfile.mkdtemp(prefix="bench-moe-"))
        work.mkdir(parents=True, exist_ok=True)
        data = work / "data" if (work / "data" / "valid").exists() else stdlib_data(work, valid_fraction=0.01)
        from megatrain.config import load_config

        vocab = 4096
        runs = {}
        for name, sets in (("moe", []), ("dense", DENSE)):
            model = GPTConfig.from_config(load_config(MOE_CONFIG, [f"data.path={data}", *sets]), vocab)
            runs[name] = {
                **train(work, data, name, sets, args.tokens),
                "params": param_count(model),
                "active_params": param_count(model, active=True),
            }
        print_table(
            f"Training on the same {args.tokens:.3g} tokens of the stdlib, 2 ranks, ZeRO-1",
            ["model", "params", "active", "tokens/s", "val loss", "val bpb"],
            [
                [n, r["params"], r["active_params"], r["tokens_per_s"], r["val_loss"], r["val_bpb"]]
                for n, r in runs.items()
            ],
        )
        result["training"] = runs
    write_json(args.json, result)


if __name__ == "__main__":
    sys.exit(main())
