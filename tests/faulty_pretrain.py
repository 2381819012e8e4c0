"""launch/pretrain.py with faults injected, for tests and bench/soak.py only: a normal run
never reads these flags or passes a batch through a test hook.

    deepspeed --num_gpus 2 tests/faulty_pretrain.py --fault checkpoint_write@8:1 \
        --fault nan_loss@23 --poison 480:32 --fault-state DIR <launch/pretrain.py arguments>

--fault NAME@STEP[:RANK] fires once at:
    checkpoint_write     the rank's files are written, nothing published yet  -> SIGKILL
    checkpoint_publish   renamed, `latest` not yet replaced (rank 0)           -> SIGKILL
    writer_kill          (checkpoint.async_save) the background writer has written one
                         of the rank's files of checkpoint STEP                 -> SIGKILL
    writer_error         (checkpoint.async_save) the background writer's second file of
                         checkpoint STEP fails as on a full disk (ENOSPC)
    nan_loss             step STEP's loss becomes NaN (real NaN gradients follow)
    slow                 from step STEP on, the rank sleeps 0.3 s in every forward pass
    hang                 the rank stops after step STEP and never returns (SIGTERM
                         does not end it: as a rank stuck inside a collective)
    stale_listing        at checkpoint STEP the rank's listing of the files lags: it
                         sees every other one (a network filesystem's attribute cache)
    own_run_dir          (STEP 0) the rank's run.dir is RUN_DIR.nodeRANK: a node-local
                         path, not the directory the other ranks write
    op_lock              (STEP 0) at start the rank takes torch's build lock of DeepSpeed's
                         shared-memory op, as DeepSpeed's JIT load does  -> SIGKILL
With --fault-state DIR each fires only once across processes too (a supervised run that
restarts does not crash again at the same point).
--poison START:COUNT replaces the samples at global positions [START, START + COUNT) with
random tokens (seeded by position): a real loss spike, for the spike guard.
--record-samples DIR: each rank appends the dataset indices it trained on, by step, to
DIR/samples-rankR.jsonl, with its model-parallel rank (the pipeline stages, or the
tensor-parallel ranks, of one data-parallel rank draw the same samples; what the tests of
resuming on another layout compare). Faults come
in from here, as callbacks and wrappers around the checkpointer's write and publish.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "launch"))

import pretrain  # noqa: E402  (launch/pretrain.py)

from megatrain.train import checkpoint  # noqa: E402
from megatrain.train.callbacks import Callback  # noqa: E402
from megatrain.train.checkpoint import Checkpointer, checkpoint_step  # noqa: E402
from megatrain.train.checkpoint_writer import BackgroundWriter  # noqa: E402

from _cli import run  # noqa: E402


class Faults:
    def __init__(self, specs: list[str], state_dir: str | None):
        self.points = set()
        for spec in specs:
            name, _, rest = spec.partition("@")
            step, _, rank = rest.partition(":")
            self.points.add((name, int(step), int(rank) if rank else None))
        self.state_dir = Path(state_dir) if state_dir else None
        self.rank = int(os.environ.get("RANK", "0"))
        self.fired: set[tuple[str, int]] = set()

    def fires(self, name: str, step: int) -> bool:
        """Whether fault `name` fires at `step` on this rank (at most once)."""
        if (name, step, None) not in self.points and (name, step, self.rank) not in self.points:
            return False
        marker = self.state_dir / f"{name}@{step}.rank{self.rank}" if self.state_dir else None
        if (name, step) in self.fired or (marker is not None and marker.exists()):
            return False
        self.fired.add((name, step))
        if marker is not None:
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.touch()
        return True

    def crash_if(self, name: str, step: int) -> None:
        if self.fires(name, step):
            self.crash(f"{name}@{step}")

    def crash(self, where: str) -> None:
        print(f"[fault injection] rank {self.rank}: SIGKILL at {where}", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)


def install_checkpoint_faults(faults: Faults) -> None:
    write, point_latest = Checkpointer._write, Checkpointer._point_latest

    def _write(self, engine, step, state, rank_state, tmp):
        write(self, engine, step, state, rank_state, tmp)
        faults.crash_if("checkpoint_write", step)

    def _point_latest(self, final):
        faults.crash_if("checkpoint_publish", checkpoint_step(final))
        point_latest(self, final)

    Checkpointer._write, Checkpointer._point_latest = _write, _point_latest
    listing = checkpoint._listing

    def _listing(directory):
        files = listing(directory)
        return (
            files[::2] if faults.fires("stale_listing", checkpoint_step(Path(directory.name[5:]))) else files
        )

    checkpoint._listing = _listing
    start = BackgroundWriter.start

    def start_writing(self, root, files, ready=None):
        """The writer thread meets a file that kills its process, or that the disk refuses."""
        step = checkpoint_step(Path(root.name[5:]))
        if faults.fires("writer_kill", step):
            files = [
                *files[:1],
                (root / "killed", Fault(lambda: faults.crash(f"writer_kill@{step}"))),
                *files[1:],
            ]
        if faults.fires("writer_error", step):
            files = [*files[:1], (root / "refused", Fault(_disk_full)), *files[1:]]
        start(self, root, files, ready)

    BackgroundWriter.start = start_writing


class Fault:
    """An object whose pickling does `act` (torch.save pickles it in the writer thread)."""

    def __init__(self, act):
        self.act = act

    def __reduce__(self):
        self.act()
        return (Fault, (None,))


def _disk_full():
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def die_holding_the_op_lock(faults: Faults) -> None:
    """op_lock@0: a rank killed while it loads an op leaves torch's lock file behind."""
    if faults.fires("op_lock", 0):
        from torch.utils.file_baton import FileBaton

        from megatrain.train.prebuilt_ops import torch_build_dir

        lock = torch_build_dir("deepspeed_shm_comm") / "lock"
        lock.parent.mkdir(parents=True, exist_ok=True)
        FileBaton(str(lock)).try_acquire()
        faults.crash("op_lock@0, holding " + str(lock))


