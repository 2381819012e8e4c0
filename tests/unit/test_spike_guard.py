"""The spike guard's rule, without a run."""

from __future__ import annotations

import pytest
from helpers import TINY_CONFIG

from megatrain.config import load_config
from megatrain.train.spike_guard import SpikeGuard


def _guard(**overrides):
    cfg = load_config(
        TINY_CONFIG,
        [
            "data.path=x",
            "train.max_steps=1",
            "spike.window=10",
            "spike.min_history=5",
            "spike.threshold=4",
            *[f"spike.{k}={v}" for k, v in overrides.items()],
        ],
    )
    return SpikeGuard(cfg.spike)


@pytest.mark.parametrize("stats", ["median_mad", "mean_std"])
def test_guard_flags_a_jump_and_not_noise(stats):
    g = _guard(stats=stats)
    noise = [3.0, 3.1, 2.9, 3.05, 2.95, 3.0, 3.1, 2.9, 3.0, 3.02]
    assert not any(g.observe(i, {"loss": x}).spike for i, x in enumerate(noise))
    assert not g.observe(10, {"loss": 3.2}).spike  # within the noise
    v = g.observe(11, {"loss": 5.0})
    assert v.spike and v.began == 11 and v.signal == "loss" and v.baseline == pytest.approx(3.0, abs=0.05)


def test_guard_waits_for_history_and_counts_patience():
    g = _guard(patience=2)
    assert not g.observe(0, {"loss": 100.0}).spike  # too little history to judge
    for i in range(1, 8):
        g.observe(i, {"loss": 3.0 + 0.01 * (i % 3)})
    assert not g.observe(8, {"loss": 9.0}).spike  # one step above: not yet
    v = g.observe(9, {"loss": 9.5})
    assert v.spike and v.began == 8  # the spike began at the first step above
    assert 9.0 not in g.history["loss"]  # values above were not taken into the baseline
    assert not g.observe(10, {"loss": 9.0}).spike  # pending count restarted


def test_guard_non_finite_and_fp16_overflow():
    g = _guard()
    assert g.observe(0, {"loss": float("nan")}).spike  # at once, whatever the history
    assert g.observe(1, {"loss": 3.0, "grad_norm": float("inf")}).spike  # not watched, but not finite
    assert not g.observe(
        2, {"loss": 3.0, "grad_norm": float("inf")}, overflow=True
    ).spike  # the loss scaler's job
    state = g.state_dict()
    h = _guard()
    h.load_state_dict(state)
    assert h.state_dict() == state
