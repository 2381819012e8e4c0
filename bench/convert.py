"""Host memory of converting a checkpoint to its layout-free form on one process (what each
rank does for its share when a run resumes on another layout; launch/convert_checkpoint.py
--layout-free).

Trains a GPT-3 Small-shaped model (vocabulary of the stdlib tokenizer) for one step on 2
ranks under ZeRO-2, fp32, then converts its checkpoint in a fresh process and reports, in
bytes per parameter, the growth of that process's peak resident memory over the conversion:
its anonymous memory (what must fit in RAM) and its resident file pages (the memory-mapped partition files:
the kernel's page cache, which it can drop and read again), sampled every 5 ms. The file
holds 12 bytes per parameter (fp32 weight and two moments).

    python bench/convert.py [--json FILE]
"""

from __future__ import annotations

from _bench import arg_parser, machine, print_table, stdlib_data, write_json

import json
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from helpers import REPO, TINY_CONFIG, pretrain

MODEL = [
    "model.n_layer=12",
    "model.d_model=768",
    "model.n_head=12",
    "train.seq_len=64",
    "train.micro_batch=1",
    "schedule.batch_final_tokens=128",
    "schedule.batch_ramp_tokens=0",
    "train.max_steps=1",
    "train.eval_every=0",
    "checkpoint.every_steps=1",
    "parallel.zero_stage=2",
    "train.precision=fp32",
]


def child(ckpt: str) -> None:
    from megatrain.model import GPTConfig, param_count
    from megatrain.train import layout_free
    from megatrain.train.checkpoint import Checkpointer

    params = param_count(GPTConfig.from_shape(Checkpointer.read_state(Path(ckpt))["model_shape"]))
    before, peak, done = resident(), {"RssAnon": 0, "RssFile": 0}, threading.Event()

    def sample():
        while not done.wait(0.005):
            now = resident()
            for k in peak:
                peak[k] = max(peak[k], now[k])

    sampler = threading.Thread(target=sample)
    sampler.start()
    out = layout_free.write(Path(ckpt))
    done.set()
    sampler.join()
    print(
        "RESULT "
        + json.dumps(
            {
                "params": params,
                "anon_growth": peak["RssAnon"] - before["RssAnon"],
                "file_pages_growth": peak["RssFile"] - before["RssFile"],
                "file": out.stat().st_size,
            }
        )
    )


def resident() -> dict[str, int]:
    """This process's resident anonymous memory and file pages, bytes."""
    with open("/proc/self/status") as f:
        rows = dict(line.split(":", 1) for line in f)
    return {k: int(rows[k].split()[0]) * 1024 for k in ("RssAnon", "RssFile")}


def main():
    if "--child" in sys.argv:
        return child(sys.argv[sys.argv.index("--child") + 1])
    args = arg_parser(__doc__).parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-convert-"))
    data = stdlib_data(work)
    pretrain(work / "run", data, *MODEL, config=TINY_CONFIG, timeout=1800)
    [ckpt] = sorted((work / "run" / "checkpoints").glob("step-*"))
    proc = subprocess.run(
        [sys.executable, __file__, "--child", str(ckpt)], capture_output=True, text=True, cwd=REPO
    )
    found = [
        json.loads(x.split("RESULT ", 1)[1]) for x in proc.stdout.splitlines() if x.startswith("RESULT ")
    ]
    if not found:
        raise RuntimeError(f"conversion failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    r, n = found[0], found[0]["params"]
    print_table(
        f"converting a 2-rank ZeRO-2 checkpoint of {n / 1e6:.0f}M parameters (fp32) to the layout-free "
        "file, one process: peak growth",
        ["memory", "GiB", "bytes per parameter"],
        [
            ["anonymous (must fit in RAM)", r["anon_growth"] / 2**30, f"{r['anon_growth'] / n:.1f}"],
            [
                "file pages (mapped partitions)",
                r["file_pages_growth"] / 2**30,
                f"{r['file_pages_growth'] / n:.1f}",
            ],
            ["the file written", r["file"] / 2**30, f"{r['file'] / n:.1f}"],
        ],
    )
    shutil.rmtree(work, ignore_errors=True)
    write_json(args.json, {"machine": machine(), **r, "anon_bytes_per_param": r["anon_growth"] / n})


if __name__ == "__main__":
    main()
