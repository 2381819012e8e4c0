"""Checkpoints written in the background (checkpoint.async_save) keep every promise of the
synchronous ones: the same files bit for bit, an exact resume, `latest` intact through a
kill -9 in the middle of a background write, a resume on another layout, and a writer's
failure stopping the run with exit 1 and one line. The protocol alone (settling, failing,
abandoning a write): tests/unit/test_checkpoint_writer.py."""

from __future__ import annotations

import pytest
import torch
from helpers import LAYOUTS, LONG, copy_until, pretrain, same_values, train_losses

from megatrain.train.checkpoint import Checkpointer
from megatrain.train.metrics import read_events, read_metrics

ASYNC = "checkpoint.async_save=true"


def _same_checkpoint(ours, theirs) -> None:
    files = sorted(p.name for p in ours.glob("*.pt"))
    assert files == sorted(p.name for p in theirs.glob("*.pt")) and files
    for name in files:
        same_values(
            torch.load(ours / name, weights_only=False), torch.load(theirs / name, weights_only=False), name
        )


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory, small_data):
    """2 ranks, ZeRO-1, 30 steps with background checkpoints at 10, 20, 30: rank 1 is killed
    (SIGKILL, the whole run goes) while its writer is halfway through checkpoint 20's files;
    then `--resume auto` finishes the run."""
    run = tmp_path_factory.mktemp("async") / "run"
    nproc, sets = LAYOUTS["2r-zero1"]
    killed = pretrain(
        run, small_data, *sets, *LONG, ASYNC, nproc=nproc, check=False, faults=["writer_kill@20:1"]
    )
    assert killed.returncode != 0 and "SIGKILL at writer_kill@20" in killed.stdout + killed.stderr
    after_kill = {
        "latest": Checkpointer(run, keep=3).latest().name,
        "verify": Checkpointer.verify(run / "checkpoints" / "step-00000010"),
        "published": [p.name for p in Checkpointer(run, keep=3).complete_checkpoints()],
    }
    copy_of_10 = tmp_path_factory.mktemp("async10") / "run"
    copy_until(run, copy_of_10, 10)
    pretrain(run, small_data, *sets, *LONG, ASYNC, nproc=nproc)
    return run, after_kill, copy_of_10


def test_a_kill_mid_write_leaves_latest_intact_and_the_resume_is_exact(killed_and_resumed, uninterrupted):
    run, after_kill, _ = killed_and_resumed
    assert after_kill == {"latest": "step-00000010", "verify": None, "published": ["step-00000010"]}
    reference = uninterrupted("2r-zero1") / "run"  # the same run, synchronous checkpoints, never stopped
    assert train_losses(run) == train_losses(reference)  # bitwise: training saw nothing of the writes
    for step in (10, 20, 30):  # the files are the synchronous ones, value for value
        name = f"step-{step:08d}"
        assert Checkpointer.verify(run / "checkpoints" / name) is None
        _same_checkpoint(run / "checkpoints" / name, reference / "checkpoints" / name)
    rows = [r for r in read_metrics(run) if r["kind"] == "checkpoint"]
    assert [r["step"] for r in rows] == [10, 20, 30]
    assert all(r["stall_s"] > 0 and r["write_s"] > 0 and r["bytes"] > 0 for r in rows)
    events = [e for e in read_events(run) if e["event"] == "checkpoint"]
    assert [e["step"] for e in events if e.get("background")] == [10, 20, 30]


def test_an_async_checkpoint_resumes_on_another_layout(killed_and_resumed, uninterrupted, small_data):
    """Checkpoint 10 (written in the background) on one rank, ZeRO-0: the losses of the run
    that never stopped, to 1e-5."""
    _, _, copy_of_10 = killed_and_resumed
    pretrain(copy_of_10, small_data, *LAYOUTS["1r-zero0"][1], *LONG, ASYNC, nproc=1)
    reference = train_losses(uninterrupted("2r-zero1") / "run")
    assert train_losses(copy_of_10) == pytest.approx(reference, rel=1e-5)


def test_a_writer_error_stops_the_run_with_one_line(tmp_path, small_data):
    """Rank 1's writer finds the disk full at checkpoint 4: every rank stops with exit 1 (a
    restart may succeed) and says so in one line; checkpoint 2 stays `latest`."""
    run = tmp_path / "run"
    proc = pretrain(
        run, small_data, "checkpoint.every_steps=2", ASYNC, check=False, faults=["writer_error@4:1"]
    )
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    line = (
        f"error: {run}/checkpoints/.tmp-step-00000004: checkpoint of step 4 could not be written (rank 1, "
        "writing in the background: No space left on device); removed it, `latest` still names step-00000002"
    )
    assert line in proc.stdout + proc.stderr
    files = Checkpointer(run, keep=3)
    assert files.latest().name == "step-00000002" and Checkpointer.verify(files.latest()) is None
    assert [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step-")] == [
        "step-00000002"
    ]
    assert not list((run / "checkpoints").glob(".tmp-*"))
