"""Recovering from loss spikes in the same process (PaLM 5.1, done automatically).

After every step the spike guard judges the loss and gradient norm. On a spike every
rank (they agree through one collective in the trainer) returns to the newest
rollback point taken before the spike began: an in-memory point, or else the newest
disk checkpoint before it. The sampler then moves past the offending batches: at least
to the end of the spike, and at least `spike.skip` batches (or tokens) from the
rollback point. One line goes to events.jsonl, metrics.jsonl drops the abandoned
steps and marks the rollback, and training continues. More than `spike.max_rollbacks`
rollbacks stop the run (after a last rollback, so its final checkpoint is clean).
"""

from __future__ import annotations

from dataclasses import dataclass

from megatrain.train.checkpoint import rng_state, set_rng_state
from megatrain.train.rollback import RollbackPoints, capture, restore
from megatrain.train.spike_guard import SpikeGuard, Verdict


@dataclass
class Rollback:
    restored_step: int
    skipped_samples: int
    source: str  # "memory" or the checkpoint directory
    gave_up: bool = False


class SpikeRecovery:
    def __init__(self, spike_cfg, in_memory: bool):
        self.cfg = spike_cfg
        self.guard = SpikeGuard(spike_cfg) if spike_cfg.enabled else None
        self.points = RollbackPoints(spike_cfg.snapshot_every, spike_cfg.snapshots if in_memory else 0)
        self.rollbacks = 0
        self.verdict = Verdict(False)

    def state_dict(self) -> dict:
        return {"guard": self.guard.state_dict() if self.guard else None, "rollbacks": self.rollbacks}

    def load_state_dict(self, state: dict) -> None:
        if self.guard and state.get("guard"):
            self.guard.load_state_dict(state["guard"])
        self.rollbacks = state.get("rollbacks", 0)

    def observe(self, step: int, row: dict, overflow: bool = False) -> bool:
        """This rank's verdict on a finished step (the trainer makes the ranks agree)."""
        if self.guard is None:
            return False
        self.verdict = self.guard.observe(step, {"loss": row["loss"], "grad_norm": row.get("grad_norm")}, overflow)
        return self.verdict.spike

    def maybe_capture(self, trainer) -> None:
        if self.points.due(trainer.state.step):
            self.points.add(capture(trainer.engine, trainer.base_optimizer, trainer.state.step,
                                    self._trainer_state(trainer), rng_state()))

    def _trainer_state(self, trainer) -> dict:
        # The guard's history goes back too; the rollback count does not (it counts rollbacks).
        return {**trainer.loop_state(), "guard": self.guard.state_dict() if self.guard else None}

    def roll_back(self, trainer, spike_row: dict) -> Rollback:
        """Return to the newest point before the spike and skip past it (collective)."""
        began = self.verdict.began if self.verdict.began is not None else trainer.state.step
        consumed_after_spike = trainer.sampler.consumed
        point = self.points.before(began)
        if point is not None:
            restore(trainer.engine, trainer.base_optimizer, point)
            set_rng_state(point.rng)
            trainer.load_loop_state(point.trainer_state)
            if self.guard and point.trainer_state.get("guard"):
                self.guard.load_state_dict(point.trainer_state["guard"])
            source = "memory"
        else:
            path = trainer.checkpoint_before(began)
            if path is None:
                raise RuntimeError(f"a loss spike began at step {began}, and there is no rollback point or "
                                   "checkpoint before it (the spike guard needs spike.min_history steps first)")
            trainer.load_checkpoint(path, keep_recovery_count=True)
            source = str(path)
        self.points.drop_after(trainer.state.step)
        if self.cfg.skip_unit == "tokens":
            at_least = self.cfg.skip // trainer.cfg.train.seq_len
        else:  # batches at the batch size of the spike
            at_least = self.cfg.skip * spike_row["batch_tokens"] // trainer.cfg.train.seq_len
        position = trainer.sampler.consumed  # where the skip starts: data.skip=[[position, skipped]] repeats it
        skipped = max(at_least, consumed_after_spike - position)
        trainer.sampler.skip(skipped)
        self.rollbacks += 1
        v = self.verdict
        trainer.log.event("rollback", step=spike_row["step"], tokens=spike_row["tokens"], loss=spike_row["loss"],
                          grad_norm=spike_row.get("grad_norm"), signal=v.signal, value=v.value, baseline=v.baseline,
                          limit=v.limit, began=began, restored_step=trainer.state.step,
                          restored_tokens=trainer.state.tokens, position=position, skipped_samples=skipped,
                          source=source, rollbacks=self.rollbacks)
        trainer.log.truncate_after(trainer.state.step)
        trainer.log.log({"kind": "rollback", "step": trainer.state.step, "tokens": trainer.state.tokens,
                         "spike_step": spike_row["step"], "position": position, "skipped_samples": skipped})
        self.verdict = Verdict(False)
        return Rollback(trainer.state.step, skipped, source, gave_up=self.rollbacks > self.cfg.max_rollbacks)
