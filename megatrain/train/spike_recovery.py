"""Recovering from loss spikes in the same process (PaLM 5.1, done automatically).

After every step the spike guard (spike_guard.py) judges the loss and gradient norm;
the ranks agree through the loop's one collective. On a spike every rank returns to
the newest rollback point taken before the spike began: an in-memory point, or else
the newest disk checkpoint before it. The sampler then moves past the offending
batches: at least to the end of the spike, and at least `spike.skip` batches (or
tokens) from the rollback point. One line goes to events.jsonl, metrics.jsonl drops
the abandoned steps and marks the rollback, and training continues. More than
`spike.max_rollbacks` rollbacks stop the run (after a last rollback, so its final
checkpoint is clean).

What it needs from the trainer is narrow: `snapshot()` / `restore(point)`,
`checkpoints.files.newest_before(step)` / `checkpoints.load(path)`, `stop()`,
`batches.skip(n)`, `progress`, `log`.
A point costs a host copy of this rank's parameters and optimizer state (~16 bytes per
fp32 parameter with AdamW); under ZeRO-3 (DeepSpeed-private partitions) and with
spike.snapshots = 0, rollbacks go to disk checkpoints.
"""

from __future__ import annotations

from collections import deque

from megatrain.devices import host_memory
from megatrain.train import distributed as dist
from megatrain.train.callbacks import Callback
from megatrain.train.spike_guard import SpikeGuard, Verdict


def snapshot_budget(spike_cfg) -> int:
    """Host bytes this rank may hold in rollback points: spike.snapshot_memory_gb, else a
    quarter of the memory the node's ranks may use (a container's limit, not the machine's
    RAM, where it is less), shared by them."""
    if spike_cfg.snapshot_memory_gb is not None:
        return int(spike_cfg.snapshot_memory_gb * 2**30)
    return host_memory() // 4 // dist.local_world_size()


