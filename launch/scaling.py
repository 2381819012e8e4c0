"""Fit scaling laws to finished runs and predict a bigger run's final loss (docs/scaling.md).

    python launch/scaling.py --points runs.csv --predict 7e10 1.4e12 --compute 5.76e23 \\
        --json fit.json --plot fit.png

--points: a CSV or JSON list with one row per finished run: `params` (N), `tokens` (D),
`loss` (its final held-out loss) and, for L(C), `flops` (else 6ND). Fits Chinchilla's
L(N, D) = E + A/N^alpha + B/D^beta and L(C) = c + k C^-gamma with 95% bootstrap intervals;
--predict N D gives a run's final loss with its interval, --compute C the compute-optimal
N and D. A fit that cannot be trusted says why before any number.
"""

import argparse
import csv
import json
from pathlib import Path

from megatrain.errors import UserError
from megatrain.scaling.fit import compute_optimal, fit_compute, fit_loss

from _cli import run


def read_points(path: Path) -> list[dict]:
    try:
        text = path.read_text()
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None
    try:
        rows = json.loads(text) if path.suffix == ".json" else list(csv.DictReader(text.splitlines()))
        points = [
            {k: float(v) for k, v in row.items() if k in ("params", "tokens", "loss", "flops")}
            for row in rows
        ]
    except (ValueError, TypeError, AttributeError) as e:
        raise UserError(f"{path}: not a table of params, tokens, loss ({e})") from None
    missing = [i for i, p in enumerate(points) if not {"params", "tokens", "loss"} <= set(p)]
    if missing:
        raise UserError(f"{path}: row {missing[0] + 1} lacks params, tokens or loss")
    return points


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--points", type=Path, required=True, help="CSV or JSON: params, tokens, loss[, flops]")
    p.add_argument("--predict", nargs=2, type=float, action="append", default=[], metavar=("N", "D"))
    p.add_argument(
        "--compute", type=float, action="append", default=[], help="FLOPs: the compute-optimal N, D"
    )
    p.add_argument("--bootstrap", type=int, default=200, help="resamples for the intervals (200)")
    p.add_argument("--json", type=Path, help="write the fits and predictions here")
    p.add_argument("--plot", type=Path, help="PNG: points, fitted L(C) and the predictions")
    args = p.parse_args()
    points = read_points(args.points)
    n, d, loss = ([pt[k] for pt in points] for k in ("params", "tokens", "loss"))
    flops = [pt.get("flops", 6 * pt["params"] * pt["tokens"]) for pt in points]
    by_size = fit_loss(n, d, loss, args.bootstrap)
    by_compute = fit_compute(flops, loss, args.bootstrap)
    out = {"points": len(points), "fits": [by_size.as_dict(), by_compute.as_dict()], "predictions": []}
    for fit in (by_size, by_compute):
        print(f"{fit.law}: " + ", ".join(f"{k} {v:.4g} [{a:.4g}, {b:.4g}]" for k, v, (a, b) in _rows(fit)))
        for warning in fit.warnings:
            print(f"  not to be trusted as it is: {warning}")
    for N, D in args.predict:
        lo, hi = by_size.interval(N, D)
        row = {"params": N, "tokens": D, "loss": by_size.predict(N, D), "interval": [lo, hi]}
        out["predictions"].append(row)
        print(f"predicted final loss at N={N:.3g}, D={D:.3g}: {row['loss']:.4f} [{lo:.4f}, {hi:.4f}]")
        row["beyond"] = by_size.beyond(N, D)
        for line in row["beyond"]:
            print(f"  {line}")
    for C in args.compute:
        N, D = compute_optimal(by_size, C)
        out["predictions"].append({"flops": C, "params": N, "tokens": D, "loss": by_size.predict(N, D)})
        print(f"compute-optimal at C={C:.3g}: N={N:.3g}, D={D:.3g} ({D / N:.1f} tokens per parameter)")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")
    if args.plot:
        plot(
            args.plot,
            flops,
            loss,
            by_compute,
            [(6 * r["params"] * r["tokens"], r) for r in out["predictions"]],
        )


def _rows(fit):
    return [(k, v, fit.intervals.get(k, (float("nan"),) * 2)) for k, v in fit.params.items()]


def plot(path: Path, flops, loss, fit, predictions) -> None:
    import numpy as np

    from megatrain.plots import plt

    fig, ax = plt.subplots(figsize=(8, 5))
    ax.scatter(flops, loss, label="runs", color="k", s=12)
    reach = max([max(flops), *(c for c, _ in predictions)])
    grid = np.geomspace(min(flops), reach, 200)
    ax.plot(
        grid, [fit.predict(c) for c in grid], label=f"L(C) = c + k C^-gamma, gamma {fit.params['gamma']:.3f}"
    )
    for c, row in predictions:
        if "interval" in row:
            lo, hi = row["interval"]
            err = [[row["loss"] - lo], [hi - row["loss"]]]
            ax.errorbar([c], [row["loss"]], yerr=err, fmt="o", capsize=4, label="predicted by L(N, D), 95%")
    ax.set(xscale="log", xlabel="training FLOPs", ylabel="final held-out loss")
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


if __name__ == "__main__":
    run(main)
