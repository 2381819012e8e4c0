"""Spike recovery in-process, without the launcher: a world of one, a real DeepSpeed engine
on the tiny model, a NaN loss injected from the test side (tests/faulty_pretrain.py's
callback), and the rollback checked against a run that skipped the same data from the start."""

from __future__ import annotations

import math
import signal
from pathlib import Path

import pytest
import torch
from faulty_pretrain import Faults, NaNLoss
from helpers import TINY_CONFIG

from megatrain.config import load_config
from megatrain.train import Trainer
from megatrain.train.distributed import free_port
from megatrain.train.metrics import read_events, read_metrics

RUN = [
    "train.max_steps=12",
    "train.eval_every=0",
    "checkpoint.every_steps=0",
    "spike.snapshot_every=5",
    "spike.skip=2",
    "parallel.zero_stage=0",
]


@pytest.fixture
def world_of_one(monkeypatch):
    """This process as rank 0 of 1; the environment and signal handlers are put back after."""
    for key, value in {
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
    }.items():
        monkeypatch.setenv(key, value)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    yield
    for s, h in handlers.items():
        signal.signal(s, h)


def _train(run_dir, data, *sets, callbacks=()):
    cfg = load_config(TINY_CONFIG, [f"run.dir={run_dir}", f"data.path={data}", *RUN, *sets])
    trainer = Trainer(cfg, resume="none", callbacks=list(callbacks))
    return trainer, trainer.fit()


def test_nan_loss_rolls_back_in_memory_and_skips(world_of_one, tmp_path, small_data):
    trainer, summary = _train(tmp_path / "run", small_data, callbacks=[NaNLoss(Faults(["nan_loss@8"], None))])
    assert summary["outcome"] == "done" and summary["rollbacks"] == 1
    [rb] = [e for e in read_events(tmp_path / "run") if e["event"] == "rollback"]
    assert rb["step"] == rb["began"] == 8 and math.isnan(rb["loss"])
    assert rb["restored_step"] == 5 and rb["source"] == "memory"  # the point taken after step 5
    per_step = 16  # 512 tokens of 32: micro_batch 4 x 4 micro-batches x 1 rank
    assert rb["position"] == 5 * per_step and rb["skipped_samples"] == max(2 * per_step, 3 * per_step)
    assert trainer.progress.step == 12 and trainer.batches.sampler.skipped == [
        [rb["position"], rb["skipped_samples"]]
    ]
    # step for step the run that skipped the same samples from the start; the guard's
    # history went back too (steps 6-8 of the abandoned timeline are not in it)
    clean, _ = _train(
        tmp_path / "clean", small_data, f"data.skip=[[{rb['position']}, {rb['skipped_samples']}]]"
    )
    losses = [
        [r["loss"] for r in read_metrics(d) if r["kind"] == "train"]
        for d in (tmp_path / "run", tmp_path / "clean")
    ]
    assert len(losses[0]) == 12 and losses[0] == losses[1]
    assert trainer.recovery.guard.state_dict() == clean.recovery.guard.state_dict()


def test_snapshot_restore_round_trip(world_of_one, tmp_path, small_data):
    """restore(snapshot()) puts back the engine's tensors, counters and every registered state."""
    trainer, _ = _train(tmp_path / "run", small_data, "train.max_steps=2", "spike.enabled=false")
    point = trainer.snapshot()
    before = {k: t.clone() for k, t in trainer.module._state_tensors().items()}
    trainer.cfg.train.max_steps = 4
    trainer.outcome = None
    trainer.fit()
    assert trainer.progress.step == 4
    trainer.restore(point)
    assert trainer.progress.step == 2 and trainer.batches.consumed == 2 * 16
    after = trainer.module._state_tensors()
    assert before.keys() == after.keys() and all((before[k] == after[k]).all() for k in before)


def test_a_point_before_the_first_step_resets_what_came_after(world_of_one, tmp_path, small_data):
    """A point taken before any step holds no moments and no step counts. DeepSpeed's own
    AdamW (optim.name=adamw) keeps its counts as plain ints that appear at the first step:
    restoring the point sets them to 0 and the moments to zeros, a fresh optimizer's state,
    and training on repeats the first steps' losses."""
    trainer, _ = _train(
        tmp_path / "run", small_data, "train.max_steps=0", "spike.enabled=false", "optim.name=adamw"
    )
    point = trainer.snapshot()
    trainer.cfg.train.max_steps, trainer.outcome = 2, None
    trainer.fit()
    counts = [k for k, (state, name) in trainer.module._state_counts().items() if state[name] == 2]
    assert counts  # plain ints (FusedAdam: in each group's last parameter's state), at 2 now
    trainer.restore(point)
    assert all(state[name] == 0 for state, name in trainer.module._state_counts().values())
    moments = {k: t for k, t in trainer.module._state_tensors().items() if k.startswith("opt.state.")}
    assert moments and all(not t.any() for t in moments.values())
    trainer.outcome = None
    trainer.fit()
    losses = [r["loss"] for r in read_metrics(tmp_path / "run") if r["kind"] == "train"]
    assert len(losses) == 4 and losses[2:] == losses[:2]


