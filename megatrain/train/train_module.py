"""The train module: the DeepSpeed engine and everything about one optimizer step.

    module = TrainModule(cfg, model_cfg, grad_accum, layout)
    module.set_lr(lr); module.set_micro_batches(n)
    loss, grad_norm = module.step(next_micro_batch)   # n forward/backward passes, one update

It owns the engine, the precision and the optimizer's wiring, hides pipeline vs data
parallel behind `step()` and `evaluate()`, and copies its training tensors out and back in
(`capture` / `restore`) for in-memory rollback points.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch

from megatrain.config import Config, deepspeed_config
from megatrain.errors import UserError
from megatrain.layout import Layout
from megatrain.model import GPTConfig, tensor_parallel
from megatrain.optim.grad_norm import GradNormPolicy
from megatrain.train import distributed as dist
from megatrain.train import ds_internals as wall
from megatrain.train.build import DTYPES, build_model
from megatrain.train.expert_shards import ExpertShards
from megatrain.train.optimizer import attach, build_optimizer, is_tensor_parallel
from megatrain.train.stragglers import PhaseClock

MicroBatch = tuple[torch.Tensor, torch.Tensor]  # (inputs, targets)

_ENGINE_COUNTERS = ("global_steps", "global_samples", "skipped_steps")


def init_layout(cfg: Config) -> Layout:
    """Start the process group; this rank's Layout (the world checked against cfg.parallel)."""
    from deepspeed.accelerator import get_accelerator

    if cfg.train.precision == "fp16" and get_accelerator().device_name() == "cpu":
        raise UserError(
            "train.precision=fp16: DeepSpeed does not support fp16 on its CPU accelerator; "
            "use train.precision=bf16 (or fp32)"
        )
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    dist.init_distributed()
    return Layout.from_config(cfg, dist.world_size(), dist.rank())


def host_block_bytes(nbytes: int, pinned: bool) -> int:
    """The host memory a copy of `nbytes` takes: pinned memory comes from torch's caching
    host allocator, which rounds each block up to a power of two (and keeps it cached), so a
    1.1 GB partition takes 2 GiB."""
    return 1 << (nbytes - 1).bit_length() if pinned and nbytes > 1 else nbytes


