"""The planner's model states (weights, gradients, optimizer state) against what a live
DeepSpeed engine allocates on 2 ranks, every ZeRO stage (tests/allocated_model_states.py)."""

from __future__ import annotations

import json
import subprocess

import pytest
from helpers import DEEPSPEED, REPO

from megatrain.train.distributed import free_port


def test_model_states_are_what_deepspeed_allocates(tmp_path, small_data):
    out = tmp_path / "allocated.json"
    cmd = [
        DEEPSPEED,
        "--num_gpus",
        "2",
        "--master_port",
        str(free_port()),
        str(REPO / "tests" / "allocated_model_states.py"),
        "--data",
        str(small_data),
        "--run-dir",
        str(tmp_path / "runs"),
        "--out",
        str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert {(r["zero_stage"], r["precision"]) for r in rows} == {
        (0, "bf16"),
        (1, "bf16"),
        (2, "bf16"),
        (3, "bf16"),
        (1, "fp32"),
    }
    for r in rows:
        assert r["predicted"] == pytest.approx(r["measured"], rel=0.05), r