def test_rollback_points_stay_within_the_host_memory_budget(world_of_one, tmp_path, small_data, capsys):
    """A budget too small for one point: the start line says so, and a NaN rolls back to the
    newest disk checkpoint instead; a budget for one point keeps one."""
    trainer, summary = _train(
        tmp_path / "run",
        small_data,
        "spike.snapshot_memory_gb=1e-6",
        "checkpoint.every_steps=5",
        callbacks=[NaNLoss(Faults(["nan_loss@8"], None))],
    )
    out = capsys.readouterr().out
    per_point = trainer.module.snapshot_bytes()
    assert f"spike: rollback points of {per_point / 2**20:,.1f} MiB per rank, 0 of spike.snapshots=3" in out
    assert "rollbacks will use disk checkpoints" in out and summary["rollbacks"] == 1
    [rb] = [e for e in read_events(tmp_path / "run") if e["event"] == "rollback"]
    assert rb["restored_step"] == 5 and rb["source"].endswith("checkpoints/step-00000005")
    one = (per_point + per_point // 2) / 2**30
    trainer, _ = _train(
        tmp_path / "one", small_data, f"spike.snapshot_memory_gb={one}", "spike.snapshot_every=1"
    )
    assert "1 of spike.snapshots=3" in capsys.readouterr().out and len(trainer.recovery.points) == 1


def test_a_rounded_batch_is_reported_at_start(world_of_one, tmp_path, small_data, capsys):
    """500 tokens cannot be a whole number of 128-token micro-batches (4 x 32, one rank):
    the start says the batch becomes 384."""
    _train(
        tmp_path / "run",
        small_data,
        "schedule.batch_final_tokens=500",
        "train.max_steps=1",
        "spike.enabled=false",
    )
    out = capsys.readouterr().out
    assert "schedule: global batch 500 tokens is rounded to 384" in out
    assert "global batch 384 tokens (3 x 4 x 32 x 1)" in out


def test_host_memory_for_rollback_points(tmp_path):
    """A container's (cgroup's) limit bounds the budget, not the machine's RAM; pinned copies
    take the power-of-two blocks torch's host allocator rounds them up to."""
    from megatrain.devices import host_memory
    from megatrain.train.train_module import host_block_bytes

    physical = host_memory(tmp_path / "none", tmp_path / "none")
    (tmp_path / "cgroup").write_text("0::/job/step\n")
    (tmp_path / "v2" / "job" / "step").mkdir(parents=True)
    (tmp_path / "v2" / "job" / "step" / "memory.max").write_text("max\n")
    (tmp_path / "v2" / "job" / "memory.max").write_text(f"{2**30}\n")
    assert host_memory(tmp_path / "v2", tmp_path / "cgroup") == min(2**30, physical)
    (tmp_path / "cgroup").write_text("4:memory:/slurm/uid_0/job_7\n0::/\n")
    limits = tmp_path / "v1" / "memory" / "slurm" / "uid_0" / "job_7"
    limits.mkdir(parents=True)
    (limits / "memory.limit_in_bytes").write_text(f"{3 * 2**29}\n")
    (tmp_path / "v1" / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # none
    assert host_memory(tmp_path / "v1", tmp_path / "cgroup") == min(3 * 2**29, physical)
    assert [host_block_bytes(n, pinned=True) for n in (1, 4096, 4097, 1_100_000_000)] == [
        1,
        4096,
        8192,
        2**31,
    ]
    assert host_block_bytes(4097, pinned=False) == 4097


class _NoEngine:
    """What the checkpointer asks of an engine: it writes the directory, and no files."""

    def save_checkpoint(self, root, tag, save_latest):
        (Path(root) / tag).mkdir(parents=True)


class ScriptedModule:
    """A train module without DeepSpeed (Trainer(module=...)): its state a step count, its
    loss falling by 0.01 a step, or 50 when a micro-batch holds a poisoned sample position."""

    def __init__(self, poisoned: range):
        self.poisoned, self.steps, self.grad_accum, self.batches = set(poisoned), 0, 1, None
        self.device, self.engine, self.optimizer_params, self.overflow = (
            torch.device("cpu"),
            _NoEngine(),
            [],
            False,
        )
        self.flavour = "plain"
        self.experts = None  # no expert shards

    def set_lr(self, lr):
        pass

    def set_micro_batches(self, micro_batches, micro_batch):
        self.grad_accum = micro_batches

    def step(self, next_micro_batch):
        hit = False
        for _ in range(self.grad_accum):
            next_micro_batch()
            hit |= bool(self.poisoned & set(self.batches.sampler.last_positions.tolist()))
        self.steps += 1
        return (50.0 if hit else 5.0 - 0.01 * self.steps), 1.0

    def step_stats(self):
        return {}

    def evaluate(self, batches):
        return 0.0

    def capture(self, reuse=None):
        return {"steps": self.steps}

    def restore(self, point):
        self.steps = point["steps"]

    def snapshot_bytes(self):
        return 8

    def loss_scale_state(self):
        return None


def test_the_loop_and_its_callbacks_without_deepspeed(world_of_one, tmp_path, small_data):
    """The loop, the spike guard and its in-memory rollback, driven by a scripted train module
    (no engine): the poisoned samples of step 13 spike, the run goes back to the point after
    step 10, skips them, and ends at step 20 with the loss it would have had without them."""
    cfg = load_config(
        TINY_CONFIG,
        [
            f"run.dir={tmp_path / 'run'}",
            f"data.path={small_data}",
            *RUN,
            "train.max_steps=20",
            "spike.window=10",
            "spike.min_history=5",
        ],
    )
    module = ScriptedModule(poisoned=range(12 * 16, 13 * 16))  # step 13's samples (16 a step)
    trainer = Trainer(cfg, resume="none", module=module)
    module.batches = trainer.batches
    summary = trainer.fit()
    [rb] = [e for e in read_events(tmp_path / "run") if e["event"] == "rollback"]
    assert (rb["step"], rb["restored_step"], rb["source"]) == (13, 10, "memory") and summary[
        "outcome"
    ] == "done"
    losses = [r["loss"] for r in read_metrics(tmp_path / "run") if r["kind"] == "train"]
    assert len(losses) == 20 and max(losses) < 5 and losses[-1] == pytest.approx(5.0 - 0.01 * 20)
