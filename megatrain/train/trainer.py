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

import time
from pathlib import Path

import torch

from megatrain.config import Config
from megatrain.config.deepspeed import fp32_accumulation
from megatrain.errors import UserError
from megatrain.model import GPTConfig, flops_per_token, moe, param_count, recompute_flops_per_token
from megatrain.plan import human, plan, search
from megatrain.schedule import BatchSchedule, LRSchedule
from megatrain.train import distributed as dist
from megatrain.train import init_from, run_tokenizer
from megatrain.train.batches import TrainBatches, build_datasets, data_seed
from megatrain.train.callbacks import Callback, CheckpointEvery, Evaluate, Heartbeat, LogMetrics, Preemption
from megatrain.train.checkpoint import Checkpointer
from megatrain.train.checkpointing import Checkpoints
from megatrain.train.metrics import RunLog
from megatrain.train.mfu import CPU_PROBE, device_memory, peak_flops
from megatrain.train.spike_recovery import SpikeRecovery, snapshot_budget
from megatrain.train.state import RNG, Progress, ResumableState
from megatrain.train.stragglers import Stragglers
from megatrain.train.train_module import TrainModule, init_layout


class Trainer:
    def __init__(self, cfg: Config, resume: str = "auto", callbacks: list[Callback] = (), module=None):
        """`callbacks` run after the built-in ones (tests add fault injection this way);
        `module`: a train module made outside (by default a TrainModule on DeepSpeed)."""
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
            raise UserError(
                f"model.vocab_size={self.model_cfg.vocab_size} is smaller than the tokenizer's {data_vocab}"
            )
        T, V = self.layout.tensor_parallel, self.model_cfg.vocab_size
        if V % T:  # the tensor-parallel ranks split the vocabulary
            raise UserError(
                f"the vocabulary ({V}) does not split over parallel.tensor_parallel={T} ranks: set "
                f"model.vocab_size to a multiple of {T} (at least {V}; the extra rows are never used)"
            )
        self.tokenizer_sha256 = train_data.tokenizer_sha256
        self.run_dir = Path(cfg.run.dir)
        files = Checkpointer(self.run_dir, cfg.checkpoint.keep, pinned=torch.cuda.is_available())
        files.check_shared()  # before anything is written there
        self.log = RunLog(cfg.run, cfg.logging, t, cfg.to_dict(), enabled=dist.is_main())
        paths = [path for path, _ in cfg.data.sources()]
        if run_tokenizer.keep(self.run_dir, paths, self.tokenizer_sha256, write=dist.is_main()) is None:
            self.log.print(
                f"note: no tokenizer kept with the data ({paths[0]}): tools on this run need --tokenizer"
            )
        self._check_plan()
        self.progress = Progress()
        self.lr_schedule = LRSchedule.from_config(cfg)
        batch_schedule = BatchSchedule.from_config(cfg, self.layout.data_parallel)
        self.module = module or TrainModule(cfg, self.model_cfg, batch_schedule.micro_batches(0), self.layout)
        self.batches = TrainBatches(
            cfg.data,
            t.micro_batch,
            train_data,
            data_seed(cfg),
            self.layout.dp_rank,
            self.layout.data_parallel,
            self.module.device,
        )
        self.recovery = SpikeRecovery(cfg.spike, t.seq_len, in_memory=not self.layout.partitioned_parameters)
        self.metrics = LogMetrics(t.log_every)
        self.evaluation = Evaluate(valid_sets, t.eval_every, t.eval_samples)
        self.preemption = Preemption()
        self.stragglers = Stragglers(cfg.logging.straggler_every, cfg.logging.straggler_factor)
        self.phase_times: list[float] | None = None  # this rank's, on steps the stragglers measure
        self.rank_times: list[list[float]] | None = None  # every rank's, gathered
        self.callbacks = [
            self.stragglers,  # first: it adds the slowest rank's times to the row the others log
            self.recovery,
            self.metrics,
            self.evaluation,
            CheckpointEvery(cfg.checkpoint.every_steps, cfg.checkpoint.async_save),
            self.preemption,
            *callbacks,
            Heartbeat(self.run_dir / "heartbeat", dist.is_main()),
        ]
        self.state = ResumableState()
        self.state.register("progress", self.progress)
        self.state.register("data", self.batches)
        self.state.register("rng", RNG(), per_rank=True)
        for cb in self.callbacks:
            if cb.stateful:
                self.state.register(cb.name, cb)
        run = (self.layout, self.module, self.state, self.progress, self.log, files, self.model_cfg)
        self.checkpoints = Checkpoints(cfg, *run, self.tokenizer_sha256, batch_schedule)
        self.outcome: str | None = None  # a callback's stop(): "stopped", "gave_up"
        self.final_checkpoint = False
        RNG.seed(cfg.run.seed, self.layout.rng_index)
        self.checkpoints.resume(resume, self.source)
        self.flops_per_token = flops_per_token(self.model_cfg)
        # With activation checkpointing the hardware also recomputes the blocks' forward pass.
        self.hardware_flops_per_token = (
            self.flops_per_token
            + self.layout.activation_checkpointing * recompute_flops_per_token(self.model_cfg)
        )
        self.peak_flops, self.peak_source = peak_flops(cfg.train, self.module.device)
        params, lay = param_count(self.model_cfg), self.layout
        self.log.event(
            "start",
            step=self.progress.step,
            world_size=lay.world,
            params=params,
            peak_flops=self.peak_flops,
            peak_flops_source=self.peak_source,
        )
        ranks = (
            f"{lay.world} ranks: {lay.pipeline_stages} pipeline x {lay.tensor_parallel} tensor x "
            f"{lay.data_parallel} data parallel"
            if lay.world > lay.data_parallel
            else f"{lay.world} rank(s)"
        ) + (f" (experts split over {lay.expert_parallel})" if lay.expert_parallel > 1 else "")
        ranks += " (sequence parallel)" if lay.sequence_parallel else ""
        m = self.model_cfg
        experts = (
            f" ({param_count(m, active=True) / 1e6:.2f}M active: {m.moe_top_k} of {m.moe_experts} experts"
            f" in {len(m.moe_blocks)} blocks)"
            if m.moe_experts
            else ""
        )
        self.log.print(
            f"model: {params / 1e6:.2f}M parameters{experts}, {self.flops_per_token / 1e6:.1f} MFLOP/token; "
            f"{ranks}, ZeRO-{lay.zero_stage}, {self._precision_text()}; "
            f"global batch {self.batch_tokens} tokens ({self.module.grad_accum} x {t.micro_batch} x "
            f"{t.seq_len} x {lay.data_parallel}); "
            + (
                f"MFU peak {self.peak_flops / 1e9:.1f} GFLOP/s per rank ({self.peak_source})"
                if self.peak_flops
                else f"no MFU: {self.peak_source}"
            )
        )
        # Where the schedule departs from the config, say so.
        for note in self.checkpoints.batch_schedule.rounding_notes():
            self.log.print(f"schedule: {note}")
            self.log.event("batch_rounded", note=note)

    def _precision_text(self) -> str:
        """The precision, what bf16 gradients are summed in (DeepSpeed has no fp32 path without
        ZeRO), and on a GPU what fp32 matmuls run in (TF32 or not is a 7x peak)."""
        t = self.cfg.train
        if t.precision == "bf16":
            summed = "fp32" if fp32_accumulation(t, self.layout.zero_stage) else "bf16"
            return f"bf16 (gradients summed and reduced in {summed})"
        if self.module.device.type == "cuda" and t.precision in ("fp32", "bf16-autocast"):
            matmuls = "TF32" if t.tf32 else "full fp32; train.tf32=true for TF32"
            return f"{t.precision} (fp32 matmuls in {matmuls})"
        return t.precision

    def _check_plan(self) -> None:
        """The planner's memory prediction for this layout, printed before anything is
        allocated; a layout it predicts cannot fit is refused (plan.check), naming the
        fastest layout of these ranks that fits."""
        memory, where = device_memory()
        on_gpu = where.startswith("GPU")
        mine = plan(
            self.cfg, self.model_cfg, self.layout, memory, peak_flops=1.0, on_gpu=on_gpu
        )  # memory only
        parts = mine["per_rank_bytes"]
        breakdown = ", ".join(f"{k} {human(v)}" for k, v in parts.items() if k != "total")
        self.log.print(
            f"plan: {human(parts['total'])} per rank predicted ({breakdown}) of {human(memory)} ({where})"
        )
        if mine["fits"] or not self.cfg.plan.check:
            return
        fitting = search(
            self.cfg, self.model_cfg, dist.world_size(), dist.local_world_size(), memory, 1.0, on_gpu=on_gpu
        )
        largest = max((k for k in parts if k not in ("total", "allowance")), key=parts.get)
        raise UserError(
            f"plan: this layout needs {human(parts['total'])} per rank ({largest} "
            f"{human(parts[largest])}), {where} has {human(memory)}: over by "
            f"{human(parts['total'] - memory)}; "
            + (
                f"the fastest layout of {dist.world_size()} rank(s) that fits: {fitting[0]['sets']}"
                if fitting
                else f"no layout of {dist.world_size()} rank(s) fits"
            )
            + "; --set plan.check=false starts anyway"
        )

    @property
    def batch_tokens(self) -> int:
        t = self.cfg.train
        return self.module.grad_accum * t.micro_batch * t.seq_len * self.layout.data_parallel

    # --- rollback points and the end ---------------------------------------------------

    def snapshot(self, reuse: dict | None = None) -> dict:
        """An in-memory rollback point: the engine's tensors and every registered state
        (`reuse`: an older point whose host buffers to overwrite)."""
        return {
            "step": self.progress.step,
            "engine": self.module.capture(reuse and reuse["engine"]),
            "state": self.state.state_dict(),
        }

    def restore(self, point: dict) -> None:
        self.module.restore(point["engine"])
        self.state.load_state_dict(point["state"])

    def stop(self, outcome: str, final_checkpoint: bool = False) -> None:
        """End the run after this step (a callback's request): "stopped" (a signal) or
        "gave_up" (spikes); `final_checkpoint` writes one at the end even if this step has
        one (it must record what happened since)."""
        self.outcome, self.final_checkpoint = outcome, final_checkpoint

    # --- the loop ----------------------------------------------------------------------

    def _done(self) -> bool:
        t = self.cfg.train
        return (t.max_steps is not None and self.progress.step >= t.max_steps) or (
            t.max_tokens is not None and self.progress.tokens >= t.max_tokens
        )

    def train_step(self) -> dict:
        """One optimizer step over the global batch, with the schedules set from the tokens
        consumed so far (between steps, so a new batch size starts at an accumulation
        boundary); returns its metrics row."""
        t0 = time.perf_counter()
        self.batches.at_step_boundary()
        lr = self.lr_schedule(self.progress.tokens)
        self.module.set_lr(lr)
        micro_batches = self.checkpoints.batch_schedule.micro_batches(self.progress.tokens)
        self.module.set_micro_batches(micro_batches, self.cfg.train.micro_batch)
        measured = self.stragglers.measures(self.progress.step + 1)
        if measured:
            self.module.clock.start()
        loss, grad_norm = self.module.step(self.batches.next)
        self.phase_times = self.module.clock.stop() if measured else None
        self.progress.step += 1
        self.progress.tokens += self.batch_tokens
        dt = time.perf_counter() - t0
        tokens_per_s = self.batch_tokens / dt
        row = {
            "kind": "train",
            "step": self.progress.step,
            "tokens": self.progress.tokens,
            "loss": loss,
            "lr": lr,
            "batch_tokens": self.batch_tokens,
            "grad_accum": self.module.grad_accum,
            "grad_norm": grad_norm,
            "tokens_per_s": tokens_per_s,
            "step_time": dt,
            **self.module.step_stats(),
            **self.batches.metrics(),
        }
        if self.model_cfg.moe_experts:
            histogram = self.progress.step % self.cfg.logging.moe_load_every == 0
            row.update(moe.router_metrics(self.module.router_stats, self.model_cfg.moe_blocks, histogram))
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
        self.checkpoints.plan_background(snapshot_budget(self.cfg.spike))  # before the rollback points
        for cb in self.callbacks:
            cb.on_start(self)
        while self.outcome is None and not self._done():
            row = self.train_step()
            # One collective: the callbacks' votes, and on measured steps every rank's phase times.
            flags, self.rank_times = self._agree(
                [cb.flag(self, row) for cb in self.callbacks], self.phase_times
            )
            for cb, flagged in zip(self.callbacks, flags, strict=True):
                if cb.on_step(self, row, flagged):
                    break  # the step was undone
        self.outcome = self.outcome or "done"
        for cb in self.callbacks:
            cb.on_end(self)
        # A background write in flight is waited for (on a stop, at most checkpoint.stop_wait_s).
        self.checkpoints.settle(self.cfg.checkpoint.stop_wait_s if self.outcome == "stopped" else None)
        if self.final_checkpoint or self.checkpoints.saved_step != self.progress.step:
            checkpoint = self.checkpoints.save()
        else:
            checkpoint = self.checkpoints.files.latest()
        return self._finish(time.perf_counter() - t0, self.progress.tokens - start_tokens, checkpoint)

    @staticmethod
    def _agree(votes: list, values: list[float] | None) -> tuple[list, list | None]:
        """Every callback's vote (a flag, or a tuple of flags) ORed over all ranks and, when
        given, every rank's `values`, in one collective."""
        flat = [f for vote in votes for f in (vote if isinstance(vote, tuple) else (vote,))]
        agreed, gathered = dist.agree_and_gather(flat, values)
        agreed = iter(agreed)
        return [
            tuple(next(agreed) for _ in v) if isinstance(v, tuple) else next(agreed) for v in votes
        ], gathered

    def _finish(self, elapsed: float, tokens: int, checkpoint: Path) -> dict:
        first, last, val = self.metrics.first, self.metrics.last, self.evaluation.last
        step, cfg = self.progress.step, self.cfg
        summary = {
            "outcome": self.outcome,
            "steps": step,
            "tokens": self.progress.tokens,
            "seconds": elapsed,
            "first_loss": first and first["loss"],
            "final_loss": last and last["loss"],
            "val_loss": val and val["val_loss"],
            "rollbacks": self.recovery.rollbacks,
            "tokens_per_s": tokens / elapsed,
        }
        self.log.event("end", **{k: v for k, v in summary.items() if v is not None})
        if self.outcome == "stopped":
            self.log.print(
                f"stopped by {self.preemption.signal_name or 'a request on another rank'} after step {step}; "
                f"checkpoint {checkpoint}; continue with --resume auto"
            )
        elif self.outcome == "gave_up":
            self.log.print(
                f"stopping: the loss spiked again after {cfg.spike.max_rollbacks} rollbacks "
                f"(spike.max_rollbacks); rolled back to step {step}, checkpoint {checkpoint}. "
                "Look at events.jsonl; lower the learning rate or raise spike.skip before resuming"
            )
        elif last:
            val_text = f", val loss {val['val_loss']:.4f} (ppl {val['val_ppl']:.1f})" if val else ""
            self.log.print(
                f"done: {step} steps, {self.progress.tokens:,} tokens in {elapsed:.0f}s; "
                f"loss {first['loss']:.4f} -> {last['loss']:.4f}{val_text}; "
                f"{last['tokens_per_s']:,.0f} tokens/s{_mfu_text(last)}; run dir {self.run_dir}"
            )
        self.log.close()
        return summary


def _mfu_text(row: dict) -> str:
    if "mfu" not in row:
        return ""
    return f", MFU {100 * row['mfu']:.2f}%" + (
        " of a CPU matmul probe" if row["mfu_peak"] == CPU_PROBE else ""
    )
