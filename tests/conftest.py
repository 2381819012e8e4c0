"""Shared fixtures: a tokenizer and shards trained/prepared once per session on small real
corpora cut from the running interpreter's stdlib, and tiny runs shared across modules.
Helpers that are not fixtures live in tests/helpers.py (bench/ uses them too)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers import LAYOUTS, LONG, SMALL_CORPUS, pretrain

from megatrain.data import prepare_dataset
from tokenizer import TrainerOptions, train_tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded: exports are loaded from disk


@pytest.fixture(scope="session")
def small_tokenizer(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    train_tokenizer(SMALL_CORPUS, out, TrainerOptions(vocab_size=1024), progress=False)
    return out


@pytest.fixture(scope="session")
def small_data(tmp_path_factory, small_tokenizer) -> Path:
    out = tmp_path_factory.mktemp("data") / "data"
    prepare_dataset(
        small_tokenizer, SMALL_CORPUS, out, valid_fraction=0.05, workers=2, shard_mb=0.1, progress=False
    )
    return out


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


@pytest.fixture(scope="session")
def uninterrupted(tmp_path_factory, small_data):
    """30 steps on a layout of LAYOUTS (checkpoints at 10, 20, 30), recording each rank's samples."""
    made = {}

    def get(layout: str):
        if layout not in made:
            root = tmp_path_factory.mktemp(layout)
            nproc, sets = LAYOUTS[layout]
            pretrain(root / "run", small_data, *sets, *LONG, nproc=nproc, record_samples=root / "samples")
            made[layout] = root
        return made[layout]

    return get


def pytest_collection_modifyitems(config, items):
    """Every test under tests/e2e/ goes through the real deepspeed launcher."""
    for item in items:
        if "e2e" in item.path.parts:
            item.add_marker(pytest.mark.launcher)