class SpikeRecovery(Callback):
    name = "recovery"
    stateful = True

    def __init__(self, spike_cfg, seq_len: int, in_memory: bool):
        self.cfg, self.seq_len = spike_cfg, seq_len
        self.guard = SpikeGuard(spike_cfg) if spike_cfg.enabled else None
        self.keep = spike_cfg.snapshots if in_memory and spike_cfg.enabled else 0  # no guard: no points
        self.points: deque[dict] = deque(maxlen=max(self.keep, 1))  # rollback points, oldest first
        self.rollbacks = 0
        self.verdict = Verdict(False)

    # The guard's history goes back with a rollback; the rollback count does not (roll_back keeps it).
    def state_dict(self) -> dict:
        return {"guard": self.guard.state_dict() if self.guard else None, "rollbacks": self.rollbacks}

    def load_state_dict(self, state: dict) -> None:
        if self.guard and state.get("guard"):
            self.guard.load_state_dict(state["guard"])
        self.rollbacks = state.get("rollbacks", 0)

    def on_start(self, trainer) -> None:
        if self.keep:  # as many points as the host-memory budget holds
            # What background checkpoints reserved comes off the budget first.
            per_point = trainer.module.snapshot_bytes()
            budget = max(snapshot_budget(self.cfg) - trainer.checkpoints.host_reserved, 0)
            fit = min(self.keep, budget // max(per_point, 1))
            message = (
                f"spike: rollback points of {per_point / 2**20:,.1f} MiB per rank, {fit} of spike.snapshots="
                f"{self.keep} within {budget / 2**30:,.1f} GiB of host memory (spike.snapshot_memory_gb)"
            )
            if fit == 0:
                message += "; rollbacks will use disk checkpoints"
            trainer.log.print(message)
            self.keep = fit
            self.points = deque(maxlen=max(fit, 1))
        self._maybe_capture(trainer)  # where the run starts is a rollback point too

    def flag(self, trainer, row) -> bool:
        """This rank's verdict on the finished step."""
        if self.guard is None:
            return False
        self.verdict = self.guard.observe(
            row["step"], {"loss": row["loss"], "grad_norm": row.get("grad_norm")}, trainer.module.overflow
        )
        return self.verdict.spike

    def on_step(self, trainer, row, flagged) -> bool:
        if not flagged:
            self._maybe_capture(trainer)
            return False
        self.roll_back(trainer, row)
        log = trainer.log
        log.print(
            f"loss spike at step {row['step']} (loss {row['loss']:.4f}): rolled back to step "
            f"{trainer.progress.step} ({self.last_source}), skipped {self.last_skipped} samples "
            f"[rollback {self.rollbacks}/{self.cfg.max_rollbacks}]"
        )
        # Checkpoints of the abandoned timeline go first: pruning keeps the newest steps,
        # and `--resume auto` must never find one of them.
        trainer.checkpoints.files.discard_after(trainer.progress.step)
        if self.rollbacks > self.cfg.max_rollbacks:
            trainer.stop("gave_up", final_checkpoint=True)  # the final checkpoint records the rollback count
        else:
            trainer.checkpoints.save()  # makes the skip durable
        return True

    def _maybe_capture(self, trainer) -> None:
        """A rollback point every spike.snapshot_every steps (the newest spike.snapshots kept)."""
        step = trainer.progress.step
        if (
            self.keep
            and step % self.cfg.snapshot_every == 0
            and not (self.points and self.points[-1]["step"] == step)
        ):
            oldest = self.points[0] if len(self.points) == self.keep else None  # about to be dropped
            self.points.append(trainer.snapshot(reuse=oldest))

    def roll_back(self, trainer, spike_row: dict) -> None:
        """Collective: return to the newest point before the spike and skip past it."""
        # A background checkpoint in flight is published first: it may be the one to go back
        # to, or one of the abandoned timeline that discard_after must then find.
        trainer.checkpoints.settle()
        began = self.verdict.began if self.verdict.began is not None else trainer.progress.step
        consumed_after_spike = trainer.batches.consumed
        rollbacks = self.rollbacks
        point = next(
            (p for p in reversed(self.points) if p["step"] < began), None
        )  # the state after a step < began
        if point is not None:
            trainer.restore(point)
            self.last_source = "memory"
        else:
            path = trainer.checkpoints.files.newest_before(began)
            if path is None:
                raise RuntimeError(
                    f"a loss spike began at step {began}, and there is no rollback point or "
                    "checkpoint before it (the spike guard needs spike.min_history steps first)"
                )
            trainer.checkpoints.load(path)
            self.last_source = str(path)
        self.rollbacks = rollbacks + 1  # restoring brought back an older count
        step, tokens = trainer.progress.step, trainer.progress.tokens
        while self.points and self.points[-1]["step"] > step:  # points of the abandoned timeline
            self.points.pop()
        if self.cfg.skip_unit == "tokens":
            at_least = self.cfg.skip // self.seq_len
        else:  # batches at the batch size of the spike
            at_least = self.cfg.skip * spike_row["batch_tokens"] // self.seq_len
        position = (
            trainer.batches.consumed
        )  # where the skip starts: data.skip=[[position, skipped]] repeats it
        self.last_skipped = max(at_least, consumed_after_spike - position)
        trainer.batches.skip(self.last_skipped)
        v = self.verdict
        trainer.log.event(
            "rollback",
            step=spike_row["step"],
            tokens=spike_row["tokens"],
            loss=spike_row["loss"],
            grad_norm=spike_row.get("grad_norm"),
            signal=v.signal,
            value=v.value,
            baseline=v.baseline,
            limit=v.limit,
            began=began,
            restored_step=step,
            restored_tokens=tokens,
            position=position,
            skipped_samples=self.last_skipped,
            source=self.last_source,
            rollbacks=self.rollbacks,
        )
        trainer.log.truncate_after(step)
        trainer.log.log(
            {
                "kind": "rollback",
                "step": step,
                "tokens": tokens,
                "spike_step": spike_row["step"],
                "position": position,
                "skipped_samples": self.last_skipped,
            }
        )
        self.verdict = Verdict(False)
