"""Who is a straggler, from every rank's phase times; the phase clock on the CPU."""

from __future__ import annotations

import time

import pytest
import torch

from megatrain.train.stragglers import PHASES, PhaseClock, slowest, stragglers


def named(times: list[list[float]], factor: float) -> list[int]:
    _, median, own = slowest(times)
    return stragglers(own, median, factor)


def _times(data: float, forward: float, backward: float = 1.0) -> list[float]:
    return [data, forward, backward, 0.1]


def test_a_rank_slow_in_its_own_work_is_named_and_even_ranks_are_not():
    even = [_times(0.01, 0.50), _times(0.01, 0.52), _times(0.02, 0.49), _times(0.01, 0.51)]
    assert named(even, 1.5) == []
    slow_data = [*even[:3], _times(0.9, 0.5)]  # a rank that waits on its data
    slow_forward = [_times(0.01, 1.2), *even[1:]]  # a slow device
    assert named(slow_data, 1.5) == [3] and named(slow_forward, 1.5) == [0]
    rank, median, own = slowest(slow_forward)
    assert rank == 0 and median == pytest.approx(0.525) and own[0] == 0.01 + 1.2  # data + forward
    # The backward pass ends in the collective everyone waits in: it names no one.
    assert named([*even[:3], _times(0.01, 0.5, backward=9.0)], 1.5) == []


def test_differences_under_the_floor_are_jitter():
    tiny = [_times(0.001, 0.002), _times(0.001, 0.009)]  # 4x the median, by 7 ms
    assert named(tiny, 1.5) == []


def test_the_clock_times_each_phase_and_only_when_started():
    clock = PhaseClock(torch.device("cpu"))
    with clock.phase("forward"):  # not started: nothing kept
        time.sleep(0.01)
    clock.start()
    with clock.phase("data"):
        time.sleep(0.02)
    for _ in range(2):
        with clock.phase("forward"):
            time.sleep(0.03)
    seconds = dict(zip(PHASES, clock.stop(), strict=True))
    assert seconds["data"] >= 0.02 and seconds["forward"] >= 0.06
    assert seconds["backward"] == seconds["optimizer"] == 0.0 and not clock.on
