"""Host memory while building a model: ZeRO-3 under deepspeed.zero.Init on 2 ranks against
one process building the whole fp32 model (what every rank did before).

Each process reports the growth of its peak RSS (ru_maxrss) from just before building
the model to just after (parameters drawn included). The goal: a rank of the 2-rank
ZeRO-3 build peaks at <= 0.6x the whole build.

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

from helpers import REPO

from megatrain.train.distributed import free_port


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def worker(config: str, zero3: bool, out: Path) -> None:
    """Build the model once, report {"rank", "params", "peak_growth"} to `out`."""
    import deepspeed

    from megatrain.config import deepspeed_config, load_config
    from megatrain.model import GPTConfig, param_count
    from megatrain.train import distributed as dist
    from megatrain.train.build import build_model

    cfg = load_config(config, ["data.path=unused", "parallel.zero_stage=3", "train.precision=fp32"])
    model_cfg = GPTConfig.from_config(cfg, vocab_size=50257)
    if zero3:
        dist.init_distributed()
        deepspeed.comm.barrier()
    before = rss_bytes()
    if zero3:
        build_model(cfg, model_cfg, deepspeed_config(cfg, dist.world_size(), 1), dist.collective_device())
    else:
        from megatrain.model import GPT

        GPT(model_cfg)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    rank = dist.rank() if zero3 else 0
    (out / f"rank{rank}.json").write_text(json.dumps({"rank": rank, "params": param_count(model_cfg),
                                                      "peak_growth": max(peak - before, 0)}))
    if zero3:
        dist.shutdown()
    os._exit(0)


def measure(config: str, zero3: bool) -> list[dict]:
    out = Path(tempfile.mkdtemp(prefix="bench-build-"))
    script = [str(Path(__file__).resolve()), "--worker", config, "--out", str(out)] + (["--zero3"] if zero3 else [])
    if zero3:
        cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
               *script]
    else:
        cmd = [sys.executable, *script]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"build failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]


def main():
    if "--worker" in sys.argv:
        i = sys.argv.index("--worker")
        worker(sys.argv[i + 1], "--zero3" in sys.argv, Path(sys.argv[sys.argv.index("--out") + 1]))
    p = arg_parser(__doc__)
    p.add_argument("--config", default=str(REPO / "configs" / "gpt3-350m.yaml"))
    args = p.parse_args()
    [whole] = measure(args.config, zero3=False)
    ranks = measure(args.config, zero3=True)
    worst = max(r["peak_growth"] for r in ranks)
    rows = [["one process, whole fp32 model", f"{whole['peak_growth'] / 2**30:.2f}", "1.00"]]
    rows += [[f"ZeRO-3 zero.Init, rank {r['rank']} of 2", f"{r['peak_growth'] / 2**30:.2f}",
              f"{r['peak_growth'] / whole['peak_growth']:.2f}"] for r in ranks]
    print_table(f"Peak RSS growth while building {whole['params'] / 1e6:.0f}M parameters (fp32)",
                ["build", "GiB", "vs whole"], rows)
    write_json(args.json, {"machine": machine(), "params": whole["params"], "whole_bytes": whole["peak_growth"],
                           "zero3_rank_bytes": [r["peak_growth"] for r in ranks],
                           "ratio": worst / whole["peak_growth"]})


if __name__ == "__main__":
    main()
