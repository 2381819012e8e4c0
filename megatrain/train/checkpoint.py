"""Checkpoints: DeepSpeed engine state plus megatrain's own, published atomically.

Layout of a run directory:

    checkpoints/step-00000100/   DeepSpeed's files (model, optimizer, per-rank shards)
        megatrain.json           the run's shared resumable state, model shape, layout and config
        megatrain-rank00000.pt   each rank's own resumable state (its RNG)
        manifest.json            every file's size and sha256 (a file several ranks wrote:
                                 each one's part); written last
    latest                       text file naming the newest complete checkpoint

Writing: every rank writes into checkpoints/.tmp-step-N/; the ranks hash the files
between them; rank 0 writes manifest.json, renames the directory to step-N and then
replaces `latest` with os.replace (atomic). A crash at any point leaves `latest` on the
previous complete checkpoint; stale .tmp-* directories are removed by the next save.
In the background (checkpoint.async_save, checkpoint_writer.py): every rank copies its
files' state into host memory and its writer thread writes and hashes them while training
goes on; once every rank's writer has finished (the step loop's collective says so),
`settle` publishes the directory the same way. At most one write is in flight.
Reading: a checkpoint is used only if its manifest lists every file with the right
size and sha256; otherwise the next older one is tried, with a warning naming the bad
file. The run directory must be on a filesystem every rank sees (as for DeepSpeed):
`check_shared` refuses one that is not, at start.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch

from megatrain.errors import RunError, UserError, reason
from megatrain.files import file_sha256, write_atomically
from megatrain.train import distributed as dist
from megatrain.train import ds_internals
from megatrain.train.checkpoint_writer import BackgroundWriter, HostCopies

FORMAT = "megatrain-checkpoint/2"
MANIFEST = "manifest.json"
STATE = "megatrain.json"
LATEST = "latest"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def rank_file(rank: int) -> str:
    return f"megatrain-rank{rank:05d}.pt"


def upgrade(saved: dict) -> dict:
    """megatrain.json written by any earlier megatrain, with what it lacked filled in as the
    code that wrote it behaved: every shim for old checkpoints lives here. (A model shape's
    later keys take their defaults in GPTConfig.from_shape.)"""
    saved["layout"] = {"tensor_parallel": 1, **saved["layout"]}  # before tensor parallelism
    if "batch_unit_tokens" not in saved:  # before the unit was saved: the first layout's micro-batch unit
        train = saved["config"]["train"]
        saved["batch_unit_tokens"] = train["micro_batch"] * train["seq_len"] * saved["layout"]["dp_size"]
    data = saved.get("state", {}).get("data")
    if data is not None:
        data.setdefault("source_samples", {})  # before per-source counts: from 0
    if "optimizer_flavour" not in saved:  # before it was recorded: what DeepSpeed made of the config then
        saved["optimizer_flavour"] = _flavour_then(saved["config"], saved["layout"])
    return saved


def _flavour_then(config: dict, layout: dict) -> str:
    """The optimizer flavour (ds_internals.FLAVOURS) of a checkpoint from before it was recorded."""
    if layout["zero_stage"]:
        return "zero3" if layout["zero_stage"] == 3 else "zero12"
    mixed = {
        "bf16": "bf16" if layout["pipeline_stages"] > 1 else "copies",
        "fp16": "fp16_flat" if config["optim"]["name"] == "adamw" else "copies",
    }
    return mixed.get(config["train"]["precision"], "plain")


def _listing(directory: Path) -> list[str]:
    """The files under `directory` this rank sees, relative to it."""
    return sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file())


def _hash_share(directory: Path, seen_by: list[list[str]], rank: int) -> dict[str, dict]:
    """{file: {"bytes", "sha256"}} for this rank's share of every file any rank listed: each
    file goes, in turn, to one of the ranks that listed it."""
    owners: dict[str, list[int]] = {}
    for r, files in enumerate(seen_by):
        for f in files:
            owners.setdefault(f, []).append(r)
    mine = [f for i, f in enumerate(sorted(owners)) if owners[f][i % len(owners[f])] == rank]
    return {f: {"bytes": (directory / f).stat().st_size, "sha256": file_sha256(directory / f)} for f in mine}


@dataclass(frozen=True)
class Pending:
    """A background write in flight: its step, directory and this rank's host bytes."""

    step: int
    tmp: Path
    nbytes: int