class TrainModule:
    def __init__(self, cfg: Config, model_cfg: GPTConfig, grad_accum: int, layout: Layout):
        """After init_layout, which gives the layout."""
        import deepspeed

        t = cfg.train
        if t.tf32:  # before anything runs (PyTorch's default is full-fp32 matmuls)
            torch.backends.cuda.matmul.allow_tf32 = True
        self.layout, self.grad_accum, self.model_cfg = layout, grad_accum, model_cfg
        self.router_stats: torch.Tensor | None = None  # MoE: the last step's, for moe.router_metrics
        self.norm = GradNormPolicy.decide(cfg.optim, t, layout)
        ds_config = deepspeed_config(cfg, layout, grad_accum, self.norm)
        if layout.tensor_parallel > 1 and not layout.pipeline:
            # AutoTP with megatrain's specs (build.py cuts the model itself). A pipeline's
            # engine gets no such section: with one, DeepSpeed would replace the pipeline's
            # grid as its mpu (the model's tensor-parallel groups are DeepSpeed's `groups`
            # mesh either way, the same ranks as the grid's model axis).
            ds_config["tensor_parallel"] = tensor_parallel.autotp_config(
                layout.tensor_parallel, model_cfg, layout.sequence_parallel
            )
        # Parameters only where they are kept, from the seed and their names: the same weights in any layout.
        model = build_model(cfg, model_cfg, layout, ds_config, dist.collective_device())
        experts = dist.expert_parallel(layout)
        for layer in model.moe_layers() if model_cfg.moe_experts else ():
            layer.expert_parallel = experts
        # Each rank's own experts, outside DeepSpeed (None: the experts are parameters).
        self.experts = None
        if layout.experts_split:
            dtype = DTYPES.get(t.precision, torch.float32)
            self.experts = ExpertShards(model, layout, cfg.optim, dtype)
        groups, self.client_optimizer = build_optimizer(cfg.optim, model, self.norm)
        names = {id(p): n for n, p in model.named_parameters()}
        # The optimizer's parameters by name in its own order: a ZeRO-0 checkpoint keeps its
        # state by position only, and resuming on another layout needs the names (layout_free.py).
        self.optimizer_params = [[names[id(p)] for p in g["params"]] for g in groups]
        self.engine, _, _, _ = deepspeed.initialize(
            model=model, model_parameters=groups, optimizer=self.client_optimizer, config=ds_config
        )
        grid = self.engine.grid if layout.pipeline else None
        place = (grid.stage_id, grid.data_parallel_id, grid.get_slice_parallel_rank()) if grid else None
        if place not in (None, (layout.stage, layout.dp_rank, layout.tp_rank)):  # (stage, data, tensor)
            raise RuntimeError(
                f"rank {layout.rank}: DeepSpeed's pipeline grid says {place}, megatrain's Layout not"
            )
        attach(self.client_optimizer, model, cfg.optim.weight_decay, layout, self.norm, self.engine)
        if self.experts is not None:  # the global norm counts them, once per expert
            self.client_optimizer.extra_norm_sq = self.experts.squared_norm
        if layout.world == 1 and layout.zero_stage == 0:
            # DeepSpeed all-reduces ZeRO-0 gradients in a world of one too: it flattens them
            # into one buffer and copies them back, a sizeable share of a small step, for an identity.
            self.engine.enable_backward_allreduce = False
        self.device = self.engine.device
        self.clock = PhaseClock(self.device)  # the phases of the steps stragglers.py measures
        # The optimizer that owns the moments: ours, or the one inside DeepSpeed's wrapper.
        self.base_optimizer = wall.base_optimizer(self.engine.optimizer)
        # The state a ZeRO-0 wrapper's construction step made (optimizer.CONSTRUCTION_LR): a
        # fresh optimizer has none, and makes it at its first step.
        self.base_optimizer.state.clear()
        self.fp16 = t.precision == "fp16"

    @property
    def flavour(self) -> str:
        """What DeepSpeed made of the optimizer (ds_internals.FLAVOURS): checkpoints record it."""
        return wall.flavour(self.engine.optimizer)

    # --- one optimizer step ------------------------------------------------------------

    def set_lr(self, lr: float) -> None:
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr
        if self.experts is not None:
            self.experts.set_lr(lr)

    def set_micro_batches(self, micro_batches: int, micro_batch: int) -> None:
        """Micro-batches per rank in the next step (DeepSpeed's gradient accumulation)."""
        if micro_batches != self.grad_accum:
            self.engine.set_train_batch_size(micro_batches * micro_batch * self.layout.data_parallel)
            self.grad_accum = micro_batches

    def loss(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The mean loss of one micro-batch (the forward pass of a data-parallel step)."""
        return self.engine(inputs, targets)

    def step(self, next_micro_batch: Callable[[], MicroBatch]) -> tuple[float, float | None]:
        """One optimizer step over `grad_accum` micro-batches per rank: (loss averaged over
        the global batch, pre-clip global gradient norm or None)."""
        loss_fn = self.engine.module.loss_fn
        skipped_before = self.engine.skipped_steps
        if self.norm.source == "kernel":  # stays None when DeepSpeed skips our step (an overflow)
            self.client_optimizer.last_grad_norm = None
        clock = self.clock
        if self.layout.pipeline:
            # DeepSpeed's schedule runs the micro-batches; every rank draws them (the first
            # stage uses the inputs, the last the targets). Its whole schedule is timed as
            # the forward phase: it interleaves them.
            with clock.phase("data"):
                batches = [next_micro_batch() for _ in range(self.grad_accum)]
            with clock.phase("forward"):
                loss = float(self.engine.train_batch(data_iter=iter(batches)))  # mean over the global batch
            if loss_fn.z_loss:  # the z terms are on the last stage's ranks: their mean
                z_sum, count = loss_fn.take_z()
                z_and_count = torch.zeros(2, dtype=torch.float64, device=dist.collective_device())
                if count:
                    z_and_count[0], z_and_count[1] = z_sum.to(z_and_count), count
                z_mean, counted = dist.all_reduce_mean(z_and_count)
                self.z_loss = z_mean / counted
                loss -= loss_fn.z_loss * self.z_loss  # the logged loss is the cross-entropy alone
            return loss, self._grad_norm(skipped_before)
        # The losses stay on the device (float64, as a host sum would be) until one
        # all-reduce after the step: one host sync per step, not one per micro-batch.
        loss_sum, grad_norm = torch.zeros((), dtype=torch.float64, device=dist.collective_device()), None
        with clock.phase("data"):
            upcoming = next_micro_batch()
        for i in range(self.grad_accum):
            inputs, targets = upcoming
            if i + 1 < self.grad_accum:  # its copy to the device overlaps this micro-batch's compute
                with clock.phase("data"):
                    upcoming = next_micro_batch()
            # Mark the boundary ourselves: DeepSpeed's own count assumes a fixed accumulation.
            boundary = i == self.grad_accum - 1
            self.engine.set_gradient_accumulation_boundary(boundary)
            with clock.phase("forward"):
                loss = self.loss(inputs, targets)
            with clock.phase("backward"):
                self.engine.backward(loss)
            if boundary and self.norm.source == "measured":  # gradients are all-reduced now, not yet clipped
                grad_norm = self._measured_norm()
            with clock.phase("optimizer"):
                if boundary and self.experts is not None:
                    self.experts.reduce_gradients()
                    self.client_optimizer.last_norm_sq = None
                self.engine.step()
                if boundary and self.experts is not None:  # None: DeepSpeed skipped the step
                    self.experts.step(self.client_optimizer.last_norm_sq)
            loss_sum += loss.detach().to(loss_sum)
        if self.norm.source != "measured":
            grad_norm = self._grad_norm(skipped_before)
        # The logged loss is the cross-entropy alone; the z term and the router's are their own
        # metrics, all in the one all-reduce the loss makes.
        extras = []
        if loss_fn.z_loss:
            z_sum = loss_fn.take_z()[0].to(loss_sum)
            loss_sum, extras = loss_sum - loss_fn.z_loss * z_sum, [z_sum[None]]
        router = self.engine.module.router.take() if self.model_cfg.moe_experts else None
        if router is not None:
            m = self.model_cfg
            loss_sum = loss_sum - (m.moe_aux_loss * router[:, 0] + m.moe_z_loss * router[:, 1]).sum()
            extras.append(router.reshape(-1))
        means = dist.all_reduce_mean(torch.cat([loss_sum[None], *extras]) / self.grad_accum)
        if loss_fn.z_loss:
            self.z_loss = means[1]
        if router is not None:
            self.router_stats = torch.tensor(means[-router.numel() :], dtype=torch.float64).view(router.shape)
        return means[0], grad_norm

    def _measured_norm(self) -> float:
        """The global norm of whole gradients (ZeRO-0); under tensor parallelism the shards'
        squares summed over the group, the parameters AutoTP left whole counted once."""
        params = [p for p in self.engine.module.parameters() if p.grad is not None]
        if self.layout.tensor_parallel == 1:
            return float(torch.nn.utils.get_total_norm([p.grad for p in params], norm_type=2.0))
        counted = [p.grad for p in params if is_tensor_parallel(p) or self.layout.tp_rank == 0]
        squares = torch.zeros((), dtype=torch.float64, device=dist.collective_device())  # NCCL: on the GPU
        if counted:
            squares += torch.nn.utils.get_total_norm(counted, norm_type=2.0).to(squares) ** 2
        torch.distributed.all_reduce(squares, group=wall.tensor_parallel_group())
        return float(squares.sqrt())

    def _grad_norm(self, skipped_before: int) -> float | None:
        """The step's pre-clip norm. A step DeepSpeed skipped (fp16 overflow, or a non-finite
        bf16 gradient under ZeRO 1-2: its wrappers check before calling the optimizer) has an
        infinite one, whatever the source last reported; a step our kernel skipped (it checks
        the norm itself) is counted in DeepSpeed's skipped_steps, which checkpoints keep."""
        if self.engine.skipped_steps > skipped_before:
            return math.inf
        if self.norm.source == "kernel":
            norm = float(self.client_optimizer.last_grad_norm)
            if not math.isfinite(norm):
                self.engine.skipped_steps += 1
            return norm
        norm = self.engine.get_global_grad_norm()
        if norm is None:
            return None
        return float(norm.item() if torch.is_tensor(norm) else norm)

    def step_stats(self) -> dict:
        """What the engine really did in the last step, for the metrics row."""
        row = {"micro_batches": self.engine.micro_batches} if self.layout.pipeline else {}
        if self.engine.module.loss_fn.z_loss:
            row["z_loss"] = self.z_loss  # mean log(Z)^2 over the global batch, before the coefficient
        row["skipped_steps"] = (
            self.engine.skipped_steps
        )  # updates left out for a non-finite gradient, cumulative
        if self.fp16:
            row["loss_scale"] = wall.loss_scale(self.engine.optimizer)
        return row

    def loss_scale_state(self) -> dict | None:
        """fp16's dynamic loss scale (the same on every rank), for a checkpoint; None without one."""
        return wall.loss_scale_state(self.engine.optimizer)

    def load_loss_scale_state(self, saved: dict | None) -> bool:
        """After a reshard (DeepSpeed's own load restores it on the same layout) or a rollback:
        whether a saved fp16 loss scale was set."""
        return wall.load_loss_scale_state(self.engine.optimizer, saved)

    @property
    def overflow(self) -> bool:
        """fp16: the loss scaler skipped the last step (its infinite norm is not a spike)."""
        return self.fp16 and bool(getattr(self.engine.optimizer, "overflow", False))

    @torch.no_grad()
    def evaluate(self, batches: list[MicroBatch]) -> float:
        """Mean loss over these micro-batches and every data-parallel rank's (collective:
        every rank passes the same number)."""
        if self.layout.pipeline:  # averaged over micro-batches and data-parallel ranks by DeepSpeed
            return float(self.engine.eval_batch(iter(batches), num_micro_batches=len(batches)))
        self.engine.eval()
        total = torch.zeros((), dtype=torch.float64, device=dist.collective_device())
        for inputs, targets in batches:
            total += self.engine(inputs, targets).detach().to(total)
        self.engine.train()
        return dist.all_reduce_mean(total / len(batches))[0]

    def set_engine_counters(self, steps: int, samples: int) -> None:
        """DeepSpeed's own step and sample counts, where its checkpoint loader would set them."""
        self.engine.global_steps, self.engine.global_samples = steps, samples

    # --- training tensors, for rollback points ------------------------------------------

    def _state_tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor that is training state (the model's parameters; the optimizer's, which
        under DeepSpeed are its fp32 masters or flat ZeRO partitions; its moments and step
        counts), by a key that stays the same within a process."""
        found: dict[str, torch.Tensor] = {}
        seen: set[tuple[int, tuple]] = set()

        def add(key: str, t: torch.Tensor) -> None:
            ident = (t.data_ptr(), tuple(t.shape))
            if t.numel() and ident not in seen:
                seen.add(ident)
                found[key] = t

        for i, p in enumerate(self.engine.module.parameters()):
            add(f"module.{i}", p.data)
        for key, p, state in self._optimizer_states():
            add(f"opt.param.{key}", p.data)
            for name, value in state.items():
                if torch.is_tensor(value):
                    add(f"opt.state.{key}.{name}", value)
        for key, t in self.experts.tensors().items() if self.experts is not None else ():
            add(key, t)
        return found

    def _state_counts(self) -> dict[str, tuple[dict, str]]:
        """Optimizer state kept as plain numbers (DeepSpeed's own Adams count steps in an
        int), by key: the dict that holds each and its name there."""
        return {
            f"opt.state.{key}.{name}": (state, name)
            for key, _, state in self._optimizer_states()
            for name, value in state.items()
            if isinstance(value, int | float) and not isinstance(value, bool)
        }

    def _optimizer_states(self):
        """(position key, parameter, its optimizer state) for each of the optimizer's parameters."""
        for gi, group in enumerate(self.base_optimizer.param_groups):
            for pi, p in enumerate(group["params"]):
                yield f"{gi}.{pi}", p, self.base_optimizer.state.get(p, {})

    def snapshot_bytes(self) -> int:
        """Host bytes of one capture, the AdamW moments included before they exist (they
        appear at the first step), as the host allocator will take them."""
        tensors = self._state_tensors()
        sizes = [t.numel() * t.element_size() for t in tensors.values()]
        if not any(k.startswith("opt.state.") for k in tensors):
            params = [p for g in self.base_optimizer.param_groups for p in g["params"]]
            params += [self.experts.master] if self.experts is not None else []
            sizes += [4 * p.numel() for p in params] * 2  # the moments
        return sum(host_block_bytes(n, pinned=self.device.type == "cuda") for n in sizes)

    def capture(self, reuse: dict | None = None) -> dict:
        """A host copy of this rank's training tensors, the optimizer's step counts kept as
        plain numbers, the engine's counters and the fp16 loss scale (ZeRO 0-2; ZeRO-3 keeps
        parameters in DeepSpeed-private partitions). From a
        GPU the copies go into pinned memory without blocking (the stream orders them before
        the next step's writes); `reuse`: an older capture whose buffers to overwrite."""
        pinned = self.device.type == "cuda"
        old = reuse["tensors"] if reuse else {}
        tensors = {}
        for key, t in self._state_tensors().items():
            out = old.get(key)
            if out is None or out.shape != t.shape or out.dtype != t.dtype:
                out = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=pinned)
            tensors[key] = out.copy_(t.detach(), non_blocking=pinned)
        return {
            "tensors": tensors,
            "counts": {key: state[name] for key, (state, name) in self._state_counts().items()},
            "engine_counters": {k: getattr(self.engine, k) for k in _ENGINE_COUNTERS},
            "loss_scale": self.loss_scale_state(),
        }

    def restore(self, snapshot: dict) -> None:
        """Copy a snapshot back in place. Optimizer state created after it (the moments
        appear at the first step) is zeroed: the same as a fresh optimizer at that point."""
        with torch.no_grad():
            for key, t in self._state_tensors().items():
                saved = snapshot["tensors"].get(key)
                if saved is not None:
                    t.copy_(saved, non_blocking=saved.is_pinned())
                elif key.startswith("opt.state."):
                    t.zero_()
                else:
                    raise RuntimeError(
                        f"rollback point has no copy of {key}: the model changed since it was taken"
                    )
        for key, (state, name) in self._state_counts().items():
            state[name] = snapshot["counts"].get(key, 0)  # made after the point: as a fresh optimizer's
        for name, value in snapshot["engine_counters"].items():
            setattr(self.engine, name, value)
        self.load_loss_scale_state(snapshot["loss_scale"])
