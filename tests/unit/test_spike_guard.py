"""The spike guard's rule and the supervisor's exit policy, without a run."""

from __future__ import annotations

import sys

import pytest
from helpers import TINY_CONFIG

from megatrain.config import load_config
from megatrain.supervisor import supervise
from megatrain.train.spike_guard import SpikeGuard


def test_supervisor_restarts_crashes_and_stops_on_final_exits(tmp_path):
    """Exit 0, 2 (bad input) and 3 (gave up) end supervision; anything else is retried."""
    def child(*codes: int) -> list[str]:
        """A command that exits with codes[n] on its n-th run (negative: killed by that signal)."""
        count = tmp_path / f"runs-{'_'.join(map(str, codes))}"
        code = (f"import os, pathlib, signal; p = pathlib.Path({str(count)!r}); n = int(p.read_text()) if p.exists() "
                f"else 0; p.write_text(str(n + 1)); c = {list(codes)!r}[min(n, {len(codes) - 1})]; "
                "os.kill(os.getpid(), -c) if c < 0 else os._exit(c)")
        return [sys.executable, "-c", code]

    log = []
    assert supervise(child(1, -9, 0), max_restarts=5, delay=0, log=log.append) == 0
    assert [m for m in log if "restart" in m] == ["supervise: restart 1/5 in 0s", "supervise: restart 2/5 in 0s"]
    assert "supervise: the run exited -9 (killed by SIGKILL)" in log
    for final in (2, 3):
        log = []
        assert supervise(child(final, 0), max_restarts=5, delay=0, log=log.append) == final
        assert not any("restart" in m for m in log)
    log = []
    assert supervise(child(1), max_restarts=2, delay=0, log=log.append) == 1
    assert log[-1] == "supervise: giving up after 2 restarts"


def _guard(**overrides):
    cfg = load_config(TINY_CONFIG, ["data.path=x", "train.max_steps=1", "spike.window=10", "spike.min_history=5",
                                    "spike.threshold=4", *[f"spike.{k}={v}" for k, v in overrides.items()]])
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
    assert not g.observe(2, {"loss": 3.0, "grad_norm": float("inf")}, overflow=True).spike  # the loss scaler's job
    state = g.state_dict()
    h = _guard()
    h.load_state_dict(state)
    assert h.state_dict() == state
