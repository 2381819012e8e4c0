"""The training loop: build, then `for step: batch -> step -> callbacks`.

    Trainer(load_config("configs/tiny-cpu.yaml"), resume="auto").fit()

Before each optimizer step the learning rate and the global batch are set from the
tokens consumed so far (megatrain/schedule: GPT-3's warmup, cosine decay and batch
ramp); the batch becomes DeepSpeed's gradient accumulation. The train module
(train_module.py) runs the step; callbacks (callbacks.py, spike_recovery.py) do
everything optional around it. Everything a resume or a rollback needs is registered
once in `self.state` (state.py) and restored exactly; the schedules follow from the tokens.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

from megatrain.config import Config
from megatrain.config.deepspeed import fp32_accumulation
from megatrain.errors import UserError
from megatrain.layout import Layout
from megatrain.model import GPTConfig, flops_per_token, param_count, recompute_flops_per_token
from megatrain.plan import human, plan, search
from megatrain.schedule import BatchSchedule, LRSchedule
from megatrain.train import distributed as dist
from megatrain.train import init_from, layout_free
from megatrain.train.batches import TrainBatches, build_datasets
from megatrain.train.callbacks import Callback, CheckpointEvery, Evaluate, Heartbeat, LogMetrics, Preemption
from megatrain.train.checkpoint import Checkpointer
from megatrain.train.metrics import RunLog
from megatrain.train.mfu import CPU_PROBE, device_memory, peak_flops
from megatrain.train.spike_recovery import SpikeRecovery
from megatrain.train.state import RNG, Progress, ResumableState
from megatrain.train.train_module import TrainModule, init_layout


class Trainer:
    def __init__(self, cfg: Config, resume: str = "auto", callbacks: list[Callback] = ()):
        """`callbacks` run after the built-in ones (tests add fault injection this way)."""
        self.cfg = cfg
        t = cfg.train
        self.layout = init_layout(cfg)
        train_data, valid_sets, data_vocab = build_datasets(cfg)
        # Continued pretraining: the model's shape (and its weights, at a fresh start) from model.init_from.
        self.source = init_from.open_source(cfg.model.init_from) if cfg.model.init_from else None
        if self.source is not None:
            self.model_cfg = init_from.model_config(cfg, self.source, data_vocab, train_data.tokenizer_sha256)
        else:
            self.model_cfg = GPTConfig.from_config(cfg, cfg.model.vocab_size or data_vocab)
        if self.model_cfg.vocab_size < data_vocab:
            raise UserError(f"model.vocab_size={self.model_cfg.vocab_size} is smaller than the tokenizer's {data_vocab}")
        self.tokenizer_sha256 = train_data.tokenizer_sha256
        self.run_dir = Path(cfg.run.dir)
        self.checkpointer = Checkpointer(self.run_dir, cfg.checkpoint.keep)
        self.checkpointer.check_shared()  # before anything is written there
        self.log = RunLog(cfg, enabled=dist.is_main())
        self._check_plan()
        self.progress = Progress()
        self.lr_schedule = LRSchedule.from_config(cfg)
        self.batch_schedule = BatchSchedule.from_config(cfg, self.layout.data_parallel)
        self.module = TrainModule(cfg, self.model_cfg, self.batch_schedule.micro_batches(0), self.layout)
        self.batches = TrainBatches(cfg, train_data, self.layout.dp_rank, self.layout.data_parallel, self.module.device)
        self.recovery = SpikeRecovery(cfg.spike, t.seq_len, in_memory=not self.layout.partitioned_parameters)
        self.metrics = LogMetrics(t.log_every)
        self.evaluation = Evaluate(valid_sets, t.eval_every, t.eval_samples)
        self.preemption = Preemption()
        self.callbacks = [self.recovery, self.metrics, self.evaluation, CheckpointEvery(cfg.checkpoint.every_steps),
                          self.preemption, *callbacks, Heartbeat(self.run_dir / "heartbeat", dist.is_main())]
        self.state = ResumableState()
        self.state.register("progress", self.progress)
        self.state.register("data", self.batches)
        self.state.register("rng", RNG(), per_rank=True)
        for cb in self.callbacks:
            if cb.stateful:
                self.state.register(cb.name, cb)
        self.outcome: str | None = None  # set by a callback to end the run: "stopped", "gave_up"
        self.saved_step: int | None = None  # the step of the newest checkpoint this process wrote or loaded
        RNG.seed(cfg.run.seed, self.layout.rng_index)
        self._resume(resume)
        self.flops_per_token = flops_per_token(self.model_cfg)
        # With activation checkpointing the hardware also recomputes the blocks' forward pass.
        recomputes = cfg.model.activation_checkpointing or cfg.parallel.activation_checkpoint_interval > 0
        self.hardware_flops_per_token = self.flops_per_token + recomputes * recompute_flops_per_token(self.model_cfg)
        self.peak_flops, self.peak_source = peak_flops(cfg, self.module.device)
        params, lay = param_count(self.model_cfg), self.layout
        self.log.event("start", step=self.progress.step, world_size=lay.world, params=params,
                       peak_flops=self.peak_flops, peak_flops_source=self.peak_source)
        ranks = (f"{lay.world} ranks: {lay.pipeline_stages} pipeline x {lay.tensor_parallel} tensor x "
                 f"{lay.data_parallel} data parallel" if lay.world > lay.data_parallel else f"{lay.world} rank(s)")
        self.log.print(f"model: {params / 1e6:.2f}M parameters, {self.flops_per_token / 1e6:.1f} MFLOP/token; "
                       f"{ranks}, ZeRO-{lay.zero_stage}, {self._precision_text()}; "
                       f"global batch {self.batch_tokens} tokens ({self.module.grad_accum} x {t.micro_batch} x "
                       f"{t.seq_len} x {lay.data_parallel}); "
                       + (f"MFU peak {self.peak_flops / 1e9:.1f} GFLOP/s per rank ({self.peak_source})"
                          if self.peak_flops else f"no MFU: {self.peak_source}"))
        for note in self.batch_schedule.rounding_notes():  # the schedule departs from the config: say so
            self.log.print(f"schedule: {note}")
            self.log.event("batch_rounded", note=note)

    def _precision_text(self) -> str:
        """The precision, what bf16 gradients are summed in, and on a GPU what fp32 matmuls
        run in (TF32 or not is a 7x peak)."""
        t = self.cfg.train
        if t.precision == "bf16":
            if fp32_accumulation(t, self.layout.zero_stage):
                return "bf16 (gradients summed and reduced in fp32)"
            return "bf16 (gradients summed and reduced in bf16" + (
                ": DeepSpeed has no fp32 path without ZeRO; ZeRO-1 or 2 has)" if t.grad_accum_dtype == "fp32" else ")")
        if self.module.device.type != "cuda" or t.precision not in ("fp32", "bf16-autocast"):
            return t.precision
        return t.precision + (" (fp32 matmuls in TF32)" if t.tf32 else " (fp32 matmuls in full fp32; train.tf32=true "
                                                                         "runs them in TF32)")

    def _check_plan(self) -> None:
        """The planner's memory prediction for this layout, printed before anything is
        allocated; a layout it predicts cannot fit is refused (plan.check), naming the
        fastest layout of these ranks that fits."""
        memory, where = device_memory()
        on_gpu = where.startswith("GPU")
        mine = plan(self.cfg, self.model_cfg, self.layout, memory, peak_flops=1.0, on_gpu=on_gpu)  # memory only
        parts = mine["per_rank_bytes"]
        breakdown = ", ".join(f"{k} {human(v)}" for k, v in parts.items() if k != "total")
        self.log.print(f"plan: {human(parts['total'])} per rank predicted ({breakdown}) of {human(memory)} ({where})")
        if mine["fits"] or not self.cfg.plan.check:
            return
        fitting = search(self.cfg, self.model_cfg, dist.world_size(), dist.local_world_size(), memory, 1.0,
                         on_gpu=on_gpu)
        largest = max((k for k in parts if k not in ("total", "allowance")), key=parts.get)
        raise UserError(f"plan: this layout needs {human(parts['total'])} per rank ({largest} "
                        f"{human(parts[largest])}), {where} has {human(memory)}: over by "
                        f"{human(parts['total'] - memory)}; "
                        + (f"the fastest layout of {dist.world_size()} rank(s) that fits: {fitting[0]['sets']}"
                           if fitting else f"no layout of {dist.world_size()} rank(s) fits")
                        + "; --set plan.check=false starts anyway")

    @property
    def batch_tokens(self) -> int:
        t = self.cfg.train
        return self.module.grad_accum * t.micro_batch * t.seq_len * self.layout.data_parallel

    # --- checkpoints and rollback points ------------------------------------------------

    def _checkpoint_meta(self) -> dict:
        return {"step": self.progress.step, "model_shape": self.model_cfg.shape(), "layout": self.layout.checkpoint_form(),
                "tokenizer_sha256": self.tokenizer_sha256,
                "batch_unit_tokens": self.batch_schedule.unit_tokens,
                "precision": self.cfg.train.precision, "config": self.cfg.to_dict(),
                "loss_scale": self.module.loss_scale_state()}

    def save_checkpoint(self) -> Path:
        """Collective: DeepSpeed's state and every registered state, as step-N."""
        state = self.state.state_dict()
        # With this rank's optimizer parameters by name: another layout can read its ZeRO-0 state.
        rank_state = {**state["rank"], "optimizer_params": {"mp_rank": self.layout.mp_rank,
                                                            "groups": self.module.optimizer_params}}
        path = self.checkpointer.save(self.module.engine, self.progress.step,
                                      {**self._checkpoint_meta(), "state": state["shared"]}, rank_state)
        self.log.event("checkpoint", step=self.progress.step, path=str(path))
        self.saved_step = self.progress.step
        return path

    def load_checkpoint(self, path: Path) -> None:
        """Collective: DeepSpeed's state and every registered state from `path`, written by
        this layout (DeepSpeed loads its own files) or any other (resharded through the
        layout-free form)."""
        saved = self.checkpointer.read_state(path)
        saved["layout"] = {"tensor_parallel": 1, **saved["layout"]}  # (written before tensor parallelism)
        self._check_shape(path, saved)
        self._keep_global_batch(path, saved)
        if saved["layout"] == self.layout.checkpoint_form():
            rank_state = self.checkpointer.load(self.module.engine, path)
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
        how = "converted to the layout-free form now" if converted else "from its layout-free form"
        self.log.print(f"resharded {path.name} from {old} to {new} ({how})")
        self.log.event("reshard", checkpoint=str(path), source_layout=saved["layout"], layout=self.layout.checkpoint_form(),
                       converted=converted, loss_scale=carried)
        return {}

    def _keep_global_batch(self, path: Path, saved: dict) -> None:
        """The batch schedule rounds as on the layout the run started on; a layout that cannot
        split those batches into whole micro-batches per rank is refused in one line."""
        t = self.cfg.train
        old = saved["config"]["train"]
        unit = saved.get("batch_unit_tokens") or old["micro_batch"] * old["seq_len"] * saved["layout"]["dp_size"]
        schedule = BatchSchedule.from_config(self.cfg, self.layout.data_parallel, unit)
        sizes = schedule.sizes_from(saved["state"]["progress"]["tokens"])
        common = math.gcd(*sizes)
        if common % schedule.split:
            per_dp = common // (t.micro_batch * t.seq_len) if common % (t.micro_batch * t.seq_len) == 0 else 0
            fits = [d for d in range(1, per_dp + 1) if per_dp % d == 0]
            raise UserError(f"{path}: the run's global batch ({', '.join(f'{s:,}' for s in sizes[:4])}"
                            f"{', ...' if len(sizes) > 4 else ''} tokens) cannot be split on this layout: micro_batch "
                            f"x seq_len x data-parallel ranks = {t.micro_batch} x {t.seq_len} x {self.layout.data_parallel} "
                            f"= {schedule.split:,} tokens does not divide {common:,}; batch sizes this layout forms "
                            f"are multiples of {schedule.split:,} tokens; data-parallel sizes that can with "
                            f"micro_batch={t.micro_batch}: {', '.join(map(str, fits)) or 'none'}")
        self.batch_schedule = schedule

    def snapshot(self, reuse: dict | None = None) -> dict:
        """An in-memory rollback point: the engine's tensors and every registered state
        (`reuse`: an older point whose host buffers to overwrite)."""
        return {"step": self.progress.step, "engine": self.module.capture(reuse and reuse["engine"]),
                "state": self.state.state_dict()}

    def restore(self, point: dict) -> None:
        self.module.restore(point["engine"])
        self.state.load_state_dict(point["state"])

    def _check_shape(self, path: Path, saved: dict) -> None:
        shape = self.model_cfg.shape()
        theirs = GPTConfig.from_shape(saved["model_shape"]).shape()  # older checkpoints lack newer keys
        if theirs != shape:
            diff = {k: (theirs[k], v) for k, v in shape.items() if theirs[k] != v}
            raise UserError(f"{path}: the checkpoint is for another model shape "
                            + ", ".join(f"{k}: {a} in the checkpoint, {b} now" for k, (a, b) in diff.items()))

    def _resume(self, resume: str) -> None:
        path, warnings = self.checkpointer.find(resume)
        for w in warnings:
            self.log.print(w)
            self.log.event("checkpoint_skipped", reason=w)
        if path is None:
            if resume not in ("auto", "none"):
                raise UserError(f"{resume}: no usable checkpoint")
            self.log.truncate_after(0)  # a fresh start: rows of an earlier run in this directory go
            if self.source is not None:
                self._start_from(self.source)
            return
        self.load_checkpoint(path)
        self.log.truncate_after(self.progress.step)
        self.log.event("resume", checkpoint=str(path), step=self.progress.step, tokens=self.progress.tokens)
        self.log.print(f"resumed from {path} at step {self.progress.step} ({self.progress.tokens} tokens)")

    def _start_from(self, source: init_from.Source) -> None:
        """Collective: a fresh run's weights from model.init_from, and by config the source's
        optimizer state (optim.init_from_state) and schedule position (schedule.init_from).
        Every rank writes its share of them in the layout-free form, loads its part, the file goes."""
        cfg = self.cfg
        path = self.run_dir / ".init-from.safetensors"
        init_from.write_start(source, self.model_cfg, path, moments=cfg.optim.init_from_state)
        optimizer_step = layout_free.load_into(self.module, path)
        dist.barrier()
        if dist.is_main():
            path.unlink()
        if cfg.schedule.init_from == "keep":
            self.progress.step, self.progress.tokens = source.progress["step"], source.progress["tokens"]
            self.module.set_engine_counters(self.progress.step, self.progress.tokens // cfg.train.seq_len)
        taken = "weights" + (f", optimizer state (step {optimizer_step})" if cfg.optim.init_from_state else "")
        self.log.print(f"started from the {source.describe()}: {taken}; schedule position "
                       + (f"kept (step {self.progress.step}, {self.progress.tokens:,} tokens)"
                          if cfg.schedule.init_from == "keep" else "reset (warmup from 0 tokens)"))
        self.log.event("init_from", source=str(source.path), kind=source.kind, optimizer_step=optimizer_step,
                       step=self.progress.step, tokens=self.progress.tokens)

    # --- the loop ----------------------------------------------------------------------

    def _done(self) -> bool:
        t = self.cfg.train
        return (t.max_steps is not None and self.progress.step >= t.max_steps) or (
            t.max_tokens is not None and self.progress.tokens >= t.max_tokens)

    def train_step(self) -> dict:
        """One optimizer step over the global batch, with the schedules set from the tokens
        consumed so far (between steps, so a new batch size starts at an accumulation
        boundary); returns its metrics row."""
        t0 = time.perf_counter()
        self.batches.at_step_boundary()
        lr = self.lr_schedule(self.progress.tokens)
        self.module.set_lr(lr)
        self.module.set_micro_batches(self.batch_schedule.micro_batches(self.progress.tokens), self.cfg.train.micro_batch)
        loss, grad_norm = self.module.step(self.batches.next)
        self.progress.step += 1
        self.progress.tokens += self.batch_tokens
        dt = time.perf_counter() - t0
        tokens_per_s = self.batch_tokens / dt
        row = {"kind": "train", "step": self.progress.step, "tokens": self.progress.tokens, "loss": loss, "lr": lr,
               "batch_tokens": self.batch_tokens, "grad_accum": self.module.grad_accum, "grad_norm": grad_norm,
               "tokens_per_s": tokens_per_s, "step_time": dt, **self.module.step_stats(), **self.batches.metrics()}
        if self.peak_flops:  # model FLOPs (6N + attention); hardware FLOPs add recomputation
            peak = self.peak_flops * self.layout.world
            row.update(mfu=self.flops_per_token * tokens_per_s / peak, mfu_peak=self.peak_source)
            if self.hardware_flops_per_token != self.flops_per_token:
                row["hfu"] = self.hardware_flops_per_token * tokens_per_s / peak
        return row

    def fit(self) -> dict:
        """Train to max_steps/max_tokens. Returns a summary whose "outcome" is "done",
        "stopped" (SIGTERM/SIGINT: checkpoint written) or "gave_up" (more loss spikes than
        spike.max_rollbacks: rolled back once more and checkpointed)."""
        t0, start_tokens = time.perf_counter(), self.progress.tokens
        for cb in self.callbacks:
            cb.on_start(self)
        while self.outcome is None and not self._done():
            row = self.train_step()
            flags = dist.any_rank([cb.flag(self, row) for cb in self.callbacks])  # one collective: all ranks agree
            for cb, flagged in zip(self.callbacks, flags, strict=True):
                if cb.on_step(self, row, flagged):
                    break  # the step was undone
        self.outcome = self.outcome or "done"
        for cb in self.callbacks:
            cb.on_end(self)
        checkpoint = self.save_checkpoint() if self.saved_step != self.progress.step else self.checkpointer.latest()
        return self._finish(time.perf_counter() - t0, self.progress.tokens - start_tokens, checkpoint)

    def _finish(self, elapsed: float, tokens: int, checkpoint: Path) -> dict:
        first, last, val = self.metrics.first, self.metrics.last, self.evaluation.last
        step, cfg = self.progress.step, self.cfg
        summary = {"outcome": self.outcome, "steps": step, "tokens": self.progress.tokens, "seconds": elapsed,
                   "first_loss": first and first["loss"], "final_loss": last and last["loss"],
                   "val_loss": val and val["val_loss"], "rollbacks": self.recovery.rollbacks,
                   "tokens_per_s": tokens / elapsed}
        self.log.event("end", **{k: v for k, v in summary.items() if v is not None})
        if self.outcome == "stopped":
            self.log.print(f"stopped by {self.preemption.signal_name or 'a request on another rank'} after step {step}; "
                           f"checkpoint {checkpoint}; continue with --resume auto")
        elif self.outcome == "gave_up":
            self.log.print(f"stopping: the loss spiked again after {cfg.spike.max_rollbacks} rollbacks "
                           f"(spike.max_rollbacks); rolled back to step {step}, checkpoint {checkpoint}. "
                           "Look at events.jsonl; lower the learning rate or raise spike.skip before resuming")
        elif last:
            val_text = f", val loss {val['val_loss']:.4f} (ppl {val['val_ppl']:.1f})" if val else ""
            self.log.print(f"done: {step} steps, {self.progress.tokens:,} tokens in {elapsed:.0f}s; "
                           f"loss {first['loss']:.4f} -> {last['loss']:.4f}{val_text}; "
                           f"{last['tokens_per_s']:,.0f} tokens/s{_mfu_text(last)}; run dir {self.run_dir}")
        self.log.close()
        return summary


def _mfu_text(row: dict) -> str:
    if "mfu" not in row:
        return ""
    return f", MFU {100 * row['mfu']:.2f}%" + (" of a CPU matmul probe" if row["mfu_peak"] == CPU_PROBE else "")
