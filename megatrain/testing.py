"""Driving real runs from tests and benchmarks: launcher commands, ports, rank processes,
and watching a run's files while it goes.

    cmd = pretrain_command("tests/configs/tiny.yaml", ["run.dir=runs/x", "data.path=data"], nproc=2)
    subprocess.run(supervise_command(cmd, max_restarts=3))
    for p in rank_processes(launcher.pid): ...
    if launches(run_dir) == 2 and last_train_row(run_dir)["step"] >= 5: kill_a_rank(sup.pid, rng, ...)

Needs a source checkout: the entry scripts in launch/ beside this package.
"""

from __future__ import annotations

import json
import random
import signal
import socket
import sys
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pretrain_command(config, sets: list[str], nproc: int = 2, resume: str = "auto") -> list[str]:
    """launch/pretrain.py through the real deepspeed launcher with `nproc` ranks on a free
    port, or in plain python (nproc=0); `sets` are KEY=VALUE overrides."""
    script = [str(LAUNCH / "pretrain.py"), "--config", str(config), "--resume", resume,
              *[a for s in sets for a in ("--set", s)]]
    if not nproc:
        return [sys.executable, *script]
    return [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(nproc),
            "--master_port", str(free_port()), *script]


def supervise_command(cmd: list[str], max_restarts: int, delay: float = 0) -> list[str]:
    return [sys.executable, str(LAUNCH / "supervise.py"), "--max-restarts", str(max_restarts),
            "--delay", str(delay), "--", *cmd]


def rank_processes(root_pid: int) -> list[psutil.Process]:
    """The training ranks below a launcher (or a supervisor): the processes that DeepSpeed's
    launcher started with --local_rank."""
    try:
        procs = psutil.Process(root_pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    return [p for p in procs if any(a.startswith("--local_rank=") for a in _cmdline(p))]


def _cmdline(p: psutil.Process) -> list[str]:
    try:
        return p.cmdline()
    except psutil.Error:
        return []


def launches(run_dir: Path) -> int:
    """Launches of a run that got going: each writes a "start" event after it has resumed
    (and dropped the metrics rows of the timeline it abandoned), so later rows are its own."""
    path = Path(run_dir) / "events.jsonl"
    return _read(lambda: sum(json.loads(line)["event"] == "start" for line in path.read_text().splitlines()), 0)


def last_train_row(run_dir: Path) -> dict:
    """The newest training row of metrics.jsonl, or {"step": 0}."""
    from megatrain.train.metrics import read_metrics

    return _read(lambda: ([r for r in read_metrics(run_dir) if r["kind"] == "train"] or [{"step": 0}])[-1],
                 {"step": 0})


def _read(fn, default):
    try:
        return fn()
    except (OSError, json.JSONDecodeError):  # read while rank 0 appends
        return default


def kill_a_rank(root_pid: int, rng: random.Random, step_time: float) -> psutil.Process | None:
    """SIGKILL a random rank below `root_pid` at a random moment of the next step (the
    last one took `step_time` seconds); the victim, or None when there was no rank."""
    time.sleep(rng.uniform(0, min(step_time, 0.5)))
    ranks = rank_processes(root_pid)
    if not ranks:
        return None
    victim = rng.choice(ranks)
    victim.send_signal(signal.SIGKILL)
    return victim
