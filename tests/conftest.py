"""Shared fixtures: small real corpora cut from the running interpreter's stdlib, and a
tokenizer and shards trained/prepared on them once per session."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from megatrain.data import prepare_dataset
from tokenizer import TrainerOptions, train_tokenizer

REPO = Path(__file__).resolve().parents[1]
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
