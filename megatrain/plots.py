"""Training curves from a run directory's metrics.jsonl, as one PNG."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from megatrain.train.metrics import read_events, read_metrics  # noqa: E402


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Loss and each validation set's loss, lr, global batch and gradient norm against
    tokens; for a blend, also each source's share of every batch (the mixture as trained);
    with experts, each MoE block's expert load (smallest and largest share, and the newest
    histogram)."""
    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    train = [r for r in rows if r.get("kind") == "train"]
    valid = [r for r in rows if r.get("kind") == "valid"]
    if not train:
        raise ValueError(f"{run_dir}: metrics.jsonl has no training rows yet")
    tokens = [r["tokens"] for r in train]
    blend, experts = "source_tokens" in train[-1], "moe_balance" in train[-1]
    rows_ = 2 + blend + experts
    fig, axes = plt.subplots(rows_, 2, figsize=(12, 4 * rows_), squeeze=False)
    for ax in axes.flat[: 2 * (rows_ - experts)]:
        ax.sharex(axes[0][0])
    ax = axes[0][0]
    ax.plot(tokens, [r["loss"] for r in train], lw=1, label="train loss")
    for name in dict.fromkeys(r.get("set", "valid") for r in valid):  # one curve per validation set
        points = [r for r in valid if r.get("set", "valid") == name]
        ax.plot(
            [r["tokens"] for r in points],
            [r["val_loss"] for r in points],
            "o-",
            ms=3,
            label=f"validation loss ({name})",
        )
    ax.set_ylabel("loss")
    ax.legend()
    panels = [
        (axes[0][1], "lr", "learning rate"),
        (axes[1][0], "batch_tokens", "global batch (tokens)"),
        (axes[1][1], "grad_norm", "gradient norm (before clipping)"),
    ]
    for ax, key, label in panels:
        points = [(r["tokens"], r[key]) for r in train if r.get(key) is not None]
        if points:
            ax.plot(*zip(*points, strict=True), lw=1)
        ax.set_ylabel(label)
    if blend:
        _plot_sources(axes[2][0], axes[2][1], train)
    if experts:
        _plot_expert_load(axes[-1][0], axes[-1][1], train)
    for ax in axes.flat[: 2 * (rows_ - experts) + 1]:
        ax.grid(alpha=0.3)
        for e in read_events(run_dir):
            if e["event"] in ("rollback", "resume") and "tokens" in e:
                ax.axvline(e["tokens"], color="red" if e["event"] == "rollback" else "gray", ls="--", lw=0.8)
    for ax in axes[-1][:1] if experts else axes[-1]:
        ax.set_xlabel("tokens")
    fig.suptitle(f"{run_dir.name}: {train[-1]['step']} steps, {train[-1]['tokens']:,} tokens")
    fig.tight_layout()
    out = Path(out) if out else run_dir / "curves.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def _plot_sources(share_ax, tokens_ax, train: list[dict]) -> None:
    """Each source's share of each step's batch, and its tokens trained on so far."""
    tokens = [r["tokens"] for r in train]
    for name in train[-1]["source_tokens"]:
        seen = [r.get("source_tokens", {}).get(name, 0) for r in train]
        before = [0, *seen[:-1]]
        share_ax.plot(
            tokens,
            [(b - a) / r["batch_tokens"] for a, b, r in zip(before, seen, train, strict=True)],
            lw=1,
            label=name,
        )
        tokens_ax.plot(tokens, seen, lw=1, label=name)
    share_ax.set_ylabel("share of the batch, by source")
    share_ax.legend()
    tokens_ax.set_ylabel("tokens trained on, by source")
    tokens_ax.legend()


def _plot_expert_load(band_ax, bars_ax, train: list[dict]) -> None:
    """Per MoE block, the smallest and largest expert's share of the routed tokens (a band)
    against tokens; and the newest full histogram (logging.moe_load_every), a bar per expert."""
    tokens = [r["tokens"] for r in train]
    blocks = [k.split("/")[1] for k in train[-1] if k.startswith("moe_load_min/")]
    for block in blocks:
        low = [r[f"moe_load_min/{block}"] for r in train]
        high = [r[f"moe_load_max/{block}"] for r in train]
        band_ax.fill_between(tokens, low, high, alpha=0.3, label=f"block {block}")
    band_ax.set_ylabel("expert's share of routed tokens (min-max)")
    band_ax.legend()
    newest = next((r for r in reversed(train) if "moe_load" in r), None)
    if newest is None:
        return
    loads = newest["moe_load"]
    width = 0.8 / len(loads)
    for i, (block, shares) in enumerate(loads.items()):
        bars_ax.bar([e + i * width for e in range(len(shares))], shares, width, label=f"block {block}")
    bars_ax.axhline(1 / len(next(iter(loads.values()))), color="gray", ls="--", lw=0.8)  # balanced
    bars_ax.set_xlabel("expert")
    bars_ax.set_ylabel(f"share of routed tokens at step {newest['step']}")
    bars_ax.legend()


