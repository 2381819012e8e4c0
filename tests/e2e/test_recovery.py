"""Runs that heal themselves: spike rollback and data skip, crashes, damaged checkpoints,
preemption. Real launcher, 2 ranks on CPU, the tiny model, real faults."""

from __future__ import annotations

import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import (
    REPO,
    TINY_CONFIG,
    copy_until,
    kill_a_rank,
    last_train_row,
    launches,
    pretrain,
    pretrain_command,
    rank_processes,
    shm_buffers,
    supervise_command,
    train_losses,
)

from megatrain.train import prebuilt_ops
from megatrain.train.checkpoint import Checkpointer
from megatrain.train.metrics import read_events, read_metrics

# 16 samples (512 tokens) per step with 2 ranks; the guard judges from step 8 on.
GUARD = [
    "train.max_steps=40",
    "train.eval_every=0",
    "checkpoint.every_steps=10",
    "spike.min_history=8",
    "spike.window=16",
    "spike.snapshot_every=5",
    "spike.skip=4",
    "spike.threshold=5",
]
POISON_AT = 30 * 16  # the samples of steps 31 and 32


def rollbacks(run) -> list[dict]:
    return [e for e in read_events(run) if e["event"] == "rollback"]


def _recovered_equals_skipping_from_the_start(
    run, small_data, tmp_path, *layout, rel: float = 0.0, nproc: int = 2
):
    [rb] = rollbacks(run)
    restored = rb["restored_step"]
    assert rb["position"] == restored * 16  # the sampler position at the rollback point
    clean = tmp_path / "skipped-from-the-start"
    skip = f"data.skip=[[{rb['position']}, {rb['skipped_samples']}]]"
    pretrain(clean, small_data, *GUARD, *layout, skip, nproc=nproc)
    assert not rollbacks(clean)  # the run that never saw the poison has no spike
    # step for step: the rollback restored everything
    assert train_losses(run) == (pytest.approx(train_losses(clean), rel=rel) if rel else train_losses(clean))
    # and both end at the same sample position, having skipped the same stretch
    final = [
        Checkpointer.read_state(Checkpointer(r, keep=9).latest())["state"]["data"]["sampler"]
        for r in (run, clean)
    ]
    assert final[0] == final[1] and final[0]["skipped"] == [[rb["position"], rb["skipped_samples"]]]
    rows = read_metrics(run)
    marker = [r for r in rows if r["kind"] == "rollback"]
    assert marker == [
        {
            "kind": "rollback",
            "step": restored,
            "tokens": restored * 512,
            "spike_step": rb["step"],
            "position": rb["position"],
            "skipped_samples": rb["skipped_samples"],
        }
    ]
    assert [r["step"] for r in rows if r["kind"] == "train"] == list(range(1, 41))
    return rb


TP2_PP2_SP = ["parallel.tensor_parallel=2", "parallel.pipeline_stages=2", "parallel.sequence_parallel=true"]


@pytest.mark.parametrize(
    "layout,source",
    [
        # whole parameters, on 2 stages of 2 tensor ranks each holding half the sequence (4 ranks)
        (["parallel.zero_stage=0", "train.precision=fp32", *TP2_PP2_SP], "memory"),
        # the in-memory point holds DeepSpeed's flat fp32 partitions and the bf16 module weights
        (["parallel.zero_stage=2", "train.precision=bf16"], "memory"),
        # ZeRO-3 keeps parameters in DeepSpeed-private partitions: back to the disk checkpoint,
        # here written in the background (the rollback publishes it first if still in flight)
        (
            ["parallel.zero_stage=3", "train.precision=fp32", "checkpoint.async_save=true"],
            "checkpoints/step-00000030",
        ),
    ],
    ids=["zero0-fp32-tp2-pp2-sp", "zero2-bf16", "zero3-fp32-disk"],
)
def test_poisoned_data_is_rolled_back_and_skipped(tmp_path, small_data, layout, source):
    run = tmp_path / "run"
    nproc = 4 if "parallel.pipeline_stages=2" in layout else 2
    pretrain(run, small_data, *GUARD, *layout, poison=f"{POISON_AT}:32", nproc=nproc)
    rb = _recovered_equals_skipping_from_the_start(run, small_data, tmp_path, *layout, nproc=nproc)
    assert rb["began"] == 31 and rb["signal"] == "loss" and rb["loss"] > rb["limit"] > rb["baseline"]
    assert rb["restored_step"] == 30 and rb["source"].endswith(source)
    assert rb["skipped_samples"] >= 32  # past every poisoned sample
    assert rb["skipped_samples"] == max(4 * 16, (rb["step"] - 30) * 16)


