"""Host memory while building a model: ZeRO-3 under deepspeed.zero.Init on 2 ranks, and 2
tensor-parallel ranks (ZeRO-1) cutting the meta model before allocating, against one
process building the whole fp32 model (what every rank did before).

Each process reports the growth of its peak RSS (ru_maxrss) from just before building
the model to just after (parameters drawn included; on the CPU accelerator a rank's
device memory is host memory). The goal: a rank of the 2-rank ZeRO-3 build peaks at
<= 0.6x the whole build; a tensor-parallel rank holds its shards plus what AutoTP keeps
whole (embeddings, LayerNorms, row-parallel biases).

    python bench/build.py [--json FILE] [--config configs/gpt3-350m.yaml]
"""

from __future__ import annotations

from _bench import arg_parser, machine, print_table, write_json

import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

from helpers import DEEPSPEED, REPO

from megatrain.train.distributed import free_port


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


LAYOUTS = {  # name: (overrides, ranks); "whole" is plain GPT(...) in one process
    "whole": ([], 1),
    "zero3": (["parallel.zero_stage=3"], 2),
    "tp2": (["parallel.zero_stage=1", "parallel.tensor_parallel=2"], 2),
}


def worker(config: str, layout: str, out: Path) -> None:
    """Build the model once, report {"rank", "params", "peak_growth"} to `out`."""
    import deepspeed

    from megatrain.config import deepspeed_config, load_config
    from megatrain.layout import Layout
    from megatrain.model import GPTConfig, param_count, tensor_parallel
    from megatrain.optim.grad_norm import GradNormPolicy
    from megatrain.train import distributed as dist
    from megatrain.train.build import build_model

    overrides, ranks = LAYOUTS[layout]
    cfg = load_config(config, ["data.path=unused", "train.precision=fp32", *overrides])
    model_cfg = GPTConfig.from_config(cfg, vocab_size=50257)
    if ranks > 1:
        dist.init_distributed()
        deepspeed.comm.barrier()
    place = Layout.from_config(cfg, ranks, dist.rank())
    ds_config = deepspeed_config(cfg, place, 1, GradNormPolicy.decide(cfg.optim, cfg.train, place))
    if place.tensor_parallel > 1:
        ds_config["tensor_parallel"] = tensor_parallel.autotp_config(place.tensor_parallel, model_cfg)
    before = rss_bytes()
    if ranks > 1:
        build_model(cfg, model_cfg, place, ds_config, dist.collective_device())
    else:
        from megatrain.model import GPT

        GPT(model_cfg)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    rank = dist.rank() if ranks > 1 else 0
    (out / f"rank{rank}.json").write_text(
        json.dumps({"rank": rank, "params": param_count(model_cfg), "peak_growth": max(peak - before, 0)})
    )
    if ranks > 1:
        dist.shutdown()
    os._exit(0)


def measure(config: str, layout: str) -> list[dict]:
    out = Path(tempfile.mkdtemp(prefix="bench-build-"))
    script = [str(Path(__file__).resolve()), "--worker", config, layout, "--out", str(out)]
    if LAYOUTS[layout][1] > 1:
        cmd = [DEEPSPEED, "--num_gpus", str(LAYOUTS[layout][1]), "--master_port", str(free_port()), *script]
    else:
        cmd = [sys.executable, *script]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"build failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]


def main():
    if "--worker" in sys.argv:
        i = sys.argv.index("--worker")
        worker(sys.argv[i + 1], sys.argv[i + 2], Path(sys.argv[sys.argv.index("--out") + 1]))
    p = arg_parser(__doc__)
    p.add_argument("--config", default=str(REPO / "configs" / "gpt3-350m.yaml"))
    args = p.parse_args()
    [whole] = measure(args.config, "whole")
    zero3, tp2 = measure(args.config, "zero3"), measure(args.config, "tp2")
    rows = [["one process, whole fp32 model", f"{whole['peak_growth'] / 2**30:.2f}", "1.00"]]
    for label, ranks in [("ZeRO-3 zero.Init", zero3), ("tensor-parallel 2 (ZeRO-1)", tp2)]:
        rows += [
            [
                f"{label}, rank {r['rank']} of 2",
                f"{r['peak_growth'] / 2**30:.2f}",
                f"{r['peak_growth'] / whole['peak_growth']:.2f}",
            ]
            for r in ranks
        ]
    print_table(
        f"Peak RSS growth while building {whole['params'] / 1e6:.0f}M parameters (fp32)",
        ["build", "GiB", "vs whole"],
        rows,
    )
    write_json(
        args.json,
        {
            "machine": machine(),
            "params": whole["params"],
            "whole_bytes": whole["peak_growth"],
            "zero3_rank_bytes": [r["peak_growth"] for r in zero3],
            "tp2_rank_bytes": [r["peak_growth"] for r in tp2],
            "ratio": max(r["peak_growth"] for r in zero3) / whole["peak_growth"],
            "tp2_ratio": max(r["peak_growth"] for r in tp2) / whole["peak_growth"],
        },
    )


if __name__ == "__main__":
    main()
