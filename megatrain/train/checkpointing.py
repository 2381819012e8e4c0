"""A run's checkpoints as the trainer uses them (the files themselves: checkpoint.py): save;
load, by DeepSpeed's own load on the same layout or resharded on another, keeping the global
batch and checking the model's shape; resume (`--resume`), or start a fresh run from trained
weights (model.init_from). `batch_schedule` is the global batch as the run started it."""

from __future__ import annotations

import math
import time
from pathlib import Path

from megatrain.errors import UserError
from megatrain.layout import Layout
from megatrain.model import GPTConfig
from megatrain.schedule import BatchSchedule
from megatrain.train import distributed as dist
from megatrain.train import init_from, layout_free
from megatrain.train.state import RNG


class Checkpoints:
    def __init__(
        self, cfg, layout, module, state, progress, log, files, model_cfg, tokenizer_sha256, batch_schedule
    ):
        """The Layout, the train module, the run's state registry (state.ResumableState) and
        Progress, its RunLog, its Checkpointer (the files), the GPTConfig, the data's tokenizer
        hash, and the BatchSchedule the run starts with (a checkpoint of another layout
        replaces it with the one it keeps)."""
        self.cfg, self.layout, self.module = cfg, layout, module
        self.state, self.progress, self.log, self.files = state, progress, log, files
        self.model_cfg, self.tokenizer_sha256, self.batch_schedule = (
            model_cfg,
            tokenizer_sha256,
            batch_schedule,
        )
        self.saved_step: int | None = None  # the step of the newest checkpoint this process wrote or loaded
        self.background = False  # checkpoint.async_save, and its host copies fit (plan_background)
        self.host_reserved = 0  # host bytes per rank the background copies take
        self._stall: dict | None = None  # the step loop's wait for the write in flight, so far

    def save(self, background: bool = False) -> Path | None:
        """Collective: DeepSpeed's state and every registered state, as step-N: written now
        (returns its path), or with `background` (and checkpoint.async_save fitting the host
        memory) copied now and written while training goes on (`settle` publishes it). A
        write still in flight is settled first, its wait logged."""
        t0 = time.perf_counter()
        self.settle()
        state = self.state.state_dict()
        # With this rank's optimizer parameters by name: another layout can read its ZeRO-0 state.
        rank_state = {
            **state["rank"],
            "optimizer_params": {"mp_rank": self.layout.mp_rank, "groups": self.module.optimizer_params},
        }
        if self.module.experts is not None:  # this rank's slice of its experts (train/expert_shards.py)
            rank_state["experts"] = self.module.experts.state_dict()
        meta = {
            "step": self.progress.step,
            "model_shape": self.model_cfg.shape(),
            "layout": self.layout.checkpoint_form(),
            "tokenizer_sha256": self.tokenizer_sha256,
            "batch_unit_tokens": self.batch_schedule.unit_tokens,
            "precision": self.cfg.train.precision,
            "config": self.cfg.to_dict(),
            "loss_scale": self.module.loss_scale_state(),
            "optimizer_flavour": self.module.flavour,
            "state": state["shared"],
        }
        self.saved_step = self.progress.step
        where = {"step": self.progress.step, "tokens": self.progress.tokens}
        if background and self.background:
            self.files.save_in_background(self.module.engine, self.progress.step, meta, rank_state)
            self._stall = {**where, "stall_s": time.perf_counter() - t0}
            return None
        path = self.files.save(self.module.engine, self.progress.step, meta, rank_state)
        stall = time.perf_counter() - t0
        self.log.event("checkpoint", path=str(path), stall_s=stall, **where)
        self.log.log({"kind": "checkpoint", **where, "stall_s": stall})
        self.log.print(f"checkpoint {path.name}: the loop waited {stall:.2f} s (written synchronously)")
        return path

    def settle(self, timeout: float | None = None) -> None:
        """Collective: publish the background write in flight, waiting for it if it is not
        done (at most `timeout` seconds: then it is abandoned, `latest` unchanged); a write
        that failed on any rank raises a RunError on every rank."""
        if self.files.pending is None:
            return
        if any(self.files.writing()):
            self.log.print(f"waiting for the checkpoint of step {self.files.pending.step} being written")
        done = self.files.settle(timeout)
        started, self._stall = self._stall, None
        if "abandoned" in done:
            message = (
                f"the checkpoint of step {done['abandoned']} was still being written after "
                f"{done['waited_s']:.0f} s: abandoned, `latest` names {self.files.latest()}"
            )
            self.log.print(message)
            self.log.event("checkpoint_abandoned", step=done["abandoned"], waited_s=done["waited_s"])
            self.saved_step = None  # the end writes its own
            return
        stall = started["stall_s"] + done["waited_s"]
        figures = {
            "stall_s": stall,
            "write_s": done["write_s"],
            "bytes": done["bytes"],
            "published_at_step": self.progress.step,  # training went on until then
        }
        self.log.event("checkpoint", path=str(done["path"]), background=True, **{**started, **figures})
        self.log.log({"kind": "checkpoint", **started, **figures})
        self.log.print(
            f"checkpoint {done['path'].name}: the loop waited {stall:.2f} s, written in the background "
            f"in {done['write_s']:.1f} s ({done['bytes'] / 2**20:,.0f} MiB of host copies)"
        )

    def plan_background(self, budget: int) -> None:
        """Whether checkpoint.async_save's host copies (about one rollback point's bytes per
        rank) fit `budget` bytes, said at start; they are reserved first (`host_reserved`),
        the rollback points get the rest."""
        if not self.cfg.checkpoint.async_save:
            return
        need = self.module.snapshot_bytes()
        self.background = need <= budget
        gib = f"{need / 2**30:,.2f} GiB per rank of the {budget / 2**30:,.1f} GiB host-memory budget"
        if self.background:
            self.host_reserved = need
            self.log.print(
                f"checkpoint: written in the background (checkpoint.async_save), host copies {gib}"
            )
        else:
            self.log.print(
                f"checkpoint: async_save's host copies need {gib} (spike.snapshot_memory_gb): "
                "written synchronously"
            )

    def load(self, path: Path) -> None:
        """Collective: DeepSpeed's state and every registered state from `path`, written by
        this layout and optimizer flavour (DeepSpeed loads its own files) or any other
        (resharded through the layout-free form: ZeRO-1 in bf16 summed its gradients in bf16
        before, through another of DeepSpeed's optimizers, whose files the new one cannot load)."""
        self.settle()
        saved = self.files.read_state(path)
        self._check_shape(path, saved)
        self._keep_global_batch(path, saved)
        if (saved["layout"], saved["optimizer_flavour"]) == (
            self.layout.checkpoint_form(),
            self.module.flavour,
        ):
            rank_state = self.files.load(self.module.engine, path)
            if self.module.experts is not None:
                self.module.experts.load_state_dict(rank_state["experts"])
        else:
            rank_state = self._reshard(path, saved)
        self.state.load_state_dict({"shared": saved["state"], "rank": rank_state})
        self.saved_step = self.progress.step

    def _reshard(self, path: Path, saved: dict) -> dict:
        """Load a checkpoint of another layout: the masters, moments and step count through the
        layout-free form (converted now by all ranks unless done ahead of time), and fp16's loss
        scale; the per-rank state (RNG) does not map between layouts and is seeded afresh from
        the step."""
        source, converted = layout_free.ensure(path)
        layout_free.load_into(self.module, source)
        step = saved["state"]["progress"]["step"]
        self.module.set_engine_counters(step, saved["state"]["progress"]["tokens"] // self.cfg.train.seq_len)
        RNG.seed(self.cfg.run.seed + step, self.layout.rng_index)
        carried = self.module.load_loss_scale_state(saved.get("loss_scale"))
        old, new = Layout.from_checkpoint(saved["layout"]).describe(), self.layout.describe()
        if old == new:
            old, new = f"{old} ({saved['optimizer_flavour']})", f"{new} ({self.module.flavour})"
        if old == new:  # a tensor-parallel checkpoint from before the vocabulary was split
            old += " with whole vocabulary tables"
        how = "converted to the layout-free form now" if converted else "from its layout-free form"
        self.log.print(f"resharded {path.name} from {old} to {new} ({how})")
        self.log.event(
            "reshard",
            checkpoint=str(path),
            source_layout=saved["layout"],
            layout=self.layout.checkpoint_form(),
            converted=converted,
            loss_scale=carried,
        )
        return {}

    def _keep_global_batch(self, path: Path, saved: dict) -> None:
        """The batch schedule rounds as on the layout the run started on; a layout that cannot
        split those batches into whole micro-batches per rank is refused in one line."""
        t, dp = self.cfg.train, self.layout.data_parallel
        schedule = BatchSchedule.from_config(self.cfg, dp, saved["batch_unit_tokens"])
        sizes = schedule.sizes_from(saved["state"]["progress"]["tokens"])
        common = math.gcd(*sizes)
        if common % schedule.split:
            per_dp = common // (t.micro_batch * t.seq_len) if common % (t.micro_batch * t.seq_len) == 0 else 0
            fits = [d for d in range(1, per_dp + 1) if per_dp % d == 0]
            raise UserError(
                f"{path}: the run's global batch ({', '.join(f'{s:,}' for s in sizes[:4])}"
                f"{', ...' if len(sizes) > 4 else ''} tokens) cannot be split on this layout: micro_batch "
                f"x seq_len x data-parallel ranks = {t.micro_batch} x {t.seq_len} x {dp} "
                f"= {schedule.split:,} tokens does not divide {common:,}; batch sizes this layout forms "
                f"are multiples of {schedule.split:,} tokens; data-parallel sizes that can with "
                f"micro_batch={t.micro_batch}: {', '.join(map(str, fits)) or 'none'}"
            )
        self.batch_schedule = schedule

    def _check_shape(self, path: Path, saved: dict) -> None:
        shape = self.model_cfg.shape()
        theirs = GPTConfig.from_shape(saved["model_shape"]).shape()  # older checkpoints lack newer keys
        if theirs != shape:
            diff = {k: (theirs[k], v) for k, v in shape.items() if theirs[k] != v}
            raise UserError(
                f"{path}: the checkpoint is for another model shape "
                + ", ".join(f"{k}: {a} in the checkpoint, {b} now" for k, (a, b) in diff.items())
            )

    def resume(self, resume: str, source: init_from.Source | None) -> None:
        """Collective: `--resume` (auto, none or a path): the checkpoint found, loaded; else
        run.branch_from's; or a fresh start, from `source`'s weights when model.init_from
        names one."""
        path, warnings = self.files.find(resume)
        for w in warnings:
            self.log.print(w)
            self.log.event("checkpoint_skipped", reason=w)
        branch = path is None and resume in ("auto", "none") and self.cfg.run.branch_from
        if branch:  # a cooldown branch's first start: from the trunk's checkpoint
            path = self.files.find(branch)[0]
            self.log.truncate_after(0)  # rows of an earlier run in this directory go
        if path is None:
            if resume not in ("auto", "none"):
                raise UserError(f"{resume}: no usable checkpoint")
            self.log.truncate_after(0)  # a fresh start: rows of an earlier run in this directory go
            if source is not None:
                self._start_from(source)
            return
        self.load(path)
        self.log.truncate_after(self.progress.step)
        where = dict(checkpoint=str(path), step=self.progress.step, tokens=self.progress.tokens)
        self.log.event("branch" if branch else "resume", **where)
        how = "branched" if branch else "resumed"
        self.log.print(f"{how} from {path} at step {self.progress.step} ({self.progress.tokens} tokens)")

    def _start_from(self, source: init_from.Source) -> None:
        """Collective: a fresh run's weights from model.init_from, and by config the source's
        optimizer state (optim.init_from_state) and schedule position (schedule.init_from).
        Every rank writes its share of them in the layout-free form, loads its part, the file goes."""
        cfg, progress = self.cfg, self.progress
        path = self.files.run_dir / ".init-from.safetensors"
        init_from.write_start(source, self.model_cfg, path, moments=cfg.optim.init_from_state)
        optimizer_step = layout_free.load_into(self.module, path)
        dist.barrier()
        if dist.is_main():
            path.unlink()
        if cfg.schedule.init_from == "keep":
            progress.step, progress.tokens = source.progress["step"], source.progress["tokens"]
            self.module.set_engine_counters(progress.step, progress.tokens // cfg.train.seq_len)
        taken = "weights" + (
            f", optimizer state (step {optimizer_step})" if cfg.optim.init_from_state else ""
        )
        self.log.print(
            f"started from the {source.describe()}: {taken}; schedule position "
            + (
                f"kept (step {progress.step}, {progress.tokens:,} tokens)"
                if cfg.schedule.init_from == "keep"
                else "reset (warmup from 0 tokens)"
            )
        )
        self.log.event(
            "init_from",
            source=str(source.path),
            kind=source.kind,
            optimizer_step=optimizer_step,
            step=progress.step,
            tokens=progress.tokens,
        )
