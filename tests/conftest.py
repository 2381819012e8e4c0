"""Shared fixtures: small real corpora cut from the running interpreter's stdlib, and a
tokenizer and shards trained/prepared on them once per session."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from megatrain.data import prepare_dataset
from megatrain.testing import REPO, pretrain_command
from megatrain.train.checkpoint import Checkpointer
from tokenizer import TrainerOptions, train_tokenizer

STDLIB = Path(sysconfig.get_paths()["stdlib"])
# A few stdlib packages: about 1 MB of real Python, different on every Python version.
SMALL_CORPUS = [str(STDLIB / name) for name in ("json", "email", "html", "http")]


def run_script(script: str, *args: str, check: bool = True, timeout: float = 600, env: dict | None = None):
    """Run launch/<script> in a fresh interpreter, as a user would."""
    proc = subprocess.run([sys.executable, str(REPO / "launch" / script), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="session")
def small_tokenizer(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    train_tokenizer(SMALL_CORPUS, out, TrainerOptions(vocab_size=1024), progress=False)
    return out


@pytest.fixture(scope="session")
def small_data(tmp_path_factory, small_tokenizer) -> Path:
    out = tmp_path_factory.mktemp("data") / "data"
    prepare_dataset(small_tokenizer, SMALL_CORPUS, out, valid_fraction=0.05, workers=2, shard_mb=0.1, progress=False)
    return out


TINY_CONFIG = REPO / "tests" / "configs" / "tiny.yaml"


def pretrain(run_dir, data, *sets: str, nproc: int = 2, check: bool = True, env: dict | None = None,
             config=TINY_CONFIG, resume: str = "auto", timeout: float = 600):
    """launch/pretrain.py through the real deepspeed launcher (nproc ranks), or plain python (nproc=0)."""
    cmd = pretrain_command(config, [f"run.dir={run_dir}", f"data.path={data}", *sets], nproc=nproc, resume=resume)
    before = shm_buffers()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"pretrain failed ({proc.returncode}):\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}")
    assert shm_buffers() <= before, "the run left DeepSpeed's shared-memory buffers in /dev/shm"
    return proc


def shm_buffers() -> set[str]:
    """DeepSpeed's shared-memory collective buffers on this machine (megatrain/train/distributed.py
    unlinks them; left behind they hold 69 MB per rank until the machine runs out of memory)."""
    return {p.name for p in Path("/dev/shm").glob("deepspeed_allreduce_buffer_*")}


def train_losses(run_dir) -> list[float]:
    from megatrain.train.metrics import read_metrics

    return [r["loss"] for r in read_metrics(run_dir) if r["kind"] == "train"]


@pytest.fixture(scope="session")
def runs(tmp_path_factory, small_data):
    """One 6-step, 2-rank run of tests/configs/tiny.yaml per ZeRO stage and precision (checkpoints
    at steps 3 and 6), made on first use and shared by the test modules."""
    made = {}

    def get(stage: int, precision: str):
        if (stage, precision) not in made:
            d = tmp_path_factory.mktemp(f"zero{stage}-{precision}")
            pretrain(d, small_data, f"parallel.zero_stage={stage}", f"train.precision={precision}")
            made[stage, precision] = d
        return made[stage, precision]

    return get


def copy_until(run_dir, dest, step: int):
    """A copy of a run directory as it was when checkpoint `step` was the newest."""
    shutil.copytree(run_dir, dest)
    for ckpt in Checkpointer(dest, keep=99).complete_checkpoints():
        if int(ckpt.name.split("-")[1]) > step:
            shutil.rmtree(ckpt)
    (dest / "latest").write_text(f"checkpoints/step-{step:08d}\n")
    return dest
