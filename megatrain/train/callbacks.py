"""Optional features around the loop, as callbacks (OLMo-core's pattern): logging,
evaluation, checkpoint cadence, preemption and the heartbeat here; spike recovery in
spike_recovery.py.

Hooks, called in list order (docs/trainer.md has the table): on_start(trainer);
flag(trainer, row) -> this rank's vote (a bool, or a tuple of them), each ORed over all
ranks in one collective;
on_step(trainer, row, flagged) -> True if the step was undone (later callbacks skip it);
on_end(trainer). A `stateful` callback's state_dict() is registered under its `name`
and saved in checkpoints and rollback points.
"""

from __future__ import annotations

import math
import signal
import threading
import time
from pathlib import Path

import numpy as np

from megatrain.train.batches import to_micro_batch


class Callback:
    name: str = ""
    stateful = False

    def on_start(self, trainer) -> None:
        pass

    def flag(self, trainer, row: dict) -> bool | tuple[bool, ...]:
        return False

    def on_step(self, trainer, row: dict, flagged: bool) -> bool:
        return False

    def on_end(self, trainer) -> None:
        pass


class LogMetrics(Callback):
    """Each kept step's row to metrics.jsonl (and wandb), the progress bar every log_every steps."""

    name = "metrics"

    def __init__(self, log_every: int):
        self.log_every = log_every
        self.first: dict | None = None
        self.last: dict | None = None

    def on_step(self, trainer, row, flagged):
        trainer.log.log(row)
        self.first, self.last = self.first or row, row
        if row["step"] % self.log_every == 0:
            trainer.log.progress(
                row["step"],
                row["tokens"],
                loss=f"{row['loss']:.4f}",
                lr=f"{row['lr']:.2e}",
                batch=row["batch_tokens"],
                tok_s=f"{row['tokens_per_s']:.0f}",
            )
        return False


class Evaluate(Callback):
    """Validation every `every` steps (0: only at the end) on each named set, on the same
    `samples` samples of it every time: loss, perplexity and, where the data recorded its
    text size, bits per byte (loss / ln 2 x tokens per byte of the set)."""

    name = "evaluation"

    def __init__(self, valid_sets: dict, every: int, samples: int):
        self.valid_sets, self.every, self.samples = valid_sets, every, samples
        self.last: dict | None = None  # the first set's newest row

    def on_step(self, trainer, row, flagged):
        if self.every and row["step"] % self.every == 0:
            self.run(trainer)
        return False

    def on_end(self, trainer):
        if trainer.outcome == "done" and (self.last is None or self.last["step"] != trainer.progress.step):
            self.run(trainer)

    def run(self, trainer) -> None:
        for i, (name, data) in enumerate(self.valid_sets.items()):
            row = self._evaluate(trainer, name, data)
            if row is not None:
                trainer.log.log(row)
                if i == 0:
                    self.last = row

    def _evaluate(self, trainer, name: str, data) -> dict | None:
        """Collective: every rank runs the same number of forward passes (ZeRO-3 gathers
        parameters collectively); the samples are split over data-parallel ranks."""
        module, mb = trainer.module, trainer.cfg.train.micro_batch
        per_pass = mb * trainer.layout.data_parallel
        n = min(self.samples, len(data)) // per_pass * per_pass
        if n == 0:
            return None
        positions = np.arange(trainer.layout.dp_rank, n, trainer.layout.data_parallel)
        batches = [
            to_micro_batch(data.batch(positions[s : s + mb]), module.device)
            for s in range(0, len(positions), mb)
        ]
        loss = module.evaluate(batches)
        row = {
            "kind": "valid",
            "set": name,
            "step": trainer.progress.step,
            "tokens": trainer.progress.tokens,
            "val_loss": loss,
            "val_ppl": math.exp(min(loss, 50.0)),
            "val_samples": n,
        }
        if data.bytes_per_token:
            row["val_bpb"] = loss / math.log(2) / data.bytes_per_token
        return row


class CheckpointEvery(Callback):
    """A checkpoint every `every` steps (0: only the final one, which the trainer writes), in
    the background with `background` (checkpoint.async_save). A background write is published
    at the first step after which no rank's writer is still running (the vote rides on the
    loop's one collective), and a writer's failure on any rank stops the run there."""

    name = "checkpointing"

    def __init__(self, every: int, background: bool = False):
        self.every, self.background = every, background

    def flag(self, trainer, row):
        return trainer.checkpoints.files.writing()  # (still running, failed) on this rank

    def on_step(self, trainer, row, flagged):
        running, failed = flagged
        if trainer.checkpoints.files.pending is not None and (failed or not running):
            trainer.checkpoints.settle()  # raises on every rank if a writer failed
        if self.every and row["step"] % self.every == 0:
            trainer.checkpoints.save(background=self.background)
        return False


class Preemption(Callback):
    """Stopping on SIGTERM (a scheduler's preemption) or SIGINT (Ctrl-C), as Megatron's
    exit-signal handler does: the step in progress finishes, all ranks agree (the signal
    may reach one rank only), the trainer checkpoints and the run exits 0. A second
    Ctrl-C stops at once."""

    name = "preemption"

    def __init__(self):
        self.signal_name: str | None = None
        self.announced = False
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        """Only records the signal: no I/O inside a handler (it may interrupt any write)."""
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name

    def flag(self, trainer, row):
        if self.signal_name is not None and not self.announced:
            self.announced = True
            print(f"received {self.signal_name}: stopping after this step with a checkpoint", flush=True)
        return self.signal_name is not None

    def on_step(self, trainer, row, flagged):
        if flagged:
            trainer.stop("stopped")
        return False


class Heartbeat(Callback):
    """Rank 0 touches RUN_DIR/heartbeat when the run has started and after steps (after
    their evaluation and checkpoint; at most once a second: a hang is judged in minutes),
    so that a watcher outside the run (launch/supervise.py --hang-timeout) can tell a run
    that makes progress from a hung one. Rank 0 alone suffices: a rank that hangs stops
    every other at the next collective."""

    name = "heartbeat"
    EVERY_S = 1.0

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = Path(path), enabled
        self.last = -math.inf

    def beat(self) -> None:
        if self.enabled and time.monotonic() - self.last >= self.EVERY_S:
            self.path.touch()  # the time is what is read, not the content
            self.last = time.monotonic()

    def on_start(self, trainer):
        self.beat()

    def on_step(self, trainer, row, flagged):
        self.beat()
        return False
