"""GPT-3's token-based schedules in the live loop (2 ranks through the deepspeed launcher)."""

from __future__ import annotations

import pytest
from helpers import TINY_CONFIG, copy_until, pretrain

from megatrain.config import load_config
from megatrain.schedule import BatchSchedule, LRSchedule
from megatrain.train.metrics import read_metrics

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
