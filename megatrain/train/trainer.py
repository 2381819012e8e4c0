"""The training loop: a DeepSpeed engine fed from the token shards.

    Trainer(load_config("configs/tiny-cpu.yaml"), resume="auto").fit()

Before each optimizer step the learning rate and the global batch are set from the
tokens consumed so far (megatrain/schedule: GPT-3's warmup, cosine decay and batch
ramp); the batch becomes DeepSpeed's gradient accumulation. A step is that many
forward/backward passes per rank, each on the rank's next `micro_batch` samples from
the ResumableSampler; the loss logged is the mean over every sample of the global
batch. Everything a resume needs (step, tokens, sampler position, RNG) is saved in
checkpoints and restored exactly; the schedules follow from the tokens.
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from megatrain.config import Config, data_sources, deepspeed_config, optimizer_clips
from megatrain.data import BlendedDataset, ResumableSampler, TokenDataset
from megatrain.errors import UserError
from megatrain.model import GPT, GPTConfig, build_pipeline, flops_per_token, param_count
from megatrain.optim import FusedAdamWClip
from megatrain.schedule import BatchSchedule, LRSchedule
from megatrain.train import distributed as dist
from megatrain.train import faults
from megatrain.train.checkpoint import Checkpointer, checkpoint_step
from megatrain.train.metrics import RunLog, measure_matmul_flops
from megatrain.train.optimizer import attach, build_optimizer
from megatrain.train.preemption import StopRequest
from megatrain.train.recovery import SpikeRecovery
from megatrain.train.rollback import base_optimizer

# The dtype the matmuls run in, for the peak-FLOPs probe.
MATMUL_DTYPES = {"bf16": torch.bfloat16, "bf16-autocast": torch.bfloat16, "fp16": torch.float16,
                 "fp32": torch.float32}


@dataclass
class TrainState:
    step: int = 0
    tokens: int = 0


def build_data(cfg: Config):
    """Training samples (one dataset or a blend), validation samples (or None), vocab size."""
    seq_len = cfg.train.seq_len
    sources = data_sources(cfg)
    datasets = [(TokenDataset(path, seq_len, split="train"), weight) for path, weight in sources]
    train = datasets[0][0] if len(datasets) == 1 else BlendedDataset(datasets, seed=data_seed(cfg))
    vocab = max(d.manifest["vocab_size"] for d, _ in datasets)
    try:
        valid = TokenDataset(cfg.data.valid_path or sources[0][0], seq_len, split="valid")
    except UserError as e:
        valid = None
        if dist.is_main():
            print(f"warning: no validation data ({e})", flush=True)
    if valid is not None and valid.tokenizer_sha256 != datasets[0][0].tokenizer_sha256:
        raise UserError(f"{valid.dir}: validation data was made with another tokenizer than {datasets[0][0].dir}")
    return train, valid, vocab


def data_seed(cfg: Config) -> int:
    return cfg.run.seed if cfg.data.seed is None else cfg.data.seed


def model_shape(cfg: Config, vocab_size: int) -> dict:
    m = cfg.model
    return {"vocab_size": vocab_size, "seq_len": cfg.train.seq_len, "n_layer": m.n_layer, "n_head": m.n_head,
            "d_model": m.d_model, "bias": m.bias}


def _seed_rank(seed: int, rank: int) -> None:
    """Per-rank RNG for dropout and anything else random during training."""
    s = seed * 1000 + rank + 1
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)


class Trainer:
    def __init__(self, cfg: Config, resume: str = "auto"):
        import deepspeed
        from deepspeed.accelerator import get_accelerator

        self.cfg = cfg
        t = cfg.train
        if t.precision == "fp16" and get_accelerator().device_name() == "cpu":
            raise UserError("train.precision=fp16: DeepSpeed does not support fp16 on its CPU accelerator; "
                            "use train.precision=bf16 (or fp32)")
        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        dist.init_distributed()
        self.rank, self.world = dist.rank(), dist.world_size()
        stages = cfg.parallel.pipeline_stages
        if self.world % stages:
            raise UserError(f"parallel.pipeline_stages={stages} does not divide the {self.world} ranks")
        self.pipeline = stages > 1
        self.dp_size = self.world // stages  # the data-parallel rank comes from the engine's grid
        self.run_dir = Path(cfg.run.dir)

        self.train_data, self.valid_data, data_vocab = build_data(cfg)
        vocab = cfg.model.vocab_size or data_vocab
        if vocab < data_vocab:
            raise UserError(f"model.vocab_size={vocab} is smaller than the tokenizer's {data_vocab}")
        self.shape = model_shape(cfg, vocab)
        m = cfg.model
        self.model_cfg = GPTConfig(vocab_size=vocab, seq_len=t.seq_len, n_layer=m.n_layer, n_head=m.n_head,
                                   d_model=m.d_model, dropout=m.dropout, bias=m.bias, init_std=m.init_std,
                                   activation_checkpointing=m.activation_checkpointing, init_seed=cfg.run.seed)
        # Initialised from the seed and parameter names: the same weights on every rank and in any layout.
        if self.pipeline:
            interval = cfg.parallel.activation_checkpoint_interval or int(m.activation_checkpointing)
            model = build_pipeline(self.model_cfg, stages, cfg.parallel.partition_method, interval)
        else:
            model = GPT(self.model_cfg)
        self.lr_schedule = LRSchedule.from_config(cfg)
        self.batch_schedule = BatchSchedule.from_config(cfg, self.dp_size)
        self.grad_accum = self.batch_schedule.micro_batches(0)
        self.ds_config = deepspeed_config(cfg, self.dp_size, self.grad_accum)
        groups, self.client_optimizer = build_optimizer(cfg, model)
        self.engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups,
                                                    optimizer=self.client_optimizer, config=self.ds_config)
        attach(self.client_optimizer, model, cfg, self.engine)
        if self.world == 1 and cfg.parallel.zero_stage == 0:
            # DeepSpeed all-reduces ZeRO-0 gradients in a world of one too: it flattens them
            # into one buffer and copies them back, ~15% of a small step here, for an identity.
            self.engine.enable_backward_allreduce = False
        self.dp_rank = self.engine.grid.data_parallel_id if self.pipeline else self.rank
        # Where the pre-clip global norm comes from: our kernel when it clips; otherwise
        # DeepSpeed, which reports it except for data parallel with fp32 weights (measured here).
        self._norm_from_optimizer = isinstance(self.client_optimizer, FusedAdamWClip) and optimizer_clips(cfg)
        self._measure_grad_norm = (not self._norm_from_optimizer and cfg.parallel.zero_stage == 0
                                   and t.precision in ("fp32", "bf16-autocast"))
        self.device = self.engine.device
        self.sampler = ResumableSampler(len(self.train_data), seed=data_seed(cfg), rank=self.dp_rank,
                                        world_size=self.dp_size)
        self.base_optimizer = base_optimizer(self.engine, self.client_optimizer)
        self.vocab_size = vocab
        self.state = TrainState()
        self.checkpointer = Checkpointer(self.run_dir, cfg.checkpoint.keep)
        self.flops_per_token = flops_per_token(self.model_cfg)
        self.recovery = SpikeRecovery(cfg.spike, in_memory=cfg.parallel.zero_stage != 3)
        self.data_skips = sorted((int(float(p)), int(float(n))) for p, n in cfg.data.skip)
        self.skip_index = 0  # data.skip entries applied so far
        self.stop_request = StopRequest()

        main = dist.is_main()
        if main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(cfg.to_yaml())
        self.log = RunLog(self.run_dir, enabled=main, max_steps=t.max_steps, max_tokens=t.max_tokens,
                          progress=cfg.logging.progress,
                          wandb_config=cfg.to_dict() if cfg.logging.wandb else None,
                          wandb_project=cfg.logging.wandb_project, run_name=cfg.run.name or self.run_dir.name)
        _seed_rank(cfg.run.seed, self.rank)
        self._resume(resume)
        self.peak_flops, self.peak_source = self._peak_flops()
        params = param_count(self.model_cfg)
        self.log.event("start", step=self.state.step, world_size=self.world, params=params,
                       peak_flops=self.peak_flops, peak_flops_source=self.peak_source)
        layout = f"{stages} pipeline stages x {self.dp_size} data-parallel" if self.pipeline else f"{self.world} rank(s)"
        self.log.print(f"model: {params / 1e6:.2f}M parameters, {self.flops_per_token / 1e6:.1f} MFLOP/token; "
                       f"{layout}, ZeRO-{cfg.parallel.zero_stage}, {t.precision}; "
                       f"global batch {self.batch_tokens} tokens ({self.grad_accum} x {t.micro_batch} x {t.seq_len} "
                       f"x {self.dp_size}); MFU peak {self.peak_flops / 1e9:.1f} GFLOP/s per rank ({self.peak_source})")

    # --- state -----------------------------------------------------------------------

    @property
    def batch_tokens(self) -> int:
        return self.grad_accum * self.cfg.train.micro_batch * self.cfg.train.seq_len * self.dp_size

    def loop_state(self) -> dict:
        """Where the loop is: what a rollback or a resume puts back (with the tensors)."""
        return {"step": self.state.step, "tokens": self.state.tokens, "sampler": self.sampler.state_dict(),
                "skip_index": self.skip_index}

    def load_loop_state(self, state: dict) -> None:
        self.state = TrainState(step=state["step"], tokens=state["tokens"])
        self.sampler.load_state_dict(state["sampler"])
        self.skip_index = state.get("skip_index", 0)

    def state_dict(self) -> dict:
        """megatrain's part of a checkpoint."""
        return {**self.loop_state(), "recovery": self.recovery.state_dict(),
                "model_shape": self.shape, "dp_size": self.dp_size, "world_size": self.world,
                "pipeline_stages": self.cfg.parallel.pipeline_stages,
                "zero_stage": self.cfg.parallel.zero_stage, "precision": self.cfg.train.precision,
                "config": self.cfg.to_dict()}

    def _check_compatible(self, path: Path, saved: dict) -> None:
        if saved["model_shape"] != self.shape:
            diff = {k: (saved["model_shape"].get(k), v) for k, v in self.shape.items() if saved["model_shape"].get(k) != v}
            raise UserError(f"{path}: the checkpoint is for another model shape "
                            + ", ".join(f"{k}: {a} in the checkpoint, {b} now" for k, (a, b) in diff.items()))
        layout = (saved["dp_size"], saved["zero_stage"], saved.get("pipeline_stages", 1))
        ours = (self.dp_size, self.cfg.parallel.zero_stage, self.cfg.parallel.pipeline_stages)
        if layout != ours:
            raise UserError(f"{path}: written by {layout[0]} data-parallel rank(s) with ZeRO-{layout[1]} and "
                            f"{layout[2]} pipeline stage(s), this run has {ours[0]} with ZeRO-{ours[1]} and {ours[2]}; "
                            "resume with the same layout (DeepSpeed's per-rank shards depend on it), or convert the "
                            "checkpoint (launch/convert_checkpoint.py) and start a new run from its weights")

    def _resume(self, resume: str) -> None:
        found = dist.broadcast_object(self.checkpointer.find(resume) if dist.is_main() else None)
        path, warnings = found
        for w in warnings:
            self.log.print(w)
            self.log.event("checkpoint_skipped", reason=w)
        if path is None:
            if resume not in ("auto", "none"):
                raise UserError(f"{resume}: no usable checkpoint")
            self.log.truncate_after(0)  # a fresh start: rows of an earlier run in this directory go
            return
        self.load_checkpoint(path)
        self.log.truncate_after(self.state.step)
        self.log.event("resume", checkpoint=str(path), step=self.state.step, tokens=self.state.tokens)
        self.log.print(f"resumed from {path} at step {self.state.step} ({self.state.tokens} tokens)")

    def load_checkpoint(self, path: Path, keep_recovery_count: bool = False) -> None:
        """Collective: DeepSpeed's state, this rank's RNG, and the loop's state from `path`."""
        saved = self.checkpointer.read_state(path)
        self._check_compatible(path, saved)
        self.checkpointer.load(self.engine, path)
        self.load_loop_state(saved)
        rollbacks = self.recovery.rollbacks
        self.recovery.load_state_dict(saved.get("recovery", {}))
        if keep_recovery_count:  # a rollback to disk: the count goes on
            self.recovery.rollbacks = rollbacks

    def checkpoint_before(self, step: int) -> Path | None:
        """The newest intact disk checkpoint of a step before `step` (rank 0 decides)."""
        def find():
            for path in reversed(self.checkpointer.complete_checkpoints()):
                if checkpoint_step(path) < step and self.checkpointer.verify(path) is None:
                    return path
            return None
        return dist.broadcast_object(find() if dist.is_main() else None)

    def _peak_flops(self) -> tuple[float, str]:
        if self.cfg.train.peak_flops:
            return float(self.cfg.train.peak_flops), "train.peak_flops"
        measured = measure_matmul_flops(MATMUL_DTYPES[self.cfg.train.precision])  # all ranks at once, as they train
        return dist.all_reduce_mean([measured])[0], "matmul probe"

    # --- the loop --------------------------------------------------------------------

    def _done(self) -> bool:
        t = self.cfg.train
        return (t.max_steps is not None and self.state.step >= t.max_steps) or (
            t.max_tokens is not None and self.state.tokens >= t.max_tokens)

    def _micro_batch(self, dataset, indices, positions=None) -> tuple[torch.Tensor, torch.Tensor]:
        batch = dataset.batch(indices)
        if positions is not None:  # training samples: the test-only poison hook may replace some
            batch = faults.poison(batch, positions, self.vocab_size)
        batch = torch.from_numpy(batch).to(self.device)
        return batch[:, :-1], batch[:, 1:]

    def _next_train_micro_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        indices = self.sampler.next(self.cfg.train.micro_batch)
        return self._micro_batch(self.train_data, indices, self.sampler.last_positions)

    def _apply_data_skips(self) -> None:
        """data.skip: jump past configured positions when the sampler reaches them."""
        while self.skip_index < len(self.data_skips) and self.sampler.consumed >= self.data_skips[self.skip_index][0]:
            self.sampler.skip(self.data_skips[self.skip_index][1])
            self.skip_index += 1

    def _set_lr(self, lr: float) -> None:
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr

    def _apply_schedules(self) -> float:
        """Set the learning rate and the number of micro-batches for the next step from the
        tokens consumed so far. Called between steps, so a new batch size always starts at
        an accumulation boundary."""
        lr = self.lr_schedule(self.state.tokens)
        self._set_lr(lr)
        micro_batches = self.batch_schedule.micro_batches(self.state.tokens)
        if micro_batches != self.grad_accum:
            self.engine.set_train_batch_size(micro_batches * self.cfg.train.micro_batch * self.dp_size)
            self.grad_accum = micro_batches
        return lr

    def train_step(self) -> dict:
        """One optimizer step over the global batch; returns its metrics row."""
        t0 = time.perf_counter()
        lr = self._apply_schedules()
        if self.pipeline:
            loss = self._pipeline_step()
            grad_norm = self._grad_norm()
        else:
            loss, grad_norm = self._data_parallel_step()
        self.state.step += 1
        self.state.tokens += self.batch_tokens
        dt = time.perf_counter() - t0
        tokens_per_s = self.batch_tokens / dt
        row = {"kind": "train", "step": self.state.step, "tokens": self.state.tokens, "loss": loss, "lr": lr,
               "batch_tokens": self.batch_tokens, "grad_accum": self.grad_accum, "grad_norm": grad_norm,
               "tokens_per_s": tokens_per_s, "step_time": dt,
               "mfu": self.flops_per_token * tokens_per_s / (self.peak_flops * self.world)}
        if self.pipeline:  # what the pipeline engine really ran, not what we asked for
            row["micro_batches"] = self.engine.micro_batches
        if isinstance(self.client_optimizer, FusedAdamWClip):
            row["skipped_steps"] = int(self.client_optimizer.skipped_steps)  # non-finite norms, cumulative
        if self.cfg.train.precision == "fp16":
            row["loss_scale"] = float(getattr(self.engine.optimizer, "cur_scale", float("nan")))
        return row

    def _data_parallel_step(self) -> tuple[float, float | None]:
        loss_sum, grad_norm = 0.0, None
        break_loss = faults.fires("nan_loss", self.state.step + 1)  # test hook: a real NaN loss and gradients
        for i in range(self.grad_accum):
            inputs, targets = self._next_train_micro_batch()
            # Mark the boundary ourselves: DeepSpeed's own count assumes a fixed accumulation.
            boundary = i == self.grad_accum - 1
            self.engine.set_gradient_accumulation_boundary(boundary)
            loss = self.engine(inputs, targets)
            if break_loss:
                loss = loss * float("nan")
            self.engine.backward(loss)
            if boundary and self._measure_grad_norm:  # gradients are all-reduced now, not yet clipped
                grad_norm = self._total_grad_norm()
            self.engine.step()
            loss_sum += loss.item()
        if not self._measure_grad_norm:
            grad_norm = self._grad_norm()
        loss = dist.all_reduce_mean([loss_sum / self.grad_accum])[0]
        return loss, grad_norm

    def _pipeline_step(self) -> float:
        """DeepSpeed's pipeline schedule runs the micro-batches; every rank draws them from
        the sampler (the first stage uses the inputs, the last the targets)."""
        batches = [self._next_train_micro_batch() for _ in range(self.grad_accum)]
        return float(self.engine.train_batch(data_iter=iter(batches)))  # mean over the global batch

    def _total_grad_norm(self) -> float:
        grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
        return float(torch.nn.utils.get_total_norm(grads, norm_type=2.0))

    def _grad_norm(self) -> float | None:
        if self._norm_from_optimizer:
            return float(self.client_optimizer.last_grad_norm)
        norm = self.engine.get_global_grad_norm()
        if norm is None:
            return None
        return float(norm.item() if torch.is_tensor(norm) else norm)

    @torch.no_grad()
    def evaluate(self) -> dict | None:
        """Mean loss over the same `eval_samples` validation samples every time. Every rank
        runs the same number of forward passes (ZeRO-3 gathers parameters collectively)."""
        if self.valid_data is None:
            return None
        mb = self.cfg.train.micro_batch
        per_pass = mb * self.dp_size
        n = min(self.cfg.train.eval_samples, len(self.valid_data)) // per_pass * per_pass
        if n == 0:
            return None
        positions = np.arange(self.dp_rank, n, self.dp_size)
        batches = [self._micro_batch(self.valid_data, positions[s:s + mb]) for s in range(0, len(positions), mb)]
        if self.pipeline:  # averaged over micro-batches and data-parallel ranks by DeepSpeed
            loss = float(self.engine.eval_batch(iter(batches), num_micro_batches=len(batches)))
        else:
            self.engine.eval()
            total = sum(self.engine(inputs, targets).item() for inputs, targets in batches)
            self.engine.train()
            loss = dist.all_reduce_mean([total / len(batches)])[0]
        return {"kind": "valid", "step": self.state.step, "tokens": self.state.tokens, "val_loss": loss,
                "val_ppl": math.exp(min(loss, 50.0)), "val_samples": n}

    def save_checkpoint(self) -> Path:
        path = self.checkpointer.save(self.engine, self.state.step, self.state_dict())
        self.log.event("checkpoint", step=self.state.step, path=str(path))
        return path

    def fit(self) -> dict:
        """Train to max_steps/max_tokens. Returns a summary whose "outcome" is "done",
        "stopped" (SIGTERM/SIGINT: checkpoint written) or "gave_up" (more loss spikes than
        spike.max_rollbacks: rolled back once more and checkpointed)."""
        cfg = self.cfg
        t0, start_tokens = time.perf_counter(), self.state.tokens
        first_loss = last = val = None
        saved_at = self.state.step if self.state.step else None
        outcome = "done"
        self.recovery.maybe_capture(self)  # where the run starts is a rollback point too
        while not self._done():
            self._apply_data_skips()
            row = self.train_step()
            overflow = cfg.train.precision == "fp16" and bool(getattr(self.engine.optimizer, "overflow", False))
            spike = self.recovery.observe(self.state.step, row, overflow)
            spike, stop = dist.any_rank([spike, self.stop_request.requested])  # one collective: all ranks agree
            if spike:
                rollback = self.recovery.roll_back(self, row)
                self.log.print(f"loss spike at step {row['step']} (loss {row['loss']:.4f}): rolled back to step "
                               f"{rollback.restored_step} ({rollback.source}), skipped {rollback.skipped_samples} samples "
                               f"[rollback {self.recovery.rollbacks}/{cfg.spike.max_rollbacks}]")
                # Checkpoints of the abandoned timeline go first: pruning keeps the newest steps,
                # and `--resume auto` must never find one of them.
                self.checkpointer.discard_after(self.state.step)
                if rollback.gave_up:
                    outcome = "gave_up"
                    saved_at = None  # the final checkpoint records the rollback count
                    break
                self.save_checkpoint()  # makes the skip durable
                saved_at = self.state.step
                continue
            self.log.log(row)
            faults.maybe_crash("step", self.state.step)
            first_loss = row["loss"] if first_loss is None else first_loss
            last = row
            if self.state.step % cfg.train.log_every == 0:
                self.log.progress(self.state.step, self.state.tokens, loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}",
                                  batch=row['batch_tokens'], tok_s=f"{row['tokens_per_s']:.0f}")
            if cfg.train.eval_every and self.state.step % cfg.train.eval_every == 0:
                val = self.evaluate()
                if val:
                    self.log.log(val)
            if cfg.checkpoint.every_steps and self.state.step % cfg.checkpoint.every_steps == 0:
                self.save_checkpoint()
                saved_at = self.state.step
            self.recovery.maybe_capture(self)
            if stop:
                outcome = "stopped"
                break
        if outcome == "done" and (val is None or val["step"] != self.state.step):
            val = self.evaluate()
            if val:
                self.log.log(val)
        checkpoint = self.save_checkpoint() if saved_at != self.state.step else self.checkpointer.latest()
        elapsed = time.perf_counter() - t0
        summary = {"outcome": outcome, "steps": self.state.step, "tokens": self.state.tokens, "seconds": elapsed,
                   "first_loss": first_loss, "final_loss": last["loss"] if last else None,
                   "val_loss": val["val_loss"] if val else None, "rollbacks": self.recovery.rollbacks,
                   "tokens_per_s": (self.state.tokens - start_tokens) / elapsed}
        self.log.event("end", **{k: v for k, v in summary.items() if v is not None})
        if outcome == "stopped":
            self.log.print(f"stopped by {self.stop_request.signal_name or 'a request on another rank'} after step "
                           f"{self.state.step}; checkpoint {checkpoint}; continue with --resume auto")
        elif outcome == "gave_up":
            self.log.print(f"stopping: the loss spiked again after {cfg.spike.max_rollbacks} rollbacks "
                           f"(spike.max_rollbacks); rolled back to step {self.state.step}, checkpoint {checkpoint}. "
                           "Look at events.jsonl; lower the learning rate or raise spike.skip before resuming")
        elif last:
            val_text = f", val loss {val['val_loss']:.4f} (ppl {val['val_ppl']:.1f})" if val else ""
            self.log.print(f"done: {self.state.step} steps, {self.state.tokens:,} tokens in {elapsed:.0f}s; "
                           f"loss {first_loss:.4f} -> {last['loss']:.4f}{val_text}; "
                           f"{last['tokens_per_s']:,.0f} tokens/s, MFU {100 * last['mfu']:.2f}%; run dir {self.run_dir}")
        self.log.close()
        return summary
