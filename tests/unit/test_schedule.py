"""GPT-3's token-based schedules: closed forms, batch rounding, the schedule plot."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
from helpers import REPO, run_script
from hypothesis import given
from hypothesis import strategies as st

from megatrain.config import load_config
from megatrain.schedule import BatchSchedule, LRSchedule

GPT3 = LRSchedule(peak=6e-4, warmup_tokens=375_000_000, decay_tokens=260_000_000_000, min_lr_ratio=0.1)


def test_lr_closed_form_gpt3():
    s = GPT3
    assert s(0) == 0.0
    assert s(375_000_000 // 2) == pytest.approx(3e-4, rel=1e-12)  # mid-warmup: half the peak
    assert s(375_000_000) == pytest.approx(6e-4, rel=1e-12)  # warmup end: the peak
    mid = (375_000_000 + 260_000_000_000) // 2
    assert s(mid) == pytest.approx((6e-4 + 6e-5) / 2, rel=1e-9)  # mid-decay: cos(pi/2) = 0
    quarter = 375_000_000 + (260_000_000_000 - 375_000_000) // 4
    assert s(quarter) == pytest.approx(6e-5 + 5.4e-4 * 0.5 * (1 + math.cos(math.pi / 4)), rel=1e-9)
    assert s(260_000_000_000) == pytest.approx(6e-5, rel=1e-12)  # decay end: 10%
    assert s(300_000_000_000) == s(10**15) == pytest.approx(6e-5, rel=1e-12)  # and after it
    tokens = range(0, 300_000_000_000, 7_000_000_000)
    after = [s(t) for t in tokens if t >= 375_000_000]
    assert all(a >= b for a, b in zip(after, after[1:], strict=False))  # monotone decay


def test_lr_linear_and_constant_shapes():
    linear = LRSchedule(peak=1.0, warmup_tokens=100, decay_tokens=1100, min_lr_ratio=0.1, shape="linear")
    assert linear(50) == 0.5 and linear(100) == 1.0
    assert linear(350) == pytest.approx(1.0 - 0.9 * 0.25) and linear(1100) == pytest.approx(0.1)
    constant = LRSchedule(peak=2.0, warmup_tokens=10, decay_tokens=0, shape="constant")
    assert constant(5) == 1.0 and constant(10) == constant(10**12) == 2.0
    no_warmup = LRSchedule(peak=1.0, warmup_tokens=0, decay_tokens=100, min_lr_ratio=0.0)
    assert no_warmup(0) == 1.0 and no_warmup(100) == 0.0


def _wsd_reference(tokens: np.ndarray, peak, warmup, end, cooldown, floor_ratio, shape) -> np.ndarray:
    """Warmup-stable-decay in float64, written apart from LRSchedule: np.interp through its
    corners, the 1-sqrt cooldown from the share of it still to go."""
    t = tokens.astype(np.float64)
    start, floor = end - cooldown, floor_ratio * peak
    piecewise = np.interp(t, [0, warmup, start, end], [0.0, peak, peak, floor])
    if shape == "linear":
        return piecewise
    done = np.clip((t - start) / cooldown, 0.0, 1.0)
    return np.where(t < start, piecewise, floor + (peak - floor) * (1.0 - np.sqrt(done)))


@pytest.mark.parametrize("shape", ["linear", "1-sqrt"])
def test_wsd_against_a_float64_reference(shape):
    peak, warmup, end, cooldown = 3e-3, 1_000, 100_000, 20_000
    kind = dict(decay="wsd", cooldown_tokens=cooldown, cooldown_shape=shape)
    wsd = LRSchedule(peak, warmup, end, 0.1, **kind)
    tokens = np.array([*range(0, 130_000, 97), 1_000, 79_999, 80_000, 80_001, 99_999, 100_000])
    ours = np.array([wsd(int(t)) for t in tokens])
    expected = _wsd_reference(tokens, peak, warmup, end, cooldown, 0.1, shape)
    assert np.abs(ours - expected).max() <= 1e-15 * peak
    assert wsd(50_000) == wsd(79_999) == peak and wsd(100_000) == wsd(10**9) == pytest.approx(3e-4)
    # the stable phase does not depend on where the cooldown ends: a longer run agrees until its own
    longer = LRSchedule(
        peak, warmup, 400_000, 0.1, decay="wsd", cooldown_tokens=cooldown, cooldown_shape=shape
    )
    assert [longer(t) for t in range(0, 80_000, 500)] == [wsd(t) for t in range(0, 80_000, 500)]


def test_wsd_from_the_config_and_its_refusals(tmp_path):
    from megatrain.errors import UserError

    base = ["schedule.decay=wsd", "schedule.warmup_tokens=100", "schedule.decay_tokens=10000"]
    cfg = load_config(REPO / "configs" / "tiny-cpu.yaml", base)
    assert LRSchedule.from_config(cfg).decay_start == 8_000  # a 20% cooldown by default
    cfg = load_config(REPO / "configs" / "tiny-cpu.yaml", [*base, "schedule.cooldown_tokens=500"])
    assert LRSchedule.from_config(cfg).decay_start == 9_500
    from megatrain.plots import schedule_points  # what plot.py --schedule draws

    marks = schedule_points(cfg)["marks"]
    assert (marks["warmup_end"], marks["cooldown_start"], marks["decay_end"]) == (100, 9_500, 10_000)
    for extra, message in (
        (["schedule.cooldown_tokens=9950"], "warmup_tokens (100) <= the decay's start (50)"),
        (["schedule.cooldown_fraction=0"], "tiny-cpu.yaml: schedule.cooldown_fraction must be in (0, 1]"),
        (["schedule.lr_shape=linear"], "schedule.lr_shape applies to decay: cosine"),
        (["schedule.cooldown_shape=sqrt"], "schedule.cooldown_shape"),
    ):
        with pytest.raises(UserError, match=re.escape(message)):
            load_config(REPO / "configs" / "tiny-cpu.yaml", [*base, *extra])


def test_batch_ramp_gpt3_175b():
    unit = 1 * 2048 * 16  # micro batch 1, seq 2048, 16 data-parallel ranks
    b = BatchSchedule(
        final_tokens=3_145_728, unit_tokens=unit, start_tokens=32_768, ramp_tokens=12_000_000_000
    )
    assert b(0) == 32_768  # 16 sequences: one per rank
    assert b(6_000_000_000) == (32_768 + (3_145_728 - 32_768) // 2) // unit * unit  # halfway, rounded down
    assert b(12_000_000_000) == b(10**13) == 3_145_728


def test_batch_never_below_one_micro_batch_per_rank():
    b = BatchSchedule(final_tokens=3_145_728, unit_tokens=2048 * 64, start_tokens=32_768, ramp_tokens=10**10)
    assert b(0) == 2048 * 64  # 32K tokens is less than one micro batch on 64 ranks
    assert b.micro_batches(0) == 1


def test_batch_steps():
    b = BatchSchedule(final_tokens=0, unit_tokens=100, steps=((0, 250), (1000, 1000), (5000, 4000)))
    assert [b(t) for t in (0, 999, 1000, 4999, 5000, 10**9)] == [200, 200, 1000, 1000, 4000, 4000]
    with pytest.raises(ValueError, match="start at 0"):
        BatchSchedule(final_tokens=0, unit_tokens=1, steps=((5, 10),))


def test_batch_kept_on_another_layout():
    """Resumed on another layout, the batch rounds as on the first and is split over the
    new one: 2 ranks x 2 micro-batches of 4 x 32 become 1 rank x 4, or 4 ranks x 1."""
    first = BatchSchedule(final_tokens=600, unit_tokens=4 * 32 * 2)
    for ranks, micro_batches in ((1, 4), (2, 2), (4, 1)):
        b = BatchSchedule(final_tokens=600, unit_tokens=first.unit_tokens, split_tokens=4 * 32 * ranks)
        assert b(0) == first(0) == 512 and b.micro_batches(0) == micro_batches
    # What a ramp can still produce: every multiple of the unit from here to its end.
    ramp = BatchSchedule(final_tokens=1000, unit_tokens=100, start_tokens=200, ramp_tokens=10_000)
    assert ramp.sizes_from(0) == [200, 300, 400, 500, 600, 700, 800, 900, 1000]
    assert ramp.sizes_from(9_000) == [900, 1000] and ramp.sizes_from(10**6) == [1000]
    steps = BatchSchedule(final_tokens=0, unit_tokens=100, steps=((0, 250), (1000, 1000), (5000, 4000)))
    assert steps.sizes_from(0) == [200, 1000, 4000] and steps.sizes_from(2000) == [1000, 4000]


@given(
    start=st.integers(1, 10**6),
    extra=st.integers(0, 10**7),
    ramp=st.integers(0, 10**9),
    unit=st.integers(1, 10**5),
    points=st.lists(st.integers(0, 2 * 10**9), min_size=2, max_size=50),
)
def test_batch_always_valid_and_non_decreasing(start, extra, ramp, unit, points):
    b = BatchSchedule(final_tokens=start + extra, unit_tokens=unit, start_tokens=start, ramp_tokens=ramp)
    sizes = [b(t) for t in sorted(points)]
    assert all(s % unit == 0 and s >= unit for s in sizes)
    assert all(x <= y for x, y in zip(sizes, sizes[1:], strict=False))
    assert all(s <= max(unit, start + extra) for s in sizes)


def test_gpt3_configs_carry_the_papers_schedule():
    for path in sorted((REPO / "configs").glob("gpt3-*.yaml")):
        s = load_config(path).schedule
        assert (s.warmup_tokens, s.decay_tokens, s.min_lr_ratio, s.lr_shape) == (
            375e6,
            260e9,
            0.1,
            "cosine",
        ), path
        assert s.batch_start_tokens == 32768 and 4e9 <= s.batch_ramp_tokens <= 12e9, path
    assert load_config(REPO / "configs" / "gpt3-175b.yaml").schedule.batch_final_tokens == 3_145_728


def test_schedule_plot_and_json(tmp_path):
    out_json, out_png = tmp_path / "s.json", tmp_path / "s.png"
    run_script(
        "plot.py",
        "--schedule",
        REPO / "configs" / "gpt3-125m.yaml",
        "--json",
        out_json,
        "--out",
        out_png,
        "--dp",
        "1",  # 125m: micro batch 16 x 2048 = 32K tokens per rank
        "--set",
        "data.path=[{path: d/web, weight: 0.7}, {path: d/code, weight: 0.3}]",
        "--set",
        "data.stages=[{tokens: 2e11, weights: {web: 0.3, code: 0.7}}]",
    )
    data = json.loads(out_json.read_text())
    by_tokens = {p["tokens"]: p for p in data["points"]}
    assert by_tokens[0]["lr"] == 0.0
    assert by_tokens[375_000_000]["lr"] == pytest.approx(6e-4)
    assert by_tokens[260_000_000_000]["lr"] == pytest.approx(6e-5)
    beyond = data["marks"]["beyond"]
    assert beyond > 300e9 and by_tokens[beyond]["lr"] == pytest.approx(6e-5)
    assert by_tokens[0]["batch_tokens"] == 32_768 and by_tokens[int(4e9)]["batch_tokens"] == 524_288
    assert data["marks"]["mixture_stage_1"] == 200_000_000_000  # the curriculum: 0.7/0.3, then 0.3/0.7
    assert by_tokens[0]["mixture"] == pytest.approx({"web": 0.7, "code": 0.3})
    assert by_tokens[200_000_000_000]["mixture"] == pytest.approx({"web": 0.3, "code": 0.7})
    assert out_png.read_bytes()[:4] == b"\x89PNG"


def test_rounding_that_moves_the_batch_is_reported():
    """gpt3-125m on 32 data-parallel ranks: one micro-batch per rank is already 1M tokens,
    so the configured 0.5M batch and the 32K start of the ramp are both rounded up."""
    cfg = load_config(REPO / "configs" / "gpt3-125m.yaml")
    unit = cfg.train.micro_batch * cfg.train.seq_len * 32
    notes = BatchSchedule.from_config(cfg, dp_size=32).rounding_notes()
    assert notes == [
        f"global batch {n:,} tokens is rounded to {unit:,}: a whole number of micro_batch x seq_len x "
        f"data-parallel ranks ({unit:,} tokens), at least one per rank"
        for n in (32_768, 524_288)
    ]
    assert BatchSchedule.from_config(cfg, dp_size=1).rounding_notes() == []  # 32K and 0.5M are whole units
