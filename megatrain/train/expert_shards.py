"""Expert parallelism's memory split: each rank keeps the weights, gradients and AdamW state
of the experts it computes, and nothing of the others (ZeRO 0-2; docs/moe.md).

    shards = ExpertShards(model, layout, cfg.optim, parallel)   # after build_model split them
    ... backward passes ...
    shards.reduce_gradients()          # before DeepSpeed's step: over the ranks holding the same experts
    engine.step()                      # FusedAdamWClip's norm adds shards.squared_norm()
    shards.step(dense.last_norm_sq)    # the same global norm clips the experts

DeepSpeed never sees these tensors: they are not parameters of the module (moe.Experts
holds them as plain fp32 tensors), so its data-parallel reduction, its ZeRO partitions and
its checkpoint files are the dense model's alone, and megatrain does for the experts what
DeepSpeed's MoE support does for its own layer class only: their gradients are summed
over the `world / E` ranks holding the same experts (and divided by the data-parallel size,
as DeepSpeed averages the rest), their norm joins the global one once per expert, and an
AdamW of their own (the same kernel, fp32 weights: no separate masters) steps them.
Checkpoints keep them in the rank files of the first expert-parallel group (ranks 0 to E - 1,
megatrain-rankNNNNN.pt: one copy of each expert), where every rank of the same place reads
them back; the layout-free form has them whole, under the plain model's names (layout_free.py).
"""

from __future__ import annotations

import torch

from megatrain.layout import Layout
from megatrain.model.moe import ExpertParallel, MoE
from megatrain.optim import FusedAdamWClip
from megatrain.train import distributed as dist
from megatrain.train.optimizer import CONSTRUCTION_LR

MOMENTS = ("exp_avg", "exp_avg_sq")
WEIGHTS = ("fc", "proj")  # moe.Experts' tensors


def held(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The routed experts' tensors a split model holds outside its parameters, by the plain
    model's names ("blocks.I.mlp.experts.fc"); {} when the experts are parameters."""
    return {
        f"{prefix}.experts.{key}": t
        for prefix, layer in model.named_modules()
        if isinstance(layer, MoE)
        for key in WEIGHTS
        if not isinstance(t := getattr(layer.experts, key), torch.nn.Parameter)
    }


class ExpertShards:
    def __init__(self, model: torch.nn.Module, layout: Layout, optim, parallel: ExpertParallel):
        """The shards of `model` (build_model split them: `held`), its expert-parallel group;
        collective (it makes the groups of ranks holding the same experts)."""
        self.shards = held(model)
        self.place, self.size = layout.ep_rank, layout.expert_parallel
        # The first expert-parallel group's ranks (global ranks 0 to E - 1: MoE layouts have
        # no tensor or pipeline axis) write the experts into checkpoints, one copy of each.
        self.writes_checkpoint = layout.rank < self.size
        self.data_parallel = layout.data_parallel
        self.replicas = dist.expert_replicas(layout)  # the ranks holding the same experts
        self.parallel = parallel.group  # one rank per place: every expert once
        self.optimizer = FusedAdamWClip(
            list(self.shards.values()),
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
        """Sum the gradients over the ranks holding the same experts, divided by the
        data-parallel size: the mean over every rank's batch, as for the dense parameters
        (each rank's gradient covers the tokens its expert-parallel group sent it)."""
        grads = [p.grad for p in self.shards.values()]
        flat = torch.cat([g.reshape(-1) for g in grads]).div_(self.data_parallel)
        if self.replicas is not None:
            torch.distributed.all_reduce(flat, group=self.replicas)
        for g, part in zip(grads, flat.split([g.numel() for g in grads]), strict=True):
            g.copy_(part.view_as(g))

    @torch.no_grad()
    def squared_norm(self) -> torch.Tensor:
        """The experts' share of the global squared gradient norm (after reduce_gradients):
        summed over one rank per place, every expert once. Collective over the expert-parallel group."""
        grads = [p.grad for p in self.shards.values()]
        squares = self.optimizer.sum_squares(grads, grads[0].device)
        torch.distributed.all_reduce(squares, group=self.parallel)
        return squares

    def step(self, norm_sq: torch.Tensor | None) -> None:
        """AdamW on this rank's experts, clipped by the global squared norm `norm_sq` (None:
        the step was skipped, as DeepSpeed skipped the rest of the model's)."""
        if norm_sq is not None:
            self.optimizer.step(norm_sq=norm_sq)
        for p in self.shards.values():
            p.grad = None

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    # --- state -----------------------------------------------------------------------------

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every training tensor, by a key the train module's rollback points use (moments
        under "opt.state.": zeroed when restoring a point taken before they existed)."""
        out = {f"experts.{name}": p.data for name, p in self.shards.items()}
        for name, p in self.shards.items():
            for key, value in self.optimizer.state.get(p, {}).items():
                out[f"opt.state.experts.{name}.{key}"] = value
        return out

    def state_dict(self) -> dict:
        """This rank's experts, moments and step count, on the host (a checkpoint's rank file)."""
        state = {"place": self.place, "size": self.size, "step": self.step_count()}
        for kind in ("param", *MOMENTS):
            state[kind] = {}
            for name, p in self.shards.items():
                t = p.data if kind == "param" else self.optimizer.state.get(p, {}).get(kind)
                if t is not None:
                    state[kind][name] = t.detach().to("cpu", copy=True)
        return state

    def step_count(self) -> int:
        states = [self.optimizer.state[p] for p in self.shards.values() if p in self.optimizer.state]
        return int(states[0]["step"].reshape(-1)[0]) if states else 0

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        """From a rank file this layout wrote (the same place among the same number)."""
        if (state["place"], state["size"]) != (self.place, self.size):
            raise RuntimeError(
                f"expert shards of place {state['place']} of {state['size']} loaded at place "
                f"{self.place} of {self.size}"
            )
        self._set(lambda kind, name: state[kind].get(name), state["step"])

    @torch.no_grad()
    def load_whole(self, whole, moments: bool, step: int) -> None:
        """From whole tensors: `whole(kind, name, lo, hi)` gives experts [lo, hi) of KIND/NAME
        (a layout-free file's slices); without `moments` the optimizer starts as new."""

        def mine(kind, name):
            if kind != "param" and not moments:
                return None
            return whole(kind, name, *self.rows(self._whole_experts(name)))

        self._set(mine, step)

    def _whole_experts(self, name: str) -> int:
        return self.shards[name].shape[0] * self.size

    def _set(self, source, step: int) -> None:
        self.optimizer.state.clear()
        for name, p in self.shards.items():
            p.copy_(source("param", name))
            moments = {kind: source(kind, name) for kind in MOMENTS}
            if all(m is not None for m in moments.values()):
                self.optimizer.state[p] = {k: m.to(p.device, torch.float32) for k, m in moments.items()}
        if self.optimizer.state:  # one count shared by every state, as FusedAdamWClip keeps it
            count = torch.tensor(float(step), device=next(iter(self.shards.values())).device)
            for st in self.optimizer.state.values():
                st["step"] = count