def test_non_finite_loss_takes_the_same_path(tmp_path, small_data):
    """With DeepSpeed's own AdamW (optim.name=adamw), whose step count is a plain int that the
    rollback point carries too (else the steps after it differ by ~1e-5). Its CPU kernel keeps
    the betas' powers as a running product that a step count set back recomputes, so the
    runs agree to 1e-6, not bitwise (DeepSpeed's GPU kernel takes the powers from the count)."""
    run = tmp_path / "run"
    pretrain(run, small_data, *GUARD, "optim.name=adamw", faults=["nan_loss@23"])
    rb = _recovered_equals_skipping_from_the_start(run, small_data, tmp_path, "optim.name=adamw", rel=1e-6)
    assert rb["step"] == 23 and rb["began"] == 23 and math.isnan(rb["loss"]) and rb["restored_step"] == 20


def test_rollback_cap_stops_a_run_that_keeps_spiking(tmp_path, small_data):
    """Poison far longer than the skip: the run spikes after every rollback, gives up after
    spike.max_rollbacks with exit code 3, a clear message, and a clean checkpoint. With
    patience 2 and a checkpoint every step, each spike leaves a checkpoint of its first step
    above the threshold: the abandoned timeline's, which must not survive (keep=1)."""
    run = tmp_path / "run"
    proc = pretrain(
        run,
        small_data,
        *GUARD,
        "spike.skip=1",
        "spike.max_rollbacks=2",
        "spike.patience=2",
        "checkpoint.every_steps=1",
        "checkpoint.keep=1",
        check=False,
        poison=f"{POISON_AT}:2000",
    )
    assert proc.returncode == 3, proc.stdout[-3000:]
    assert "stopping: the loss spiked again after 2 rollbacks (spike.max_rollbacks)" in proc.stdout
    assert len(rollbacks(run)) == 3 and read_events(run)[-1]["outcome"] == "gave_up"
    assert {rb["began"] for rb in rollbacks(run)} == {31} and rollbacks(run)[-1]["restored_step"] == 30
    ckpt = Checkpointer(run, keep=1)
    latest = ckpt.latest()
    assert ckpt.complete_checkpoints() == [latest] and ckpt.find("auto") == (latest, [])
    state = Checkpointer.read_state(latest)
    assert state["step"] == 30 and state["state"]["recovery"]["rollbacks"] == 3
    assert all(math.isfinite(x) for x in train_losses(run))


# --- crashes and preemption ------------------------------------------------------------

LONG = ["train.max_steps=16", "train.eval_every=0", "checkpoint.every_steps=4", "checkpoint.keep=4"]


@pytest.fixture(scope="module")
def baseline16(tmp_path_factory, small_data):
    run = tmp_path_factory.mktemp("baseline16") / "run"
    pretrain(run, small_data, *LONG)
    return run


def _last_step(run: Path) -> int:
    return last_train_row(run)["step"]


def test_kill_minus_nine_at_random_moments_then_resume(tmp_path, small_data, baseline16):
    """SIGKILL of a random rank at random moments, and inside two checkpoint writes; the
    supervisor relaunches with --resume auto every time; the final losses are those of a run
    never killed. Five launches, each ended by one crash except the last:
      1. killed at random after step 2-5 (checkpoint 4 is written at step 4)
      2. resumes; rank 1 killed inside the write of checkpoint 8 (nothing published)
      3. resumes from 4; killed at random after step 5-9 (checkpoint 8 may be written)
      4. resumes from 4 or 8; rank 0 killed after publishing step-12, before `latest` moved
      5. resumes from `latest` (8) and finishes.
    A random kill must land before the launch reaches the next injected fault (steps 8 and
    12): a kill still pending then would hit the next launch while it starts, so one whose
    window closed while it waited is not made (and one launch fewer is expected)."""
    import random

    seed = random.randrange(10**6)
    rng = random.Random(seed)
    # (launch, kill after this step, and before this one); step 1 includes warm-up
    kills = [(1, rng.randint(2, 5), 8), (3, rng.randint(5, 9), 12)]
    run = tmp_path / "run"
    cmd = supervise_command(
        pretrain_command(
            TINY_CONFIG,
            [f"run.dir={run}", f"data.path={small_data}", *LONG],
            faults=["checkpoint_write@8:1", "checkpoint_publish@12"],
            fault_state=tmp_path / "faults",
        ),
        max_restarts=6,
    )
    log_path = tmp_path / "supervise.log"  # a file, not a pipe: nobody reads a pipe while we poll
    shm_before = shm_buffers()
    with open(log_path, "w") as log:
        sup = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True)
        killed = []
        deadline = time.time() + 900
        while sup.poll() is None and time.time() < deadline:
            row, launch = last_train_row(run), launches(run)
            if kills and launch == kills[0][0] and kills[0][1] <= row["step"] < kills[0][2]:

                def in_window(launch=launch, before=kills[0][2]):  # still before the next injected fault
                    return launches(run) == launch and last_train_row(run)["step"] < before

                victim = kill_a_rank(sup.pid, rng, row.get("step_time", 0.1), still_wanted=in_window)
                if victim:
                    killed.append((*kills.pop(0), victim.pid))
            time.sleep(0.02)
        if sup.poll() is None:
            sup.kill()
        sup.wait()
    output = log_path.read_text()
    assert sup.returncode == 0, f"seed {seed}\n{output[-5000:]}"
    # A random kill whose window closed while it waited is not made (it must not hit the next launch).
    assert killed, f"seed {seed}: no random kill was made ({kills})"
    assert output.count("supervise: restart") == 2 + len(killed), f"seed {seed}\n{output[-3000:]}"
    assert launches(run) == 3 + len(killed)
    assert train_losses(run) == train_losses(baseline16), f"seed {seed}"
    assert not list((run / "checkpoints").glob(".tmp-*"))
    assert shm_buffers() <= shm_before  # killed ranks leave no shared memory behind either


