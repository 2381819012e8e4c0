"""Cooldown branches: the final loss of a warmup-stable-decay run at a token budget, from a
checkpoint of one long run's stable phase (Hagele et al. 2024; docs/scaling.md).

A branch is a normal run with run.branch_from set: it starts from the trunk's newest
checkpoint at or before budget x (1 - fraction) and cools down from exactly there to the
budget, so its cooldown is the fraction asked for or a little longer.
"""

from __future__ import annotations

from pathlib import Path

from megatrain.config import load_config
from megatrain.errors import UserError
from megatrain.train.checkpoint import Checkpointer


def branch_point(trunk: Path, budget: int, fraction: float) -> tuple[Path, int]:
    """The trunk's checkpoint a branch to `budget` tokens starts from, and its tokens."""
    trunk = Path(trunk)
    if not (trunk / "config.yaml").is_file():
        raise UserError(f"{trunk}: not a run directory (no config.yaml)")
    schedule = load_config(trunk / "config.yaml").schedule
    if schedule.decay != "wsd":
        raise UserError(f"{trunk}: not a warmup-stable-decay run (schedule.decay: {schedule.decay})")
    if not 0 < fraction < 1:
        raise UserError(f"cooldown fraction {fraction}: must be in (0, 1)")
    stable_end = schedule.decay_tokens - schedule.cooldown_length()
    start = budget * (1 - fraction)
    found = None
    for path in Checkpointer(trunk, keep=1 << 30).complete_checkpoints():
        tokens = Checkpointer.read_state(path)["state"]["progress"]["tokens"]
        if tokens <= min(start, stable_end):
            found = (path, tokens)
    if found is None:
        raise UserError(
            f"{trunk}: no checkpoint of the stable phase at or before {start:,.0f} tokens "
            f"(a {fraction:g} cooldown to {budget:,} tokens); checkpoint the trunk more often"
        )
    return found


def branch_overrides(trunk: Path, budget: int, fraction: float, run_dir: Path) -> list[str]:
    """The --set overrides of launch/pretrain.py, on the trunk's config.yaml, for the branch."""
    path, tokens = branch_point(trunk, budget, fraction)
    return [
        f"run.dir={run_dir}",
        f"run.branch_from={path}",
        f"schedule.decay_tokens={budget}",
        f"schedule.cooldown_tokens={budget - tokens}",
        f"train.max_tokens={budget}",
        "train.max_steps=null",
    ]