def own_run_dir(faults: Faults, argv: list[str]) -> list[str]:
    """own_run_dir@0: this rank's run.dir becomes RUN_DIR.nodeRANK."""
    if not faults.fires("own_run_dir", 0):
        return argv
    run_dir = next(a.split("=", 1)[1] for a in argv if a.startswith("run.dir="))
    return [*argv, "--set", f"run.dir={run_dir}.node{faults.rank}"]


class Poison(Callback):
    """Samples at global positions [start, start + count) become random tokens."""

    name = "fault_poison"

    def __init__(self, spec: str):
        start, count = (int(x) for x in spec.split(":"))
        self.positions = range(start, start + count)

    def on_start(self, trainer):
        batches, vocab_size = trainer.batches, trainer.model_cfg.vocab_size
        tokens = batches.tokens

        def poisoned_tokens():
            batch = tokens()
            for row, pos in enumerate(batches.sampler.last_positions):
                if pos in self.positions:
                    batch[row] = np.random.default_rng(int(pos)).integers(0, vocab_size, batch.shape[1])
            return batch

        batches.tokens = poisoned_tokens


class RecordSamples(Callback):
    """Each rank's dataset indices, per optimizer step, as the data loader drew them."""

    name = "fault_record_samples"

    def __init__(self, out_dir: str):
        self.out = Path(out_dir) / f"samples-rank{os.environ.get('RANK', '0')}.jsonl"
        self.out.parent.mkdir(parents=True, exist_ok=True)

    def on_start(self, trainer):
        batches = trainer.batches
        tokens = batches.tokens

        def recorded_tokens():
            batch = tokens()
            with open(self.out, "a") as f:
                indices = batches.sampler.at(batches.sampler.last_positions).tolist()
                f.write(
                    json.dumps(
                        {
                            "step": trainer.progress.step + 1,
                            "mp_rank": trainer.layout.mp_rank,
                            "samples": indices,
                        }
                    )
                    + "\n"
                )
            return batch

        batches.tokens = recorded_tokens


class NaNLoss(Callback):
    """nan_loss@N: every micro-batch loss of step N is multiplied by NaN on this rank."""

    name = "fault_nan_loss"

    def __init__(self, faults: Faults):
        self.faults = faults

    def on_start(self, trainer):
        module = trainer.module
        loss = type(module).loss

        def broken_loss(inputs, targets):
            out = loss(module, inputs, targets)
            return out * float("nan") if self.firing else out

        self.firing = False
        module.loss = broken_loss
        step = trainer.train_step

        def train_step():
            self.firing = self.faults.fires("nan_loss", trainer.progress.step + 1)
            return step()

        trainer.train_step = train_step


class SlowRank(Callback):
    """slow@N[:RANK]: from step N on, the rank sleeps SLEEP_S in every forward pass (a straggler)."""

    name = "fault_slow"
    SLEEP_S = 0.3

    def __init__(self, faults: Faults):
        self.first = min(
            (step for name, step, rank in faults.points if name == "slow" and rank in (None, faults.rank)),
            default=None,
        )

    def on_start(self, trainer):
        if self.first is None:
            return
        module, progress = trainer.module, trainer.progress
        loss = type(module).loss

        def slow_loss(inputs, targets):
            if progress.step + 1 >= self.first:
                time.sleep(self.SLEEP_S)
            return loss(module, inputs, targets)

        module.loss = slow_loss


class Hang(Callback):
    """hang@N: after step N this rank sleeps for good; a signal's handler runs and the
    sleep goes on, as for a rank blocked in a collective."""

    name = "fault_hang"

    def __init__(self, faults: Faults):
        self.faults = faults

    def on_step(self, trainer, row, flagged):
        if self.faults.fires("hang", row["step"]):
            print(f"[fault injection] rank {self.faults.rank}: hangs after step {row['step']}", flush=True)
            while True:
                time.sleep(3600)
        return False


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--fault", action="append", default=[])
    p.add_argument("--poison")
    p.add_argument("--fault-state")
    p.add_argument("--record-samples")
    args, rest = p.parse_known_args()
    faults = Faults(args.fault, args.fault_state)
    install_checkpoint_faults(faults)
    die_holding_the_op_lock(faults)
    callbacks = [
        NaNLoss(faults),
        SlowRank(faults),
        Hang(faults),
        *([Poison(args.poison)] if args.poison else []),
        *([RecordSamples(args.record_samples)] if args.record_samples else []),
    ]
    return pretrain.main(own_run_dir(faults, rest), callbacks=callbacks)


if __name__ == "__main__":
    run(main)