def _watched(run: Path, data, fault: str, *options: str, env: dict | None = None):
    """The LONG run with `fault` (once), under the supervisor watching its heartbeat with
    `options`, to its end; it must exit 0."""
    cmd = pretrain_command(
        TINY_CONFIG,
        [f"run.dir={run}", f"data.path={data}", *LONG],
        faults=[fault],
        fault_state=run.parent / "faults",
    )
    watched = supervise_command(cmd, 2, 0, "--heartbeat", str(run / "heartbeat"), *options)
    proc = subprocess.run(watched, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_a_rank_killed_holding_the_op_build_lock_does_not_stop_the_next_start(
    tmp_path, small_data, baseline16
):
    """Rank 1 takes torch's build lock of DeepSpeed's shared-memory op at start, as DeepSpeed's
    JIT load does, and is killed with SIGKILL holding it (a preempted start). Under the
    supervisor, with --start-timeout, the relaunch starts (its ops come built, without the
    lock: megatrain/train/prebuilt_ops.py) and ends with the losses of a run never killed.
    The extensions directory is the test's own, holding this machine's builds: DeepSpeed's
    own load there would find the op built and wait on the lock for good."""
    extensions = tmp_path / "torch_extensions"
    for builder in prebuilt_ops.builders():
        shutil.copytree(prebuilt_ops.torch_build_dir(builder.name), extensions / builder.name)
    run = tmp_path / "run"
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(extensions)}
    proc = _watched(
        run, small_data, "op_lock@0:1", "--hang-timeout", "300", "--start-timeout", "150", env=env
    )
    lock = extensions / "deepspeed_shm_comm" / "lock"
    assert f"rank 1: SIGKILL at op_lock@0, holding {lock}" in proc.stdout
    assert lock.exists()  # left behind, and no hindrance
    assert "hung" not in proc.stdout and proc.stdout.count("supervise: restart") == 1
    assert train_losses(run) == train_losses(baseline16)


def test_a_hung_rank_is_found_by_the_heartbeat_and_the_run_relaunched(tmp_path, small_data, baseline16):
    """Rank 1 stops for good after step 6 (checkpoint 4 written); rank 0 waits on it in the
    next collective, and the heartbeat stops. The supervisor takes the run as hung after
    --hang-timeout, ends it and relaunches; the run resumes from step 4 and ends with the
    losses of a run that never hung."""
    run = tmp_path / "run"
    # A step here takes well under a second: 25 s without one is a hang; the start (model
    # built, checkpoint loaded) keeps a load-proof allowance.
    proc = _watched(
        run, small_data, "hang@6:1", "--hang-timeout", "25", "--start-timeout", "120", "--hang-grace", "5"
    )
    assert "rank 1: hangs after step 6" in proc.stdout
    assert f"supervise: the run hung: {run / 'heartbeat'} not touched for " in proc.stdout
    # DeepSpeed's launcher gives each rank 30 s to end on SIGTERM; the hung ones are killed after the grace
    assert "supervise: still running 5s after SIGTERM; SIGKILL" in proc.stdout
    assert proc.stdout.count("supervise: restart") == 1 and launches(run) == 2
    assert train_losses(run) == train_losses(baseline16)


