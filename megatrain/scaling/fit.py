"""Scaling-law fits: Chinchilla's L(N, D) and GPT-4's L(C), with bootstrap intervals.

L(N, D) = E + A / N^alpha + B / D^beta (Hoffmann et al. 2022, approach 3): written as
log L = LSE(a - alpha log N, b - beta log D, e) with A = exp(a), B = exp(b), E = exp(e), and
fitted by minimising the Huber loss (delta 1e-3) of log L's residuals with L-BFGS from a grid
of starting points, the best kept. L(C) = c + k * C^-gamma (OpenAI 2023, "predictable
scaling": a power law with an irreducible term) the same way. Every parameter and every
prediction gets a bootstrap interval (points resampled with replacement, each resample refit
from the full fit); a fit that cannot be trusted says why (`warnings`) instead of a bare
number. In float64, with torch's L-BFGS (no other dependency).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from megatrain.errors import UserError

HUBER_DELTA = 1e-3  # Hoffmann et al.: on the residuals of log L


@dataclass
class Fit:
    """A fitted law: its parameters, their bootstrap intervals and what makes it doubtful."""

    law: str  # "L(N, D)" or "L(C)"
    params: dict[str, float]
    intervals: dict[str, tuple[float, float]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    samples: list[dict[str, float]] = field(default_factory=list)  # the bootstrap fits
    ranges: dict[str, list[float]] = field(default_factory=dict)  # of the points, for beyond()

    def predict(self, *x: float) -> float:
        return _LAWS[self.law].value(self.params, *x)

    def interval(self, *x: float, level: float = 0.95) -> tuple[float, float]:
        """The bootstrap interval of the prediction at x."""
        values = sorted(_LAWS[self.law].value(p, *x) for p in self.samples)
        return _quantiles(values, level)

    def beyond(self, *x: float) -> list[str]:
        """How far a prediction at x leaves the points: the bootstrap interval covers their
        noise, not an extrapolation of the law's form."""
        at = {"N": x[0], "tokens per parameter": x[1] / x[0]} if self.law == "L(N, D)" else {"C": x[0]}
        return [
            f"{name} {v:.3g} is {v / hi:.3g}x the points' largest ({hi:.3g}): an extrapolation"
            for name, v in at.items()
            if name in self.ranges and v > (hi := self.ranges[name][1])
        ]

    def as_dict(self) -> dict:
        """Everything, the bootstrap fits included (Fit.read gives the intervals back from them)."""
        return dataclasses.asdict(self)

    @classmethod
    def read(cls, path) -> Fit:
        """The L(N, D) fit of launch/scaling.py --json FILE."""
        try:
            fits = json.loads(Path(path).read_text())["fits"]
            found = next(f for f in fits if f["law"] == "L(N, D)")
            return cls(**{**found, "intervals": {k: tuple(v) for k, v in found["intervals"].items()}})
        except (OSError, ValueError, KeyError, StopIteration, TypeError) as e:
            raise UserError(f"{path}: not a fit written by launch/scaling.py --json ({e})") from None


def fit_loss(params: list[float], tokens: list[float], losses: list[float], bootstrap: int = 200) -> Fit:
    """L(N, D) from runs of N parameters trained on D tokens."""
    return _fit("L(N, D)", [params, tokens], losses, bootstrap)


def fit_compute(flops: list[float], losses: list[float], bootstrap: int = 200) -> Fit:
    """L(C) from runs of C training FLOPs (each at its own best size, or a ladder's frontier)."""
    return _fit("L(C)", [flops], losses, bootstrap)


def compute_optimal(fit: Fit, flops: float) -> tuple[float, float]:
    """(N, D) minimising L(N, D) at C = 6 N D (Hoffmann et al. eq. 4)."""
    p = fit.params
    a, b = p["alpha"], p["beta"]
    g = (a * p["A"] / (b * p["B"])) ** (1 / (a + b))
    n = g * (flops / 6) ** (b / (a + b))
    return n, flops / 6 / n


# --- the laws -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Law:
    names: tuple[str, ...]  # the fitted (log-space) parameters
    grid: tuple[tuple[float, ...], ...]  # starting values of each
    log_loss: object  # (theta [S, k], log x [n] per input) -> predicted log L [S, n]
    readable: object  # theta [k] -> {name: value}
    value: object  # ({name: value}, *x) -> L


def _chinchilla_log_loss(theta, log_n, log_d):
    a, b, e, alpha, beta = (theta[:, i : i + 1] for i in range(5))
    return torch.logsumexp(
        torch.stack([a - alpha * log_n, b - beta * log_d, e.expand_as(a - alpha * log_n)]), 0
    )


def _compute_log_loss(theta, log_c):
    k, c, gamma = (theta[:, i : i + 1] for i in range(3))
    return torch.logaddexp(k - gamma * log_c, c.expand(-1, log_c.shape[0]))


