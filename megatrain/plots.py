"""Training curves from a run directory's metrics.jsonl, as one PNG."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from megatrain.train.metrics import read_events, read_metrics  # noqa: E402


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Loss and each validation set's loss, lr, global batch and gradient norm against tokens."""
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
    for name in dict.fromkeys(r.get("set", "valid") for r in valid):  # one curve per validation set
        points = [r for r in valid if r.get("set", "valid") == name]
        ax.plot([r["tokens"] for r in points], [r["val_loss"] for r in points], "o-", ms=3,
                label=f"validation loss ({name})")
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
        for e in read_events(run_dir):
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


def schedule_points(cfg, dp_size: int = 1, samples: int = 400) -> dict:
    """LR and global batch against tokens for a config, without training: evenly spaced
    samples plus the exact values at 0, the end of warmup, of the ramp, of the decay,
    each batch step, and beyond the last of them."""
    from megatrain.schedule import BatchSchedule, LRSchedule

    lr, batch = LRSchedule.from_config(cfg), BatchSchedule.from_config(cfg, dp_size)
    s = cfg.schedule
    marks = {"start": 0, "warmup_end": s.warmup_tokens}
    if s.lr_shape != "constant":
        marks["decay_end"] = s.decay_tokens
    if s.batch_steps:
        marks.update({f"batch_step_{i}": t for i, (t, _) in enumerate(s.batch_steps)})
    elif s.batch_ramp_tokens:
        marks["ramp_end"] = s.batch_ramp_tokens
    if cfg.train.max_tokens:
        marks["max_tokens"] = cfg.train.max_tokens
    end = int(1.25 * max(marks.values())) or 1
    marks["beyond"] = end
    tokens = sorted({*(round(end * i / samples) for i in range(samples + 1)), *marks.values()})
    return {"dp_size": dp_size, "marks": marks,
            "points": [{"tokens": t, "lr": lr(t), "batch_tokens": batch(t)} for t in tokens]}


def plot_schedule(cfg, dp_size: int, out: str | Path) -> Path:
    data = schedule_points(cfg, dp_size)
    tokens = [p["tokens"] for p in data["points"]]
    fig, axes = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    axes[0].plot(tokens, [p["lr"] for p in data["points"]])
    axes[0].set_ylabel("learning rate")
    axes[1].plot(tokens, [p["batch_tokens"] for p in data["points"]], drawstyle="steps-post")
    axes[1].set_ylabel("global batch (tokens)")
    axes[1].set_xlabel("tokens")
    warmup = data["marks"]["warmup_end"]
    if 0 < warmup < 0.01 * tokens[-1]:  # GPT-3's 375M-token warmup is invisible on a linear 300B axis
        for ax in axes:
            ax.set_xscale("symlog", linthresh=warmup)
    for ax in axes:
        ax.grid(alpha=0.3)
        for name, t in data["marks"].items():
            if name not in ("start", "beyond"):
                ax.axvline(t, color="gray", ls=":", lw=0.8)
    fig.suptitle(f"{cfg.run.name or Path(cfg.run.dir).name}: schedules by tokens ({dp_size} data-parallel rank(s))")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return Path(out)
