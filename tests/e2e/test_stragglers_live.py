"""A straggler is named: rank 1 sleeps in every forward pass from step 3 on (the tests'
fault hook); with the ranks' times gathered every 2 steps, it is named at steps 4 and 6 with
its host and local rank, and not at step 2, when the ranks were even. Background checkpoints
that do not fit the host-memory budget fall back to synchronous ones. The rules alone:
tests/unit/test_stragglers.py."""

from __future__ import annotations

import socket

from helpers import pretrain

from megatrain.train.metrics import read_events, read_metrics


def test_a_slow_rank_is_named_within_the_gathering_interval(tmp_path, small_data):
    run = tmp_path / "run"
    # The same run asks for background checkpoints whose host copies cannot fit the budget:
    # it says so at start and writes them synchronously.
    tight = ["checkpoint.async_save=true", "spike.snapshot_memory_gb=0.000001"]
    proc = pretrain(run, small_data, "logging.straggler_every=2", *tight, faults=["slow@3:1"])
    named = [e for e in read_events(run) if e["event"] == "straggler"]
    assert [(e["step"], e["rank"], e["host"], e["local_rank"]) for e in named] == [
        (4, 1, socket.gethostname(), 1),
        (6, 1, socket.gethostname(), 1),
    ]
    assert all(e["forward_s"] >= 2 * 0.3 and e["own_work_s"] > 1.5 * e["median_s"] for e in named)
    rows = {r["step"]: r for r in read_metrics(run) if r["kind"] == "train"}
    assert [s for s, r in rows.items() if "slowest_rank" in r] == [2, 4, 6]  # measured steps only
    assert rows[4]["slowest_rank"] == rows[6]["slowest_rank"] == 1 and rows[6]["slowest_forward_s"] >= 0.6
    out = proc.stdout + proc.stderr
    assert out.count("straggler at step") == 2 and "straggler at step 4: rank 1 (" in out
    assert "checkpoint: async_save's host copies need" in out and "written synchronously" in out
    saved = [e for e in read_events(run) if e["event"] == "checkpoint"]
    assert [e["step"] for e in saved] == [3, 6] and not any(e.get("background") for e in saved)
