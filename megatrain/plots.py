"""Training curves from a run directory's metrics.jsonl, as one PNG."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from megatrain.train.metrics import EVENTS, read_metrics  # noqa: E402


def _events(run_dir: Path) -> list[dict]:
    path = run_dir / EVENTS
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Loss and validation loss, lr, global batch and gradient norm against tokens."""
    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    train = [r for r in rows if r.get("kind") == "train"]
    valid = [r for r in rows if r.get("kind") == "valid"]
    if not train:
        raise ValueError(f"{run_dir}: metrics.jsonl has no training rows yet")
    tokens = [r["tokens"] for r in train]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8), sharex=True)
    ax = axes[0][0]
    ax.plot(tokens, [r["loss"] for r in train], lw=1, label="train loss")
    if valid:
        ax.plot([r["tokens"] for r in valid], [r["val_loss"] for r in valid], "o-", ms=3, label="validation loss")
    ax.set_ylabel("loss")
    ax.legend()
    panels = [(axes[0][1], "lr", "learning rate"), (axes[1][0], "batch_tokens", "global batch (tokens)"),
              (axes[1][1], "grad_norm", "gradient norm (before clipping)")]
    for ax, key, label in panels:
        points = [(r["tokens"], r[key]) for r in train if r.get(key) is not None]
        if points:
            ax.plot(*zip(*points, strict=True), lw=1)
        ax.set_ylabel(label)
    for ax in axes.flat:
        ax.grid(alpha=0.3)
        for e in _events(run_dir):
            if e["event"] in ("rollback", "resume") and "tokens" in e:
                ax.axvline(e["tokens"], color="red" if e["event"] == "rollback" else "gray", ls="--", lw=0.8)
    for ax in axes[1]:
        ax.set_xlabel("tokens")
    fig.suptitle(f"{run_dir.name}: {train[-1]['step']} steps, {train[-1]['tokens']:,} tokens")
    fig.tight_layout()
    out = Path(out) if out else run_dir / "curves.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