def step_tag(step: int) -> str:
    return f"step-{step:08d}"


def checkpoint_step(path: Path) -> int:
    """The step of a published checkpoint directory (step_tag's inverse)."""
    return int(_STEP_DIR.match(path.name).group(1))


class Checkpointer:
    def __init__(self, run_dir: Path, keep: int, pinned: bool = False):
        """`pinned`: background writes copy into pinned host memory (from a GPU)."""
        self.run_dir = Path(run_dir)
        self.root = self.run_dir / "checkpoints"
        self.latest_file = self.run_dir / LATEST
        self.keep = keep
        self.copies, self.writer = HostCopies(pinned), BackgroundWriter()
        self.pending: Pending | None = None  # the background write in flight

    # --- writing ----------------------------------------------------------------------

    def save(self, engine, step: int, state: dict, rank_state: dict) -> Path:
        """Collective: every rank calls it. `state` is megatrain's shared state (identical on
        all ranks, JSON), `rank_state` this rank's own. A write that fails (disk full, or a
        peer rank died mid-write) removes the partial directory, leaves `latest` as it was
        and raises a RunError naming the problem; the other ranks are stopped by the
        launcher when this one exits."""
        tmp = self._tmp(step)
        try:
            self._write(engine, step, state, rank_state, tmp)
            final = self._publish(step, tmp)
        except (OSError, RuntimeError) as e:  # torch.save reports a failed write as a RuntimeError
            self._give_up(step, tmp, reason(e))
        return final

    def _write(self, engine, step: int, state: dict, rank_state: dict, tmp: Path) -> None:
        """Every rank writes its files into `tmp`; nothing is published yet."""
        self._prepare(tmp)
        engine.save_checkpoint(str(self.root), tag=tmp.name, save_latest=False)
        torch.save(rank_state, tmp / self._rank_file)
        if dist.is_main():
            write_atomically(tmp / STATE, json.dumps(state, indent=1))

    def save_in_background(self, engine, step: int, state: dict, rank_state: dict) -> None:
        """Collective: save's files copied into host memory, then written and hashed by this
        rank's background thread while training goes on; `settle` publishes them. The write
        in flight before this one must have been settled."""
        assert self.pending is None, "settle the write in flight first"
        tmp = self._tmp(step)
        files: list[tuple[Path, object]] = []
        self.copies.start()

        def keep(state_dict, path: str) -> None:
            files.append((Path(path), self.copies.copy(state_dict, Path(path).name)))

        try:
            self._prepare(tmp)
            with ds_internals.files_handed_over(engine, keep):
                engine.save_checkpoint(str(self.root), tag=tmp.name, save_latest=False)
        except (OSError, RuntimeError) as e:
            self._give_up(step, tmp, reason(e))
        keep(rank_state, str(tmp / self._rank_file))
        if dist.is_main():
            files.append((tmp / STATE, json.dumps(state, indent=1).encode()))
        self.writer.start(tmp, files, ready=self.copies.finish())
        self.pending = Pending(step, tmp, self.copies.nbytes)

    def writing(self) -> tuple[bool, bool]:
        """This rank's background write: (still running, failed); (False, False) with none."""
        if self.pending is None:
            return False, False
        return self.writer.busy, self.writer.failed

    def settle(self, timeout: float | None = None) -> dict | None:
        """Collective: wait for the background write in flight (at most `timeout` seconds on
        each rank), then publish it as save does: {"step", "path", "waited_s", "write_s",
        "bytes"}; None with no write in flight. A write that failed on any rank is removed
        and raises a RunError on every rank (`latest` unchanged); one still running after
        `timeout` is abandoned (its directory is never published): {"abandoned": step}."""
        if self.pending is None:
            return None
        pending, self.pending = self.pending, None
        t0 = time.perf_counter()
        done = self.writer.wait(timeout)
        told = dist.all_gather_object(
            (done, self.writer.entries, self.writer.error, self.writer.seconds, pending.nbytes)
        )
        waited = time.perf_counter() - t0
        failed = [(r, error) for r, (_, _, error, _, _) in enumerate(told) if error]
        if failed:
            rank, why = failed[0]
            self._give_up(pending.step, pending.tmp, f"rank {rank}, writing in the background: {why}")
        if not all(finished for finished, *_ in told):
            return {"abandoned": pending.step, "waited_s": waited}
        entries = {name: entry for _, files, *_ in told for name, entry in files.items()}
        try:
            final = self._publish(pending.step, pending.tmp, entries)
        except OSError as e:
            self._give_up(pending.step, pending.tmp, reason(e))
        return {
            "step": pending.step,
            "path": final,
            "waited_s": waited,
            "write_s": max(seconds for *_, seconds, _ in told),
            "bytes": sum(nbytes for *_, nbytes in told),
        }

    @property
    def _rank_file(self) -> str:
        return rank_file(dist.rank())

    def _tmp(self, step: int) -> Path:
        return self.root / f".tmp-{step_tag(step)}"

    def _prepare(self, tmp: Path) -> None:
        """Collective: the checkpoints directory exists, without stale .tmp-* directories."""
        if dist.is_main():
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob(".tmp-*"):
                shutil.rmtree(stale, ignore_errors=True)
        dist.barrier()

    def _give_up(self, step: int, tmp: Path, why: str) -> None:
        """A write that failed: its directory goes, `latest` stays, a RunError says so."""
        if dist.is_main():
            shutil.rmtree(tmp, ignore_errors=True)
        latest = self.latest()
        raise RunError(
            f"{tmp}: checkpoint of step {step} could not be written ({why}); removed it, "
            f"`latest` still names {latest.name if latest else 'no checkpoint'}"
        )

    def _publish(self, step: int, tmp: Path, entries: dict[str, dict] | None = None) -> Path:
        """Collective: the manifest, the rename to step-N, `latest`, pruning. `entries`: the
        files' hashes as their background writers took them (rank 0 hashes any other file it
        finds there, one DeepSpeed would have written past the hand-over); else the ranks
        hash the files between them now.
        Every file any rank sees is listed, and hashed by a rank that saw it: on a network
        filesystem a rank's listing can lag the files other ranks wrote (attribute caching),
        never its own."""
        dist.barrier()
        if entries is None:
            seen_by = dist.all_gather_object(_listing(tmp))
            entries = {}
            for part in dist.all_gather_object(_hash_share(tmp, seen_by, dist.rank())):
                entries.update(part)
        elif dist.is_main():
            entries.update(_hash_share(tmp, [[f for f in _listing(tmp) if f not in entries]], 0))
        final = self.root / step_tag(step)
        if dist.is_main():
            manifest = {"format": FORMAT, "step": step, "files": dict(sorted(entries.items()))}
            write_atomically(tmp / MANIFEST, json.dumps(manifest, indent=1))
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            self._point_latest(final)
        dist.barrier()
        return final

    def check_shared(self) -> None:
        """Collective, at start: every rank sees the files rank 0 writes in the run directory
        (each rank writes its checkpoint files there and rank 0 publishes them). A directory
        that is not shared (a node-local path) is refused in one line, before any checkpoint
        is written or looked for: otherwise every checkpoint would fail its verification and
        `--resume auto` would start again from step 0."""
        if dist.world_size() == 1:
            return
        probe = self.run_dir / dist.all_gather_object(f".shared-{uuid.uuid4().hex}")[0]  # rank 0's name
        if dist.is_main():
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_atomically(probe, "")
        dist.barrier()
        sees = dist.all_gather_object((socket.gethostname(), probe.is_file()))
        dist.barrier()
        if dist.is_main():
            probe.unlink()
        blind = [(r, host) for r, (host, seen) in enumerate(sees) if not seen]
        if blind:
            rank, host = blind[0]
            raise UserError(
                f"run.dir={self.run_dir}: rank {rank} (on {host}) does not see the files rank 0 writes "
                f"there{f' (nor do {len(blind) - 1} other ranks)' if len(blind) > 1 else ''}; every rank "
                "writes checkpoints into it: put it on a filesystem all nodes share"
            )

    def _point_latest(self, final: Path) -> None:
        """Rank 0: `latest` names the new checkpoint (atomically), then old ones are pruned."""
        write_atomically(self.latest_file, f"checkpoints/{final.name}\n")
        self._prune()

    def discard_after(self, step: int) -> None:
        """Collective: delete checkpoints newer than `step` (a rollback abandoned their timeline)."""
        if dist.is_main():
            for path in self.complete_checkpoints():
                if checkpoint_step(path) > step:
                    shutil.rmtree(path, ignore_errors=True)
        dist.barrier()

    def _prune(self) -> None:
        complete = self.complete_checkpoints()
        for old in complete[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)

    # --- reading ----------------------------------------------------------------------

    def complete_checkpoints(self) -> list[Path]:
        """Published checkpoint directories, oldest first."""
        if not self.root.is_dir():
            return []
        found = [
            (int(m.group(1)), p) for p in self.root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()
        ]
        return [p for _, p in sorted(found)]

    def latest(self) -> Path | None:
        if not self.latest_file.is_file():
            return None
        return self.run_dir / self.latest_file.read_text().strip()

    @staticmethod
    def verify(path: Path, share: tuple[int, int] = (0, 1)) -> str | None:
        """None if the checkpoint is complete and intact, else what is wrong (naming the file).
        `share` (i, n): hash only every n-th of the hashed units (a file, or a part of one
        that several ranks wrote: layout_free) from the i-th (see verify_collectively)."""
        manifest_path = path / MANIFEST
        if not manifest_path.is_file():
            return f"{manifest_path}: missing (the checkpoint was not finished)"
        try:
            manifest = json.loads(manifest_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            return f"{manifest_path}: damaged"
        units = []  # (file, start, length, sha256)
        for name, entry in manifest["files"].items():
            f = path / name
            if not f.is_file():
                return f"{f}: missing"
            if f.stat().st_size != entry["bytes"]:
                return f"{f}: {f.stat().st_size} bytes, expected {entry['bytes']} (truncated or altered)"
            start = 0
            for part in entry.get("parts", [entry]):
                units.append((f, start, part["bytes"], part["sha256"]))
                start += part["bytes"]
        for f, start, length, sha in units[share[0] :: share[1]]:
            if file_sha256(f, start, length) != sha:
                return f"{f}: sha256 does not match the manifest (altered)"
        return None

    @classmethod
    def verify_collectively(cls, path: Path) -> str | None:
        """Collective: every rank hashes its share of the files, as they were hashed when
        written, so no one rank reads the whole checkpoint; the same answer on every rank."""
        problems = dist.all_gather_object(cls.verify(path, (dist.rank(), dist.world_size())))
        return next((p for p in problems if p), None)

    def find(self, resume: str) -> tuple[Path | None, list[str]]:
        """Collective: the checkpoint to resume from, and warnings about damaged ones that
        were passed over. resume: "none", "auto" (the newest intact one, starting at
        `latest`) or a path. Every rank sees the run directory (a shared filesystem)."""
        if resume == "none":
            return None, []
        if resume != "auto":
            path = Path(resume)
            if not path.is_dir():
                raise UserError(f"{path}: no such checkpoint directory")
            problem = self.verify_collectively(path)
            if problem:
                raise UserError(f"{path}: cannot resume from this checkpoint: {problem}")
            return path, []
        candidates = list(reversed(self.complete_checkpoints()))
        latest = self.latest()
        if latest is not None and latest in candidates:  # `latest` first, then older ones
            candidates.remove(latest)
            candidates.insert(0, latest)
        warnings = []
        for path in candidates:
            problem = self.verify_collectively(path)
            if problem is None:
                return path, warnings
            warnings.append(f"warning: skipping damaged checkpoint {path.name}: {problem}")
        return None, warnings

    def newest_before(self, step: int) -> Path | None:
        """Collective: the newest intact checkpoint of a step before `step`."""
        for path in reversed(self.complete_checkpoints()):
            if checkpoint_step(path) < step and self.verify_collectively(path) is None:
                return path
        return None

    @staticmethod
    def read_state(path: Path) -> dict:
        """megatrain.json: the shared state, model shape, layout and config (read before
        loading, to check compatibility), as the current code reads it (upgrade)."""
        return upgrade(json.loads((path / STATE).read_text()))

    def load(self, engine, path: Path) -> dict:
        """Collective: load DeepSpeed's state; returns this rank's own saved state."""
        load_path, _ = engine.load_checkpoint(str(path.parent), tag=path.name, load_lr_scheduler_states=False)
        if load_path is None:
            raise UserError(f"{path}: DeepSpeed could not load this checkpoint")
        return self.rank_state(path, dist.rank())

    @staticmethod
    def rank_state(path: Path, rank: int) -> dict:
        """What rank `rank` saved of its own in checkpoint `path` (its tensors mapped, not read)."""
        return torch.load(path / rank_file(rank), map_location="cpu", weights_only=False, mmap=True)
