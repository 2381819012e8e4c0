"""FusedAdamWClip: AdamW and global-norm gradient clipping in two passes over memory.

    opt = FusedAdamWClip(param_groups(model, 0.1), lr=6e-4, betas=(0.9, 0.95), eps=1e-8, max_grad_norm=1.0)
    loss.backward()
    grad_norm = opt.step()   # pre-clip global norm, a tensor on the parameters' device

Pass 1 computes the squared L2 norm of every gradient; `norm_group` (set by the trainer
under DeepSpeed) all-reduces that one scalar across the ranks holding distinct gradient
shards. Pass 2 applies AdamW with the gradient scaled by min(1, max_norm / (norm +
1e-6)), read from device memory: no host synchronisation, no pass that rescales the
gradients. A non-finite norm skips the update (the step count does not advance) and
counts it in `skipped_steps`. The arithmetic is csrc/adamw_math.h, the same on CPU and
GPU; without the compiled op a pure-torch path does the same (and says so once).

Segments: under DeepSpeed ZeRO-1/2 the optimizer sees one flat fp32 partition per
parameter group. `set_segments(flat, [(start, numel, weight_decay, in_norm), ...])` maps
it back to the model's parameters, so weight decay still skips biases, norms and
embeddings, and gradients another rank also holds (tied pipeline embeddings) count
once in the norm.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import torch

log = logging.getLogger(__name__)

try:
    if os.environ.get("MEGATRAIN_NO_FUSED_OP"):
        raise ImportError("disabled by MEGATRAIN_NO_FUSED_OP")
    import megatrain._fused_adamw  # noqa: F401  (registers torch.ops.megatrain.*)

    _OPS = torch.ops.megatrain
    _OP_ERROR = None
except ImportError as e:  # not built (e.g. installed without a compiler)
    _OPS = None
    _OP_ERROR = e

_warned = False


def fused_op_available() -> bool:
    return _OPS is not None


def fused_op_runs_on(device_type: str) -> bool:
    """Whether the built op has kernels for this device type: a CPU-only build (no nvcc,
    or MEGATRAIN_CPU_ONLY) has none for CUDA tensors, and calling it would crash in the
    dispatcher."""
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    return (
        _OPS is not None
        and key is not None
        and torch._C._dispatch_has_kernel_for_dispatch_key("megatrain::adamw_clip_step_", key)
    )


class FusedAdamWClip(torch.optim.Optimizer):
    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas=(0.9, 0.95),
        eps: float = 1e-8,
        weight_decay: float = 0.1,
        max_grad_norm: float = 1.0,
        use_fused_op: bool | None = None,
    ):
        if lr < 0 or eps < 0 or weight_decay < 0 or max_grad_norm < 0:
            raise ValueError("lr, eps, weight_decay and max_grad_norm must be >= 0")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self.max_grad_norm = max_grad_norm
        self.norm_group = (
            None  # process group whose ranks hold distinct gradient shards (None: this rank's alone)
        )
        # Squared norm of gradients this optimizer does not step, added to its own after the
        # norm_group's all-reduce (expert shards: train/expert_shards.py); a [1] fp32 tensor.
        self.extra_norm_sq: Callable[[], torch.Tensor] | None = None
        self.last_norm_sq: torch.Tensor | None = None  # the last step's, extra included
        self.use_fused_op = fused_op_available() if use_fused_op is None else use_fused_op
        self._forced = use_fused_op is True
        if self.use_fused_op and not fused_op_available():
            raise RuntimeError(f"megatrain's fused AdamW op is not built: {_OP_ERROR}")
        if not self.use_fused_op:
            _warn_fallback()
        self._op_on: dict[str, bool] = {}  # device type -> the fused op runs there
        self._segments: dict[int, list[tuple[int, int, float, bool]]] = {}
        self._not_in_norm: set[int] = set()
        self.skipped_steps = torch.zeros((), dtype=torch.int64)
        self.last_grad_norm: torch.Tensor | None = None

    def set_segments(self, flat: torch.Tensor, segments: list[tuple[int, int, float, bool]]) -> None:
        """Treat `flat` as the concatenation of `segments`: (start, numel, weight_decay, in_norm).
        Elements outside every segment (alignment padding) are left alone."""
        self._segments[id(flat)] = [(int(s), int(n), float(wd), bool(inc)) for s, n, wd, inc in segments]

    def exclude_from_norm(self, params) -> None:
        """Leave these parameters' gradients out of the norm (a copy another rank also
        holds, like the later stage's copy of tied pipeline embeddings); they still update."""
        self._not_in_norm |= {id(p) for p in params}

    def uses_fused_op_on(self, device: torch.device) -> bool:
        """The fused op where it has kernels for the device; else the torch path, said once
        (or a one-line error when the fused op was asked for explicitly)."""
        if device.type not in self._op_on:
            runs = self.use_fused_op and fused_op_runs_on(device.type)
            if self.use_fused_op and not runs:
                message = (
                    f"megatrain's fused AdamW op was built without {device.type} kernels (a CPU-only build: "
                    "nvcc missing or MEGATRAIN_CPU_ONLY set at install)"
                )
                if self._forced:
                    raise RuntimeError(
                        f"{message}; rebuild it with CUDA (make install on a machine with nvcc)"
                    )
                log.warning("%s; using the pure-torch path with the same arithmetic (slower)", message)
            if runs and (problem := fused_op_disagrees(device)):  # a kernel never run on this device model
                log.error(
                    "megatrain's fused AdamW op disagrees with the torch path on %s (%s): training "
                    "continues on the torch path",
                    device,
                    problem,
                )
                runs = False
            self._op_on[device.type] = runs
        return self._op_on[device.type]

    def _step_count(self, params: list[torch.Tensor], device: torch.device) -> torch.Tensor:
        """The step count of the parameters stepped together in this call, one tensor shared
        by their states. Usually that is every parameter; DeepSpeed's ZeRO-3 steps parameter
        sub-groups in separate calls, and each sub-group keeps its own count. A count found
        in the states wins: loading a checkpoint (torch's load_state_dict, or DeepSpeed
        writing optimizer.state directly) replaces the states' tensors."""
        step = next((st["step"] for p in params if "step" in (st := self.state.get(p, {}))), None)
        if step is None:
            return torch.zeros((), dtype=torch.float32, device=device)
        # DeepSpeed's ZeRO-1/2 restore pads every saved state tensor to the partition's
        # padding, turning the 0-dim count into [count, 0, ...]: the count is element 0.
        return step.reshape(-1)[0].to(device=device, dtype=torch.float32)

    def _state_for(self, p: torch.Tensor, step: torch.Tensor) -> dict:
        state = self.state[p]
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.contiguous_format)
            state["exp_avg_sq"] = torch.zeros_like(
                p, dtype=torch.float32, memory_format=torch.contiguous_format
            )
        state["step"] = step
        return state

    def _tensors(self, with_grad: list[tuple[dict, torch.Tensor]], step: torch.Tensor):
        """(params, grads, exp_avgs, exp_avg_sqs, lrs, weight_decays, norm_grads) over the
        parameters with a gradient, segments expanded into views."""
        ps, gs, ms, vs, lrs, wds, norm = [], [], [], [], [], [], []
        betas = {tuple(g["betas"]) for g in self.param_groups}
        eps = {g["eps"] for g in self.param_groups}
        if len(betas) > 1 or len(eps) > 1:
            raise ValueError("FusedAdamWClip needs the same betas and eps in every parameter group")
        for group, p in with_grad:
            if p.grad.is_sparse:
                raise RuntimeError("FusedAdamWClip does not support sparse gradients")
            state = self._state_for(p, step)
            flat = (p, p.grad, state["exp_avg"], state["exp_avg_sq"])
            if not all(t.is_contiguous() for t in flat):
                raise RuntimeError("FusedAdamWClip needs contiguous parameters, gradients and states")
            segments = self._segments.get(id(p))
            if segments is None:
                parts = [(flat, group["weight_decay"], id(p) not in self._not_in_norm)]
            else:
                views = [t.view(-1) for t in flat]
                parts = [
                    (tuple(v.narrow(0, s, n) for v in views), wd, inc) for s, n, wd, inc in segments if n
                ]
            for (pp, gg, mm, vv), wd, in_norm in parts:
                ps.append(pp), gs.append(gg), ms.append(mm), vs.append(vv)
                lrs.append(float(group["lr"])), wds.append(float(wd))
                if in_norm:
                    norm.append(gg)
        return ps, gs, ms, vs, lrs, wds, norm

    def sum_squares(self, grads: list[torch.Tensor], device: torch.device) -> torch.Tensor:
        """Pass 1 alone: the squared L2 norm of `grads`, a [1] fp32 tensor on `device`."""
        if self.uses_fused_op_on(device):
            return _OPS.sum_squares(grads) if grads else torch.zeros(1, device=device)
        return _sum_squares_torch(grads, device)

    @torch.no_grad()
    def step(self, closure=None, norm_sq: torch.Tensor | None = None) -> torch.Tensor | None:
        """`norm_sq`: the global squared norm to clip by, computed elsewhere (another
        optimizer's step over the rest of the model): no pass 1, no all-reduce."""
        if closure is not None:
            with torch.enable_grad():
                closure()
        with_grad = [(g, p) for g in self.param_groups for p in g["params"] if p.grad is not None]
        if not with_grad:
            return None
        device = with_grad[0][1].device
        step = self._step_count([p for _, p in with_grad], device)
        ps, gs, ms, vs, lrs, wds, norm_grads = self._tensors(with_grad, step)
        if self.skipped_steps.device != device:
            self.skipped_steps = self.skipped_steps.to(device)
        beta1, beta2 = self.param_groups[0]["betas"]
        eps = self.param_groups[0]["eps"]
        use_op = self.uses_fused_op_on(device)
        if norm_sq is None:
            norm_sq = self.sum_squares(norm_grads, device)
            if self.norm_group is not None:
                torch.distributed.all_reduce(norm_sq, group=self.norm_group)
            if self.extra_norm_sq is not None:
                norm_sq = norm_sq + self.extra_norm_sq()
        self.last_norm_sq = norm_sq
        adamw_clip_step = _OPS.adamw_clip_step_ if use_op else _adamw_clip_step_torch
        adamw_clip_step(
            ps, gs, ms, vs, lrs, wds, beta1, beta2, eps, norm_sq, self.max_grad_norm, step, self.skipped_steps
        )
        self.last_grad_norm = norm_sq.sqrt().reshape(())
        return self.last_grad_norm


