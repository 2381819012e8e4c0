"""Driving real runs from tests and benchmarks (bench/ imports this too): launcher
commands, rank processes, watching a run's files while it goes, injected faults.

    cmd = pretrain_command("tests/configs/tiny.yaml", ["run.dir=runs/x", "data.path=data"], nproc=2)
    subprocess.run(supervise_command(cmd, max_restarts=3))
    for p in rank_processes(launcher.pid): ...
    if launches(run_dir) == 2 and last_train_row(run_dir)["step"] >= 5: kill_a_rank(sup.pid, rng, ...)
    pretrain_command(..., faults=["nan_loss@23"], poison="480:32")   # tests/faulty_pretrain.py
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import psutil
import torch

from megatrain.supervisor import rank_processes
from megatrain.train import layout_free
from megatrain.train.checkpoint import Checkpointer, checkpoint_step
from megatrain.train.distributed import free_port
from megatrain.train.metrics import read_events, read_metrics

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
# The deepspeed launcher: beside the interpreter in a venv, else on PATH (`pip install --target DIR`
# puts it in DIR/bin, as on the GPU machine: tests/gpu/on_device.sh).
DEEPSPEED = next(
    (str(p) for p in [Path(sys.executable).parent / "deepspeed"] if p.exists()),
    shutil.which("deepspeed") or "deepspeed",
)
FAULTY_PRETRAIN = REPO / "tests" / "faulty_pretrain.py"
TINY_CONFIG = REPO / "tests" / "configs" / "tiny.yaml"
STDLIB = Path(sysconfig.get_paths()["stdlib"])
# Layouts the resume and tensor-parallel tests run 30 steps on (checkpoints at 10, 20, 30).
LONG = ["train.max_steps=30", "checkpoint.every_steps=10", "train.eval_every=0"]
LAYOUTS = {  # name: (ranks, settings)
    "2r-zero1": (2, ["parallel.zero_stage=1"]),
    "1r-zero0": (1, ["parallel.zero_stage=0"]),
    "2r-zero3": (2, ["parallel.zero_stage=3"]),
    "pipe2-zero1": (2, ["parallel.pipeline_stages=2", "parallel.zero_stage=1"]),
    "1r-zero2": (1, ["parallel.zero_stage=2"]),
    "2r-zero2": (2, ["parallel.zero_stage=2"]),
    "tp2-zero1": (2, ["parallel.tensor_parallel=2", "parallel.zero_stage=1"]),
    "tp2-zero2": (2, ["parallel.tensor_parallel=2", "parallel.zero_stage=2"]),
    "tp2pp2-zero1": (
        4,
        ["parallel.tensor_parallel=2", "parallel.pipeline_stages=2", "parallel.zero_stage=1"],
    ),
}
# A few stdlib packages: about 1 MB of real Python, different on every Python version.
SMALL_CORPUS = [str(STDLIB / name) for name in ("json", "email", "html", "http")]


def run_script(script: str, *args: str, check: bool = True, timeout: float = 600, env: dict | None = None):
    """Run launch/<script> in a fresh interpreter, as a user would."""
    proc = subprocess.run(
        [sys.executable, str(LAUNCH / script), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def pretrain(
    run_dir,
    data,
    *sets: str,
    nproc: int = 2,
    check: bool = True,
    config=TINY_CONFIG,
    resume: str = "auto",
    timeout: float = 600,
    env: dict | None = None,
    **faults,
):
    """launch/pretrain.py through the real deepspeed launcher (nproc ranks), or plain python
    (nproc=0); `faults` as pretrain_command takes them. Checks that no shared memory is left."""
    cmd = pretrain_command(
        config, [f"run.dir={run_dir}", f"data.path={data}", *sets], nproc=nproc, resume=resume, **faults
    )
    before = shm_buffers()
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"pretrain failed ({proc.returncode}):\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}"
        )
    assert shm_buffers() <= before, "the run left DeepSpeed's shared-memory buffers in /dev/shm"
    return proc


def shm_buffers() -> set[str]:
    """DeepSpeed's shared-memory collective buffers on this machine (megatrain/train/distributed.py
    unlinks them; left behind they hold 69 MB per rank until the machine runs out of memory)."""
    return {p.name for p in Path("/dev/shm").glob("deepspeed_allreduce_buffer_*")}


def train_losses(run_dir) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir) if r["kind"] == "train"]


def fell_by(losses: list[float], amount: float) -> bool:
    """The mean of the last three losses is `amount` below the mean of the first three."""
    return sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - amount


def copy_until(run_dir, dest, step: int):
    """A copy of a run directory as it was when checkpoint `step` was the newest."""
    shutil.copytree(run_dir, dest)
    for ckpt in Checkpointer(dest, keep=99).complete_checkpoints():
        if checkpoint_step(ckpt) > step:
            shutil.rmtree(ckpt)
    (dest / "latest").write_text(f"checkpoints/step-{step:08d}\n")
    return dest


def pretrain_command(
    config,
    sets: list[str],
    nproc: int = 2,
    resume: str = "auto",
    faults: list[str] = (),
    poison: str | None = None,
    fault_state: str | None = None,
    record_samples: str | None = None,
) -> list[str]:
    """launch/pretrain.py through the real deepspeed launcher with `nproc` ranks on a free
    port, or in plain python (nproc=0); `sets` are KEY=VALUE overrides. With faults,
    poison or record_samples, tests/faulty_pretrain.py runs instead (see there)."""
    injected = [
        *[a for f in faults for a in ("--fault", f)],
        *(["--poison", poison] if poison else []),
        *(["--fault-state", str(fault_state)] if fault_state else []),
        *(["--record-samples", str(record_samples)] if record_samples else []),
    ]
    entry = FAULTY_PRETRAIN if injected else LAUNCH / "pretrain.py"
    script = [
        str(entry),
        *injected,
        "--config",
        str(config),
        "--resume",
        resume,
        *[a for s in sets for a in ("--set", s)],
    ]
    if not nproc:
        return [sys.executable, *script]
    return [DEEPSPEED, "--num_gpus", str(nproc), "--master_port", str(free_port()), *script]


def supervise_command(cmd: list[str], max_restarts: int, delay: float = 0, *options: str) -> list[str]:
    return [
        sys.executable,
        str(LAUNCH / "supervise.py"),
        "--max-restarts",
        str(max_restarts),
        "--delay",
        str(delay),
        *options,
        "--",
        *cmd,
    ]


def launches(run_dir: Path) -> int:
    """Launches of a run that got going: each writes a "start" event after it has resumed
    (and dropped the metrics rows of the timeline it abandoned), so later rows are its own."""
    return _read(lambda: sum(e["event"] == "start" for e in read_events(run_dir)), 0)


def last_train_row(run_dir: Path) -> dict:
    """The newest training row of metrics.jsonl, or {"step": 0}."""
    return _read(
        lambda: ([r for r in read_metrics(run_dir) if r["kind"] == "train"] or [{"step": 0}])[-1], {"step": 0}
    )


def _read(fn, default):
    try:
        return fn()
    except (OSError, ValueError):  # read while rank 0 appends (a half-written line)
        return default


def kill_a_rank(
    root_pid: int, rng: random.Random, step_time: float, still_wanted=lambda: True
) -> psutil.Process | None:
    """SIGKILL a random rank below `root_pid` at a random moment of the next step (the
    last one took `step_time` seconds); the victim, or None when there was no rank or
    `still_wanted()` says, after the wait, that the run has moved on (steps can be faster
    than the wait: a kill meant for one window must not land in the next)."""
    time.sleep(rng.uniform(0, min(step_time, 0.5)))
    ranks = rank_processes(root_pid)
    if not ranks or not still_wanted():
        return None
    victim = rng.choice(ranks)
    victim.send_signal(signal.SIGKILL)
    return victim


def samples_by_step(*dirs, steps: range) -> dict[int, list[int]]:
    """Every rank's dataset indices of each step in `steps`, sorted (the global batch as a
    multiset; a model-parallel group's first rank stands for the others, which draw the same)."""
    found = defaultdict(list)
    for d in dirs:
        for f in d.glob("samples-rank*.jsonl"):
            for line in f.read_text().splitlines():
                row = json.loads(line)
                if row["step"] in steps and row["mp_rank"] == 0:
                    found[row["step"]] += row["samples"]
    return {step: sorted(v) for step, v in found.items()}


