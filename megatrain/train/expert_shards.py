"""Expert parallelism's memory split: each rank keeps the weights and gradients of the experts
it computes and nothing of the others, and their optimizer state is sharded over the ranks
keeping the same experts, as ZeRO-1 shards the rest (docs/moe.md).

    shards = ExpertShards(model, layout, cfg.optim, dtype)   # after build_model split them
    ... backward passes ...
    shards.reduce_gradients()          # before DeepSpeed's step: reduce-scattered over the replicas
    engine.step()                      # FusedAdamWClip's norm adds shards.squared_norm()
    shards.step(dense.last_norm_sq)    # the same global norm clips the experts; all-gathered back

DeepSpeed never sees these tensors: they are not parameters of the module (moe.Experts
holds them as plain tensors), so its data-parallel reduction, its ZeRO partitions and its
checkpoint files are the dense model's alone, and megatrain does for the experts what
DeepSpeed's MoE support does for its own layer class only. A rank's experts live in one
flat buffer in the training dtype (the tensors the layers use are views of it), their
gradients summed in an fp32 one; the R = data-parallel / E ranks keeping the same experts
("replicas") each own 1/R of them: the gradients are reduce-scattered over them (divided by
the data-parallel size, as DeepSpeed averages the rest), each rank's slice joins the global
norm (every expert once), an AdamW of their own (the same kernel) steps the slice's fp32
masters (the slice itself when the weights are fp32), and the slices are all-gathered
back. Checkpoints keep each rank's slice (masters and moments) in its megatrain-rankNNNNN.pt;
the layout-free form has the experts whole, under the plain model's names (layout_free.py).
"""

from __future__ import annotations

import functools
import itertools
import math

import torch

from megatrain.files import Deferred
from megatrain.layout import Layout
from megatrain.model.moe import MoE
from megatrain.optim import FusedAdamWClip
from megatrain.train import distributed as dist
from megatrain.train.optimizer import CONSTRUCTION_LR

KINDS = ("param", "exp_avg", "exp_avg_sq")
WEIGHTS = ("fc", "proj")  # moe.Experts' tensors