_LAWS = {
    "L(N, D)": _Law(
        ("a", "b", "e", "alpha", "beta"),
        (
            (0, 5, 10, 15, 20, 25),
            (0, 5, 10, 15, 20, 25),
            (-1, -0.5, 0, 0.5, 1),
            (0, 0.5, 1, 1.5, 2),
            (0, 0.5, 1, 1.5, 2),
        ),
        _chinchilla_log_loss,
        lambda t: {
            "E": math.exp(t[2]),
            "A": math.exp(t[0]),
            "B": math.exp(t[1]),
            "alpha": t[3],
            "beta": t[4],
        },
        lambda p, n, d: p["E"] + p["A"] / n ** p["alpha"] + p["B"] / d ** p["beta"],
    ),
    "L(C)": _Law(
        ("log_k", "log_c", "gamma"),
        ((0, 5, 10, 15, 20, 25, 30), (-1, -0.5, 0, 0.5, 1), (0.01, 0.05, 0.1, 0.2, 0.5)),
        _compute_log_loss,
        lambda t: {"c": math.exp(t[1]), "k": math.exp(t[0]), "gamma": t[2]},
        lambda p, c: p["c"] + p["k"] * c ** -p["gamma"],
    ),
}


def _fit(law_name: str, xs: list[list[float]], losses: list[float], bootstrap: int) -> Fit:
    law = _LAWS[law_name]
    n, k = len(losses), len(law.names)
    _check_points(law_name, xs, losses, k)
    log_x = [torch.tensor(x, dtype=torch.float64).log() for x in xs]
    log_l = torch.tensor(losses, dtype=torch.float64).log()
    starts = torch.tensor(list(itertools.product(*law.grid)), dtype=torch.float64)
    best = _minimise(law, starts, log_x, log_l)
    fit = Fit(law_name, law.readable(best.tolist()))
    per_param = [d / n for n, d in zip(*xs, strict=True)] if len(xs) == 2 else None
    spans = {"N": xs[0], "tokens per parameter": per_param} if per_param else {"C": xs[0]}
    fit.ranges = {name: [min(v), max(v)] for name, v in spans.items()}
    gen = torch.Generator().manual_seed(0)
    for _ in range(bootstrap):
        pick = torch.randint(0, n, (n,), generator=gen)
        theta = _minimise(law, best[None], [x[pick] for x in log_x], log_l[pick])
        fit.samples.append(law.readable(theta.tolist()))
    if fit.samples:
        fit.intervals = {name: _quantiles(sorted(s[name] for s in fit.samples)) for name in fit.params}
    fit.warnings = _doubts(fit, n, k)
    return fit


def _minimise(law: _Law, starts: torch.Tensor, log_x, log_l) -> torch.Tensor:
    """L-BFGS from every start at once (their objectives are independent, so one summed
    objective moves each on its own), then the best start polished alone."""

    def objective(theta):
        residual = law.log_loss(theta, *log_x) - log_l
        zero = torch.zeros_like(residual)
        return torch.nn.functional.huber_loss(residual, zero, reduction="none", delta=HUBER_DELTA).sum(1)

    theta = _lbfgs(starts.clone(), objective, 200)
    with torch.no_grad():
        values = objective(theta)
        best = theta[int(torch.where(torch.isfinite(values), values, torch.inf).argmin())]
    return _lbfgs(best[None].clone(), objective, 500)[0]


def _lbfgs(theta: torch.Tensor, objective, iterations: int) -> torch.Tensor:
    theta.requires_grad_(True)
    opt = torch.optim.LBFGS(
        [theta],
        max_iter=iterations,
        tolerance_grad=1e-14,
        tolerance_change=1e-16,
        line_search_fn="strong_wolfe",
    )

    def closure():
        opt.zero_grad()
        total = objective(theta).sum()
        total.backward()
        return total

    opt.step(closure)
    return theta.detach()


def _check_points(law: str, xs, losses, k: int) -> None:
    """A fit needs more points than parameters, positive values, and spread in every input."""
    if len(losses) <= k:
        raise UserError(f"{law}: {len(losses)} points for {k} parameters: a fit needs more points than that")
    if any(not (v > 0 and math.isfinite(v)) for x in [*xs, losses] for v in x):
        raise UserError(f"{law}: every parameter count, token count, FLOP count and loss must be positive")
    for name, x in zip(("N", "D") if len(xs) == 2 else ("C",), xs, strict=True):
        if len(set(x)) < 3:
            raise UserError(
                f"{law}: {len(set(x))} distinct values of {name}: a power law in {name} needs 3 or more"
            )


def _doubts(fit: Fit, n: int, k: int) -> list[str]:
    """Why not to trust the fit: few points, exponents at the edge of what is physical,
    intervals wider than the values."""
    out = []
    if n < 2 * k:
        out.append(f"only {n} points for {k} parameters: intervals are rough")
    for name in ("alpha", "beta", "gamma"):
        if name in fit.params and not 0.02 < fit.params[name] < 3:
            out.append(f"{name} = {fit.params[name]:.3g} is at the edge of the plausible range (0.02, 3)")
    for name, (lo, hi) in fit.intervals.items():
        if hi - lo > abs(fit.params[name]):
            out.append(
                f"{name}'s 95% interval [{lo:.3g}, {hi:.3g}] is wider than its value {fit.params[name]:.3g}"
            )
    return out


def _quantiles(values: list[float], level: float = 0.95) -> tuple[float, float]:
    if not values:
        return (math.nan, math.nan)
    lo = values[int(math.floor((1 - level) / 2 * (len(values) - 1)))]
    hi = values[int(math.ceil((1 + level) / 2 * (len(values) - 1)))]
    return (lo, hi)
