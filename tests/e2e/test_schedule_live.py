"""GPT-3's token-based schedules in the live loop (2 ranks through the deepspeed launcher)."""

from __future__ import annotations

import shlex

import pytest
from helpers import TINY_CONFIG, copy_until, pretrain, run_script

from megatrain.config import load_config
from megatrain.scaling import branch_overrides
from megatrain.schedule import BatchSchedule, LRSchedule
from megatrain.train.metrics import read_events, read_metrics

RAMP = [
    "train.micro_batch=2",
    "schedule.lr_shape=cosine",
    "schedule.warmup_tokens=1024",
    "schedule.decay_tokens=6144",
    "schedule.min_lr_ratio=0.1",
    "schedule.batch_start_tokens=128",
    "schedule.batch_final_tokens=1024",
    "schedule.batch_ramp_tokens=4096",
    "train.max_steps=null",
    "train.max_tokens=6144",
    "checkpoint.every_steps=4",
    "train.eval_every=0",
]


@pytest.fixture(scope="module")
def ramp_run(tmp_path_factory, small_data):
    run = tmp_path_factory.mktemp("ramp") / "run"
    pretrain(run, small_data, *RAMP)
    return run


def test_live_loop_follows_the_schedules_by_tokens(ramp_run):
    cfg = load_config(TINY_CONFIG, [f"data.path={ramp_run}", *RAMP])
    lr, batch = LRSchedule.from_config(cfg), BatchSchedule.from_config(cfg, dp_size=2)
    rows = [r for r in read_metrics(ramp_run) if r["kind"] == "train"]
    consumed = 0
    for r in rows:
        assert r["lr"] == lr(consumed)  # exactly: a function of the tokens consumed before the step
        assert r["batch_tokens"] == batch(consumed) and r["grad_accum"] == batch(consumed) // 128
        consumed += r["batch_tokens"]
        assert r["tokens"] == consumed
    sizes = [r["batch_tokens"] for r in rows]
    assert sizes[0] == 128 and sizes[-1] == 1024 and len(set(sizes)) >= 4  # the batch grows
    assert (
        rows[0]["lr"] == 0.0 and max(r["lr"] for r in rows) > 0.9 * 3e-3 > rows[-1]["lr"]
    )  # warmup, then decay
    assert consumed >= 6144


def test_resume_mid_ramp_lands_on_the_same_lr_and_batch(ramp_run, tmp_path, small_data):
    resumed = copy_until(ramp_run, tmp_path / "resumed", step=4)
    pretrain(resumed, small_data, *RAMP)
    keys = ("step", "tokens", "lr", "batch_tokens", "grad_accum", "loss", "grad_norm")
    straight = [tuple(r[k] for k in keys) for r in read_metrics(ramp_run) if r["kind"] == "train"]
    after = [tuple(r[k] for k in keys) for r in read_metrics(resumed) if r["kind"] == "train"]
    assert after == straight
    assert straight[3][3] < straight[-1][3]  # step 4 was in the middle of the ramp