def same_values(a, b, where: str = "") -> None:
    """Two loaded checkpoint files (or any nested state) hold equal values: tensors and arrays
    bit for bit, objects by their attributes."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and np.array_equal(a, b), where
    elif isinstance(a, dict):
        assert sorted(map(str, a)) == sorted(map(str, b)), where
        for k in a:
            same_values(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            same_values(x, y, f"{where}[{i}]")
    elif hasattr(a, "__dict__"):
        same_values(vars(a), vars(b), where)
    else:
        assert a == b, where


def flat_state(run, step: int) -> tuple[dict[str, torch.Tensor], int]:
    """Each kind of training state (weights, moments) of a checkpoint, as one vector."""
    tensors, opt_step = layout_free.read(run / "checkpoints" / f"step-{step:08d}")
    return {
        kind: torch.cat([tensors[k].flatten() for k in sorted(tensors) if k.startswith(f"{kind}/")])
        for kind in layout_free.KINDS
    }, opt_step


def assert_same_state(a, b, rel: float):
    (va, step_a), (vb, step_b) = a, b
    assert step_a == step_b
    for kind in layout_free.KINDS:
        assert ((va[kind] - vb[kind]).norm() / va[kind].norm()).item() < rel, kind


def accumulation_error(
    data, stage: int, micro_batches: int, *sets: str, size: tuple[int, int] = (64, 2)
) -> dict:
    """In a world of one (call it in its own process): the gradient megatrain's optimizer is
    handed after one bf16 step of `micro_batches` micro-batches under ZeRO `stage`, against the
    same bf16 model's micro-batch gradients summed exactly (float64): the relative error the
    accumulation and reduction add ({"error", "wrapper"}), and the bf16 compute's own error
    against a float64 model ("compute_error") for scale. size: (d_model, n_layer)."""
    from megatrain.config import load_config
    from megatrain.model import GPT, GPTConfig
    from megatrain.model.gpt import initial_value
    from megatrain.train.train_module import TrainModule, init_layout

    cfg = load_config(
        TINY_CONFIG,
        [
            f"data.path={data}",
            f"parallel.zero_stage={stage}",
            "train.precision=bf16",
            f"model.d_model={size[0]}",
            "model.n_head=4",
            f"model.n_layer={size[1]}",
            *sets,
        ],
    )
    shape = GPTConfig.from_config(cfg, 1024)
    module = TrainModule(cfg, shape, micro_batches, init_layout(cfg))
    opt, seen = module.client_optimizer, {}
    step = opt.step

    def recording_step(*args, **kwargs):  # the gradients as the optimizer gets them
        seen.update(
            {
                id(p): p.grad.double().clone()
                for g in opt.param_groups
                for p in g["params"]
                if p.grad is not None
            }
        )
        return step(*args, **kwargs)

    opt.step = recording_step
    t = cfg.train
    batches = [
        torch.randint(0, 1024, (t.micro_batch, t.seq_len + 1), generator=torch.Generator().manual_seed(i))
        for i in range(micro_batches)
    ]
    todo = iter(batches)
    module.set_lr(0.0)
    module.step(lambda: (lambda b: (b[:, :-1], b[:, 1:]))(next(todo)))
    got, named = {}, dict(module.engine.module.named_parameters())
    masters = {
        id(lp): hp
        for lps, hps in zip(
            getattr(module.engine.optimizer, "fp16_groups", []),
            getattr(module.engine.optimizer, "fp32_groups", []),
            strict=True,
        )
        for lp, hp in zip(lps, hps, strict=True)
    }
    for name, p in named.items():
        mapping = getattr(p, "_hp_mapping", None)
        if mapping is not None:  # a flat fp32 partition (ZeRO 1-2, BF16_Optimizer): the parameter's fragment
            address = mapping.get_hp_fragment_address()
            flat = seen[id(opt.param_groups[mapping.param_group_index]["params"][0])]
            got[name] = flat[address.start : address.start + address.numel]
        else:  # ZeRO-0: DeepSpeed's fp32 copy of the parameter
            got[name] = seen[id(masters.get(id(p), p))].reshape(-1)
    exact, summed = (
        {n: torch.zeros(p.numel(), dtype=torch.float64) for n, p in named.items()} for _ in range(2)
    )
    for dtype, into in ((torch.float64, exact), (torch.bfloat16, summed)):
        model = GPT(shape).to(dtype)
        for n, p in model.named_parameters():
            p.data.copy_(initial_value(n, p.shape, shape).bfloat16())
        for b in batches:
            model.zero_grad()
            model(b[:, :-1], b[:, 1:]).backward()
            for n, p in model.named_parameters():
                into[n] += p.grad.double().reshape(-1) / micro_batches

    def relative(a, b):
        return float(torch.cat([a[n] - b[n] for n in b]).norm() / torch.cat(list(b.values())).norm())

    return {
        "error": relative(got, summed),
        "compute_error": relative(summed, exact),
        "wrapper": type(module.engine.optimizer).__name__,
    }


def edit_megatrain_json(ckpt: Path, edit) -> None:
    """edit(state) on a checkpoint's megatrain.json, its manifest entry kept consistent (as an
    earlier megatrain, or a hand, would have written it)."""
    from megatrain.files import file_sha256

    path = ckpt / "megatrain.json"
    state = json.loads(path.read_text())
    edit(state)
    path.write_text(json.dumps(state))
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["files"]["megatrain.json"] = {"bytes": path.stat().st_size, "sha256": file_sha256(path)}
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