def _warn_fallback() -> None:
    global _warned
    if not _warned:
        _warned = True
        log.warning(
            "megatrain: the fused AdamW op is not available (%s); using the pure-torch path "
            "with the same arithmetic (slower)",
            _OP_ERROR or "disabled",
        )


def fused_op_disagrees(device: torch.device, op_step=None) -> str | None:
    """Run the fused op (or `op_step`, same signature) and the torch path for two steps of
    one small random problem on `device`: None if the updates and moments agree to 1e-4
    relative (a wrong kernel is off by far more), else what differs, or what the op raised
    (a GPU it has no kernel image for: "no kernel image is available for execution").
    Its own generator: the run's random state is untouched."""
    try:
        return _compare_with_torch(device, op_step)
    except RuntimeError as e:  # the torch path does not raise here: the op did
        return f"it raised {type(e).__name__}: {str(e).strip().splitlines()[0]}"


def _compare_with_torch(device: torch.device, op_step) -> str | None:
    sizes = (1, 7, 1000, 4099)

    def problem():  # small params (their rounding stays far below an update), clipped gradients, zero moments
        g = torch.Generator().manual_seed(1234)
        params, grads = (
            [torch.randn(n, generator=g).to(device) * scale for n in sizes] for scale in (1e-3, 3)
        )
        return (
            params,
            grads,
            [torch.zeros(n, device=device) for n in sizes],
            [torch.zeros(n, device=device) for n in sizes],
        )

    results = []
    for sum_squares, step_fn in (
        (_OPS.sum_squares, op_step or _OPS.adamw_clip_step_),
        (lambda gs: _sum_squares_torch(gs, device), _adamw_clip_step_torch),
    ):
        ps, gs, ms, vs = problem()
        step, skipped = torch.zeros((), device=device), torch.zeros((), dtype=torch.int64, device=device)
        for _ in range(2):
            step_fn(
                ps,
                gs,
                ms,
                vs,
                [1e-3] * len(ps),
                [0.1] * len(ps),
                0.9,
                0.95,
                1e-8,
                sum_squares(gs),
                1.0,
                step,
                skipped,
            )
        start = problem()[0]
        results.append(
            {"updates": [p - p0 for p, p0 in zip(ps, start, strict=True)], "exp_avg": ms, "exp_avg_sq": vs}
        )
    for name in results[0]:
        ours, ref = (torch.cat([t.double().cpu() for t in r[name]]) for r in results)
        error = float((ours - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
        if not error < 1e-4:
            return f"{name} off by {error:.2g} relative"
    return None


# --- the same two passes in plain torch (fp32 arithmetic, same order) ---------------


def _sum_squares_torch(tensors, device) -> torch.Tensor:
    total = torch.zeros(1, dtype=torch.float64, device=device)
    for t in tensors:
        total += t.float().square().sum(dtype=torch.float64)
    return total.float()


def _adamw_clip_step_torch(ps, gs, ms, vs, lrs, wds, beta1, beta2, eps, norm_sq, max_norm, step, skipped):
    norm = norm_sq.sqrt()
    finite = torch.isfinite(norm).item()  # the fallback may sync; the fused op does not
    if not finite:
        skipped += 1
        return
    clip = torch.clamp(max_norm / (norm + 1e-6), max=1.0) if max_norm > 0 else torch.ones_like(norm)
    step += 1
    t = float(step.item())
    bc1 = float(torch.tensor(1.0 - beta1**t, dtype=torch.float64).float())
    bc2_sqrt = float(torch.tensor((1.0 - beta2**t) ** 0.5, dtype=torch.float64).float())
    for p, g, m, v, lr, wd in zip(ps, gs, ms, vs, lrs, wds, strict=True):
        g32 = g.float() * clip
        p32 = p.float()
        p32.mul_(1.0 - lr * wd)
        m.add_((g32 - m).mul_(1.0 - beta1))
        v.mul_(beta2).add_(g32 * g32 * (1.0 - beta2))
        denom = v.sqrt().div_(bc2_sqrt).add_(eps)
        p32.sub_((m / denom).mul_(lr / bc1))
        if p32.data_ptr() != p.data_ptr():
            p.copy_(p32)