class ExpertShards:
    def __init__(self, model: torch.nn.Module, layout: Layout, optim, dtype: torch.dtype):
        """The experts build_model left in `model`'s MoE layers (this rank's rows), and the
        training dtype the layers compute in; collective (it makes the groups of replicas)."""
        places = [
            (f"{prefix}.experts.{key}", layer.experts, key)
            for prefix, layer in model.named_modules()
            if isinstance(layer, MoE)
            for key in WEIGHTS
        ]
        self.names = [name for name, _, _ in places]
        self.shapes = [tuple(getattr(experts, key).shape) for _, experts, key in places]
        self.place, self.size = layout.ep_rank, layout.expert_parallel
        self.data_parallel = layout.data_parallel
        self.replicas = layout.data_parallel // self.size
        self.replica = layout.dp_rank // self.size  # which slice this rank owns
        self.replica_group = dist.expert_replicas(layout)
        self.numel = sum(getattr(experts, key).numel() for _, experts, key in places)
        self.slice_numel = -(-self.numel // self.replicas)
        device = getattr(places[0][1], places[0][2]).device
        # The weights in the training dtype; gradients summed in fp32 (as DeepSpeed's bf16
        # optimizers sum theirs), into the flat buffer itself when the weights are fp32, else
        # by a hook after each backward pass.
        self.flat = torch.zeros(self.slice_numel * self.replicas, dtype=dtype, device=device)
        self.flat_grad = torch.zeros_like(self.flat, dtype=torch.float32)
        offset = 0
        for (_, experts, key), shape in zip(places, self.shapes, strict=True):
            n = getattr(experts, key).numel()
            self.flat[offset : offset + n].copy_(getattr(experts, key).detach().reshape(-1))
            # A leaf viewing the flat buffer: the layers use it, and the reduction moves one buffer.
            view = self.flat[offset : offset + n].view(shape).requires_grad_()
            grad = self.flat_grad[offset : offset + n].view(shape)
            if dtype == torch.float32:
                view.grad = grad  # autograd accumulates into it in place
            else:
                view.register_post_accumulate_grad_hook(functools.partial(_add_into, grad))
            setattr(experts, key, view)
            offset += n
        lo = self.replica * self.slice_numel
        self.param_slice = self.flat[lo : lo + self.slice_numel]
        # What the optimizer steps: this rank's slice, or its fp32 copy (the masters) when the
        # weights are 16-bit; its gradient the slice's, reduced.
        self.master = self.param_slice if dtype == torch.float32 else self.param_slice.float()
        self.master.grad = self.flat_grad if self.replicas == 1 else torch.zeros_like(self.master)
        self.optimizer = FusedAdamWClip(
            [self.master],
            lr=CONSTRUCTION_LR,
            betas=tuple(optim.betas),
            eps=optim.eps,
            weight_decay=optim.weight_decay,  # matmul weights: decayed, as in the dense groups
            max_grad_norm=optim.grad_clip,
        )

    def rows(self, whole: int) -> tuple[int, int]:
        """This rank's experts [lo, hi) of `whole`."""
        local = whole // self.size
        return self.place * local, (self.place + 1) * local

    # --- one optimizer step ------------------------------------------------------------

    @torch.no_grad()
    def reduce_gradients(self) -> None:
        """This rank's slice of the gradients summed over its replicas, divided by the
        data-parallel size: the mean over every rank's batch, as for the dense parameters
        (each rank's gradient covers the tokens its expert-parallel group sent it)."""
        self.flat_grad.div_(self.data_parallel)
        if self.replica_group is not None:
            group = self.replica_group
            torch.distributed.reduce_scatter_single(self.master.grad, self.flat_grad, group=group)

    @torch.no_grad()
    def squared_norm(self) -> torch.Tensor:
        """The experts' share of the global squared gradient norm (after reduce_gradients):
        every rank's slice, every expert once. Collective over every rank."""
        squares = self.optimizer.sum_squares([self.master.grad], self.flat.device)
        torch.distributed.all_reduce(squares)
        return squares

    @torch.no_grad()
    def step(self, norm_sq: torch.Tensor | None) -> None:
        """AdamW on this rank's slice, clipped by the global squared norm `norm_sq` (None:
        the step was skipped, as DeepSpeed skipped the rest of the model's), then every
        replica's slice gathered."""
        if norm_sq is not None:
            self.optimizer.step(norm_sq=norm_sq)
            self._gather()
        self.flat_grad.zero_()

    def _gather(self) -> None:
        """Every replica's slice of the weights from their masters."""
        if self.master is not self.param_slice:
            self.param_slice.copy_(self.master)
        if self.replica_group is not None:
            torch.distributed.all_gather_single(self.flat, self.param_slice, group=self.replica_group)

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    # --- state -----------------------------------------------------------------------------

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every training tensor, by a key the train module's rollback points use (moments
        under "opt.state.": zeroed when restoring a point taken before they existed)."""
        out = {"experts.flat": self.flat, "experts.master": self.master}
        for key, value in self.optimizer.state.get(self.master, {}).items():
            out[f"opt.state.experts.{key}"] = value
        return out

    def state_dict(self) -> dict:
        """This rank's slice of its experts' weights and moments, and where it lies, on the
        host (a checkpoint's rank file)."""
        state = self.optimizer.state.get(self.master, {})
        where = {k: getattr(self, k) for k in ("place", "size", "replica", "replicas", "names", "shapes")}
        return {
            **where,
            "step": int(state["step"].reshape(-1)[0]) if "step" in state else 0,
            "param": self.master.detach().to("cpu", copy=True),
            **{k: state[k].detach().to("cpu", copy=True) for k in KINDS[1:] if k in state},
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        """From a rank file this layout wrote (the same slice of the same experts)."""
        mine = (self.place, self.size, self.replica, self.replicas)
        theirs = (state["place"], state["size"], state["replica"], state["replicas"])
        if theirs != mine or state["names"] != self.names:
            raise RuntimeError(f"expert shards (place, size, replica, replicas) {theirs} loaded at {mine}")
        self._set(state["param"], [state.get(k) for k in KINDS[1:]], state["step"])

    @torch.no_grad()
    def load_whole(self, whole, moments: bool, step: int) -> None:
        """From whole tensors: `whole(kind, name, lo, hi)` gives experts [lo, hi) of KIND/NAME
        (a layout-free file's slices); without `moments` the optimizer starts as new."""
        lo = self.replica * self.slice_numel

        def my_slice(kind: str) -> torch.Tensor:
            local = [
                whole(kind, name, *self.rows(shape[0] * self.size))
                for name, shape in zip(self.names, self.shapes, strict=True)
            ]
            flat = torch.cat([t.reshape(-1).float() for t in local])
            flat = torch.nn.functional.pad(flat, (0, self.flat.numel() - flat.numel()))
            return flat[lo : lo + self.slice_numel]

        self._set(my_slice("param"), [my_slice(k) if moments else None for k in KINDS[1:]], step)

    def _set(self, param: torch.Tensor, moments: list, step: int) -> None:
        self.master.copy_(param)
        self._gather()
        self.optimizer.state.clear()
        if all(m is not None for m in moments):
            device = self.flat.device
            self.optimizer.state[self.master] = {
                **{k: m.to(device, torch.float32).clone() for k, m in zip(KINDS[1:], moments, strict=True)},
                "step": torch.tensor(float(step), device=device),
            }


def _add_into(total: torch.Tensor, p: torch.Tensor) -> None:
    """After a backward pass reached `p`: its 16-bit gradient summed into `total` (fp32)."""
    total.add_(p.grad)
    p.grad = None


def whole_experts(states: list[list[dict]], kinds) -> dict[str, Deferred]:
    """The whole experts of a checkpoint from its ranks' states (ExpertShards.state_dict),
    states[place][replica]: {"KIND/NAME": fp32 tensor}, each made from the slices it spans."""
    first = states[0][0]
    shapes = [tuple(s) for s in first["shapes"]]
    sizes = [math.prod(s) for s in shapes]
    slice_numel = first["param"].numel()

    def span(place_states: list[dict], kind: str, start: int, n: int) -> torch.Tensor:
        parts, pos = [], start
        while pos < start + n:
            replica, at = divmod(pos, slice_numel)
            take = min(start + n - pos, slice_numel - at)
            parts.append(place_states[replica][kind][at : at + take])
            pos += take
        return torch.cat(parts)

    out = {}
    for kind in kinds:
        starts = itertools.accumulate([0, *sizes])
        for name, shape, start in zip(first["names"], shapes, starts, strict=False):
            n = math.prod(shape)

            def make(kind=kind, shape=shape, start=start, n=n):
                return torch.cat([span(place, kind, start, n).view(shape) for place in states])

            out[f"{kind}/{name}"] = Deferred((shape[0] * len(states), *shape[1:]), torch.float32, make)
    return out