def test_gradient_accumulation_equals_one_big_batch(tmp_path, small_data):
    """fp32: 4 micro-batches of 1 per rank give the step that one micro-batch of 4 per rank gives."""
    common = [
        "schedule.batch_final_tokens=256",
        "train.max_steps=2",
        "train.eval_every=0",
        "train.eval_samples=0",
        "checkpoint.every_steps=0",
        "optim.grad_clip=0",
    ]
    pretrain(tmp_path / "acc", small_data, *common, "train.micro_batch=1")
    pretrain(tmp_path / "big", small_data, *common, "train.micro_batch=4")
    acc = [r for r in read_metrics(tmp_path / "acc") if r["kind"] == "train"]
    big = [r for r in read_metrics(tmp_path / "big") if r["kind"] == "train"]
    assert [r["grad_accum"] for r in acc] == [4, 4] and [r["grad_accum"] for r in big] == [1, 1]
    for a, b in zip(acc, big, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
    assert acc[1]["loss"] != acc[0]["loss"]  # step 2's loss reflects step 1's update


# Warmup-stable-decay at 512 tokens a step: a 12-step run whose cooldown is its last 4 steps.
WSD = [
    "schedule.lr_shape=cosine",
    "schedule.decay=wsd",
    "schedule.warmup_tokens=1024",
    "checkpoint.every_steps=4",
    "train.eval_every=4",
    "train.max_steps=12",
]
COOLDOWN_AT_12 = [
    "schedule.decay_tokens=6144",
    "schedule.cooldown_tokens=2048",
    "schedule.cooldown_shape=1-sqrt",
]


def test_a_cooldown_branch_equals_the_same_cooldown_run_straight_through(tmp_path, small_data):
    """A WSD trunk whose cooldown is far off (stable through step 12); a branch from its step-8
    checkpoint (run.branch_from) with a cooldown ending at step 12, in its own run directory,
    gives bitwise the losses and held-out loss of one run with that schedule from the start;
    and the same branch on another layout (ZeRO-3, resharded) the same within float error."""
    trunk, straight, branch, zero3 = (tmp_path / n for n in ("trunk", "straight", "branch", "zero3"))
    pretrain(trunk, small_data, *WSD, "schedule.decay_tokens=100000", "schedule.cooldown_tokens=1024")
    pretrain(straight, small_data, *WSD, *COOLDOWN_AT_12)
    # launch/cooldown.py's choice for a 30% cooldown to 6144 tokens: the newest checkpoint at
    # or before 4300 tokens (step 8, 4096), a cooldown of 2048 from there
    printed = run_script("cooldown.py", trunk, "--budget", "6144", "--fraction", "0.3", "--run-dir", branch)
    fork = f"run.branch_from={trunk / 'checkpoints' / 'step-00000008'}"
    sets = branch_overrides(trunk, 6144, 0.3, branch)
    assert fork in sets and "schedule.cooldown_tokens=2048" in sets
    assert printed.stdout.strip().endswith(
        shlex.join([a for s in sets for a in ("--set", s)] + ["--resume", "auto"])
    )
    pretrain(branch, small_data, *WSD, "schedule.cooldown_shape=1-sqrt", *sets)
    refused = run_script("cooldown.py", trunk, "--budget", "2000", check=False)  # before the first checkpoint
    assert (
        refused.returncode == 2
        and "no checkpoint of the stable phase" in refused.stderr.strip().splitlines()[-1]
    )

    def train(run):
        rows = read_metrics(run)
        return [(r["step"], r["lr"], r["loss"], r["grad_norm"]) for r in rows if r["kind"] == "train"]

    def valid(run):
        return [(r["step"], r["val_loss"]) for r in read_metrics(run) if r["kind"] == "valid"]

    assert train(trunk)[:8] == train(straight)[:8]  # the stable phase knows nothing of the cooldown
    assert train(branch) == train(straight)[8:] and valid(branch)[-1] == valid(straight)[-1]
    lrs = [lr for _, lr, _, _ in train(straight)]
    assert lrs[8] == 3e-3 > lrs[9] > lrs[11] > 3e-4  # the cooldown from 4096 tokens: steps 10-12, towards 10%
    assert train(trunk)[11][1] == 3e-3  # the trunk still at its peak
    [event] = [e for e in read_events(branch) if e["event"] == "branch"]
    assert (event["step"], event["tokens"]) == (8, 4096) and not (
        branch / "checkpoints" / "step-00000004"
    ).exists()
    # a relaunch of the finished branch resumes its own checkpoint, not the trunk's
    pretrain(branch, small_data, *WSD, "schedule.cooldown_shape=1-sqrt", *sets)
    assert [e["event"] for e in read_events(branch)].count("branch") == 1
    pretrain(zero3, small_data, *WSD, *COOLDOWN_AT_12, fork, "parallel.zero_stage=3")
    assert [r[2] for r in train(zero3)] == pytest.approx([r[2] for r in train(straight)[8:]], rel=1e-5)