def schedule_points(cfg, dp_size: int = 1, samples: int = 400) -> dict:
    """LR, global batch and, for a blend, the mixture's weights against tokens for a
    config, without training: evenly spaced samples plus the exact values at 0, the end
    of warmup, of the ramp, of the decay, each batch step, each mixture stage, and
    beyond the last of them."""
    from megatrain.schedule import BatchSchedule, LRSchedule
    from megatrain.schedule.mixture import MixtureSchedule

    lr, batch = LRSchedule.from_config(cfg), BatchSchedule.from_config(cfg, dp_size)
    mixture = MixtureSchedule.from_config(cfg) if isinstance(cfg.data.path, list) else None
    s = cfg.schedule
    marks = {"start": 0, "warmup_end": s.warmup_tokens}
    if s.decay == "wsd":
        marks["cooldown_start"] = lr.decay_start
    if s.decay == "wsd" or s.lr_shape != "constant":
        marks["decay_end"] = s.decay_tokens
    if s.batch_steps:
        marks.update({f"batch_step_{i}": t for i, (t, _) in enumerate(s.batch_steps)})
    elif s.batch_ramp_tokens:
        marks["ramp_end"] = s.batch_ramp_tokens
    if mixture is not None:
        marks.update({f"mixture_stage_{i}": t for i, (t, _) in enumerate(mixture.keyframes) if i})
    if cfg.train.max_tokens:
        marks["max_tokens"] = cfg.train.max_tokens
    end = int(1.25 * max(marks.values())) or 1
    marks["beyond"] = end
    tokens = sorted({*(round(end * i / samples) for i in range(samples + 1)), *marks.values()})
    points = [{"tokens": t, "lr": lr(t), "batch_tokens": batch(t)} for t in tokens]
    if mixture is not None:
        for p in points:
            p["mixture"] = dict(zip(mixture.names, mixture(p["tokens"]).tolist(), strict=True))
    return {"dp_size": dp_size, "marks": marks, "points": points}


def plot_schedule(cfg, dp_size: int, out: str | Path) -> Path:
    data = schedule_points(cfg, dp_size)
    tokens = [p["tokens"] for p in data["points"]]
    mixture = "mixture" in data["points"][0]
    fig, axes = plt.subplots(3 if mixture else 2, 1, figsize=(10, 10 if mixture else 7), sharex=True)
    axes[0].plot(tokens, [p["lr"] for p in data["points"]])
    axes[0].set_ylabel("learning rate")
    axes[1].plot(tokens, [p["batch_tokens"] for p in data["points"]], drawstyle="steps-post")
    axes[1].set_ylabel("global batch (tokens)")
    if mixture:
        for name in data["points"][0]["mixture"]:
            axes[2].plot(
                tokens,
                [p["mixture"][name] for p in data["points"]],
                label=name,
                drawstyle="steps-post" if cfg.data.stage_shape == "stepwise" else "default",
            )
        axes[2].set_ylabel("mixture weight")
        axes[2].legend()
    axes[-1].set_xlabel("tokens")
    warmup = data["marks"]["warmup_end"]
    if 0 < warmup < 0.01 * tokens[-1]:  # GPT-3's 375M-token warmup is invisible on a linear 300B axis
        for ax in axes:
            ax.set_xscale("symlog", linthresh=warmup)
    for ax in axes:
        ax.grid(alpha=0.3)
        for name, t in data["marks"].items():
            if name not in ("start", "beyond"):
                ax.axvline(t, color="gray", ls=":", lw=0.8)
    fig.suptitle(
        f"{cfg.run.name or Path(cfg.run.dir).name}: schedules by tokens ({dp_size} data-parallel rank(s))"
    )
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return Path(out)
