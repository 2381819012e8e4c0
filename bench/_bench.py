"""Shared by the benchmark scripts: timing, a printed table, JSON output.

Benchmarks compare megatrain with its best peer side by side in one run: CPU figures
move by up to 4x when anything else runs on the machine, so only ratios taken within
one run mean something.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

# bench/tokenizer.py is named like the `tokenizer` package it measures, and Python puts
# a script's folder first on sys.path. Every bench script imports this module first
# (ruff.toml keeps it first); taking bench/ off the path makes `import tokenizer` find
# the package.
_here = str(Path(__file__).resolve().parent)
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
# The ~20M-parameter GPT of bench/train.py's second row (bench/tensor_parallel.py's model too).
GPT_20M = (
    "model.n_layer=10 model.d_model=384 model.n_head=6 train.seq_len=256 train.micro_batch=4 "
    "schedule.batch_final_tokens=2048 schedule.batch_ramp_tokens=0"
).split()
sys.path.append(str(REPO / "tests"))  # tests/helpers.py: launcher commands, run watchers, faults


def arg_parser(doc: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", metavar="FILE", help="also write the numbers to FILE")
    return p


def median_seconds(fn, repeat: int = 3, warmup: int = 0) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def interleaved_medians(fns: dict, repeat: int = 3, warmup: int = 0) -> dict:
    """Median seconds of each function, timed round-robin (a, b, c, a, b, c, ...) so that
    drift in the machine's speed falls on every row alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def print_table(title: str, columns: list[str], rows: list[list]) -> None:
    cells = [[_fmt(v) for v in row] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    print(f"\n{title}")
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for r in cells:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(v)


def write_json(path: str | None, data: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(data, indent=2) + "\n")
        print(f"\nwrote {path}")


def machine() -> dict:
    return {"cpus": os.cpu_count(), "load_avg_1m": os.getloadavg()[0]}


def stdlib_data(
    work: Path, vocab_size: int = 4096, sample_bytes: int = int(3e6), valid_fraction: float = 0.0
) -> Path:
    """A tokenizer trained on the running interpreter's stdlib and its shards, under `work`."""
    from megatrain.data import prepare_dataset
    from tokenizer import TrainerOptions, train_tokenizer

    train_tokenizer(
        ["builtin:stdlib"],
        work / "tok",
        TrainerOptions(vocab_size=vocab_size, sample_bytes=sample_bytes),
        progress=False,
    )
    prepare_dataset(
        work / "tok", ["builtin:stdlib"], work / "data", valid_fraction=valid_fraction, progress=False
    )
    return work / "data"


def launched_step_time(run: Path, sets: list[str], nproc: int, threads: int = 1, skip: int = 2) -> float:
    """Median seconds per step (after `skip` warm-up steps) of configs/tiny-cpu.yaml with
    `sets`, launched on `nproc` ranks through the real deepspeed launcher, each rank
    limited to `threads` threads. The run directory is removed afterwards."""
    import shutil
    import subprocess

    from helpers import pretrain_command

    from megatrain.train.metrics import read_metrics

    cmd = pretrain_command(
        REPO / "configs" / "tiny-cpu.yaml", [*sets, f"run.dir={run}"], nproc=nproc, resume="none"
    )
    proc = subprocess.run(
        cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)}
    )
    if proc.returncode != 0:
        raise RuntimeError(f"run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    times = [r["step_time"] for r in read_metrics(run) if r["kind"] == "train"][skip:]
    shutil.rmtree(run, ignore_errors=True)
    return statistics.median(times)
