"""Scaling-law fits (megatrain/scaling/fit.py): known laws recovered from noisy points,
degenerate sets refused, the compute-optimal split against a brute-force search."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from megatrain.errors import UserError
from megatrain.scaling.fit import compute_optimal, fit_compute, fit_loss

CHINCHILLA = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}  # Hoffmann et al. 2022, eq. 10


def _chinchilla(n, d):
    p = CHINCHILLA
    return p["E"] + p["A"] / n ** p["alpha"] + p["B"] / d ** p["beta"]


def test_chinchillas_published_law_is_recovered_from_noisy_points():
    rng = np.random.default_rng(1)
    sizes, ratios = [1e7, 3e7, 1e8, 3e8, 1e9, 3e9], [5, 10, 20, 40, 80]
    n = [s for s in sizes for _ in ratios]
    d = [s * r for s in sizes for r in ratios]
    loss = [_chinchilla(a, b) * math.exp(1e-3 * rng.standard_normal()) for a, b in zip(n, d, strict=True)]
    fit = fit_loss(n, d, loss, bootstrap=30)
    for name, rel in (("E", 0.03), ("B", 0.03), ("alpha", 0.03), ("beta", 0.03), ("A", 0.1)):
        assert fit.params[name] == pytest.approx(CHINCHILLA[name], rel=rel), name
        lo, hi = fit.intervals[name]
        assert lo <= CHINCHILLA[name] <= hi, name
    assert not fit.warnings
    # Chinchilla itself (70B parameters, 1.4T tokens: 23x the largest compute here)
    truth = _chinchilla(7e10, 1.4e12)
    assert fit.predict(7e10, 1.4e12) == pytest.approx(truth, rel=5e-3)
    lo, hi = fit.interval(7e10, 1.4e12)
    assert lo <= truth <= hi
    assert fit.beyond(7e10, 1.4e12) == ["N 7e+10 is 23.3x the points' largest (3e+09): an extrapolation"]
    assert fit.beyond(1e9, 2e10) == []  # inside the points' sizes and tokens per parameter


def test_the_compute_optimal_split_is_the_minimum_at_that_compute():
    class Known:
        params = CHINCHILLA

    flops = 5.76e23  # Gopher's budget
    n_opt, d_opt = compute_optimal(Known, flops)
    assert 6 * n_opt * d_opt == pytest.approx(flops)
    grid = np.geomspace(1e9, 1e12, 20001)
    losses = [_chinchilla(n, flops / 6 / n) for n in grid]
    assert n_opt == pytest.approx(grid[int(np.argmin(losses))], rel=1e-3)


def test_a_power_law_in_compute_with_an_irreducible_term():
    rng = np.random.default_rng(2)
    flops = np.geomspace(1e15, 1e19, 9)
    loss = [(2.0 + 60.0 * c**-0.1) * math.exp(1e-3 * rng.standard_normal()) for c in flops]
    fit = fit_compute(list(flops), loss, bootstrap=30)
    assert fit.params["c"] == pytest.approx(2.0, rel=0.05) and fit.params["gamma"] == pytest.approx(
        0.1, rel=0.1
    )
    assert fit.predict(1e20) == pytest.approx(2.0 + 60.0 * 1e20**-0.1, rel=5e-3)  # 10x beyond the points


def test_degenerate_sets_are_refused_in_one_line():
    with pytest.raises(UserError, match=r"^L\(N, D\): 4 points for 5 parameters"):
        fit_loss([1e6, 2e6, 4e6, 8e6], [1e8] * 4, [3.0, 2.9, 2.8, 2.7])
    with pytest.raises(UserError, match="2 distinct values of D"):
        fit_loss([1e6, 2e6, 4e6, 8e6, 1e7, 2e7], [1e8, 2e8] * 3, [3.0, 2.9, 2.8, 2.7, 2.6, 2.5])
    with pytest.raises(UserError, match="must be positive"):
        fit_compute([1e15, 1e16, 1e17, 1e18], [3.0, 2.9, float("nan"), 2.7])
    few = fit_compute([1e15, 1e16, 1e17, 1e18], [3.0, 2.5, 2.3, 2.2], bootstrap=20)  # 4 points, 3 parameters
    assert any("only 4 points for 3 parameters" in w for w in few.warnings)


def test_the_scaling_script_fits_a_table_and_predicts(tmp_path):
    from helpers import REPO, run_script

    rng = np.random.default_rng(3)
    rows = ["params,tokens,loss"]
    for n in (1e7, 3e7, 1e8, 3e8, 1e9):
        for ratio in (5, 20, 80):
            loss = _chinchilla(n, n * ratio) * math.exp(1e-3 * rng.standard_normal())
            rows.append(f"{n},{n * ratio},{loss}")
    (tmp_path / "runs.csv").write_text("\n".join(rows) + "\n")
    out, png = tmp_path / "fit.json", tmp_path / "fit.png"
    asks = ("--predict", "3e9", "6e10", "--compute", "1e21", "--bootstrap", "20")
    proc = run_script("scaling.py", "--points", tmp_path / "runs.csv", *asks, "--json", out, "--plot", png)
    result = json.loads(out.read_text())
    [at, optimal] = result["predictions"]
    assert at["loss"] == pytest.approx(_chinchilla(3e9, 6e10), rel=0.01)
    assert at["interval"][0] <= _chinchilla(3e9, 6e10) <= at["interval"][1]
    assert optimal["flops"] == 1e21 and 6 * optimal["params"] * optimal["tokens"] == pytest.approx(1e21)
    assert "predicted final loss at N=3e+09, D=6e+10" in proc.stdout and png.stat().st_size > 10_000
    # the planner, given the fit: the target's predicted final loss beside its days
    from megatrain.scaling.fit import Fit

    planned = tmp_path / "plan.json"
    config = ("--config", REPO / "configs" / "gpt3-125m.yaml", "--gpus", "8", "--gpu", "h100")
    run_script("plan.py", *config, "--fit", out, "--json", planned)
    predicted = json.loads(planned.read_text())["predicted_loss"]
    assert predicted["loss"] == pytest.approx(Fit.read(out).predict(predicted["params"], predicted["tokens"]))
    assert predicted["interval"][0] <= predicted["loss"] <= predicted["interval"][1]
    (tmp_path / "bad.csv").write_text("params,tokens\n1e7,2e8\n")
    bad = run_script("scaling.py", "--points", tmp_path / "bad.csv", check=False)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1] == (
        f"error: {tmp_path / 'bad.csv'}: row 1 lacks params, tokens or loss"
    )