def test_sigterm_checkpoints_and_exits_cleanly(tmp_path, small_data, baseline16):
    run = tmp_path / "run"
    # Checkpoints in the background: the stop waits for a write in flight, then writes the final one.
    sets = [*LONG, "train.max_steps=100000", "checkpoint.async_save=true"]
    cmd = pretrain_command(TINY_CONFIG, [f"run.dir={run}", f"data.path={small_data}", *sets])
    launcher = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    while _last_step(run) < 3 and launcher.poll() is None:
        time.sleep(0.05)
    rank_processes(launcher.pid)[-1].send_signal(
        signal.SIGTERM
    )  # a scheduler's preemption, reaching one rank
    output = launcher.communicate(timeout=120)[0]
    assert launcher.returncode == 0, output[-3000:]
    assert "received SIGTERM: stopping after this step with a checkpoint" in output
    assert "continue with --resume auto" in output
    stopped_at = _last_step(run)
    latest = Checkpointer(run, keep=9).latest()
    assert latest.name == f"step-{stopped_at:08d}" and Checkpointer.verify(latest) is None
    assert read_events(run)[-1]["event"] == "end" and read_events(run)[-1]["outcome"] == "stopped"
    pretrain(run, small_data, *LONG)  # resume: the run carries on exactly
    assert train_losses(run) == train_losses(baseline16)


def test_sigterm_to_the_supervisor_reaches_the_ranks_and_the_run_exits_0(tmp_path, small_data):
    """The supervisor passes SIGTERM to the ranks, not to DeepSpeed's launcher (which would
    die at once and kill its ranks 30 s later): they checkpoint, the launcher exits 0, and
    supervision ends with that 0."""
    run = tmp_path / "run"
    cmd = supervise_command(
        pretrain_command(
            TINY_CONFIG, [f"run.dir={run}", f"data.path={small_data}", *LONG, "train.max_steps=100000"]
        ),
        3,
    )
    sup = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    while _last_step(run) < 3 and sup.poll() is None:
        time.sleep(0.05)
    sup.send_signal(signal.SIGTERM)
    output = sup.communicate(timeout=120)[0]
    assert sup.returncode == 0, output[-3000:]
    assert "supervise: stopped by SIGTERM; the run exited 0" in output
    assert "received SIGTERM: stopping after this step with a checkpoint" in output
    latest = Checkpointer(run, keep=9).latest()
    assert latest.name == f"step-{_last_step(run):08d}" and Checkpointer.verify(latest) is None
    assert read_events(run)[-1]["outcome"] == "stopped"


def test_flipped_byte_is_detected_and_the_previous_checkpoint_used(tmp_path, small_data, baseline16):
    run = copy_until(baseline16, tmp_path / "run", step=16)
    shard = run / "checkpoints" / "step-00000016" / "mp_rank_00_model_states.pt"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01  # same size, one bit different
    shard.write_bytes(bytes(data))
    proc = pretrain(run, small_data, *LONG)
    out = proc.stdout + proc.stderr
    assert "warning: skipping damaged checkpoint step-00000016" in out and "sha256 does not match" in out
    assert shard.name in out and "resumed from" in out and "step-00000012" in out
    assert train_losses(run) == train_losses(baseline16)


def test_disk_full_during_a_checkpoint_keeps_latest(tmp_path, small_data, baseline16):
    """A file-size limit makes the checkpoint write fail as a full disk would: one clear error,
    the partial directory removed, `latest` still on the previous checkpoint."""
    run = copy_until(baseline16, tmp_path / "run", step=8)
    limit = "import resource; resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, resource.RLIM_INFINITY))"
    script = REPO / "launch" / "pretrain.py"
    code = (
        f"{limit}; import runpy, sys; sys.argv = sys.argv[1:]; sys.path.insert(0, {str(script.parent)!r}); "
        f"runpy.run_path({str(script)!r}, run_name='__main__')"
    )
    args = [
        str(script),
        "--config",
        str(TINY_CONFIG),
        *[
            a
            for s in [f"run.dir={run}", f"data.path={small_data}", *LONG, "train.max_steps=12"]
            for a in ("--set", s)
        ],
    ]
    # one process (a world of one): the checkpoint of step 8 was written by 2 ranks, so start over at 0
    proc = subprocess.run(
        [sys.executable, "-c", code, *args, "--resume", "none"], capture_output=True, text=True
    )
    assert proc.returncode == 1, proc.stderr[-3000:]  # a run error, not bad input: a supervisor may retry
    err = proc.stderr.strip().splitlines()[-1]
    assert err.startswith("error: ") and "checkpoint of step 4 could not be written" in err
    assert "`latest` still names step-00000008" in err
    assert (run / "latest").read_text().strip() == "checkpoints/step-00000008"
    assert not list((run / "checkpoints").glob(".tmp-*"))
    assert Checkpointer.verify(run / "checkpoints" / "step-00000008") is None
