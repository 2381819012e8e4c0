"""Mixture of experts: the MLP of some blocks replaced by `experts` MLPs of which each token
uses `top_k`, chosen by a router (Shazeer et al. 2017; Switch, GShard, Mixtral, DeepSeek).

- The router: logits = x W_r (no bias), probabilities = softmax in fp32, the top_k experts
  per token, their probabilities as the weights of their outputs, renormalised to sum to 1
  when `renormalize` (Mixtral; Qwen3's norm_topk_prob).
- The experts: MLPs of the architecture's kind (gpt3: GELU; llama: SwiGLU, gate|up packed)
  of width `ffn_hidden` (narrower than the dense MLP for fine-grained experts), no biases,
  stored as two [experts, out, in] tensors (`fc`, `proj`: Hugging Face's 3D layout).
- Shared experts (DeepSeek): `shared` always-on experts, kept as one expert `shared` x as
  wide (the same sum), added to every token's output with weight 1.
- Losses, while training: the load-balancing loss experts * sum_e f_e P_e (Switch; f_e the
  share of the routed assignments that chose expert e, P_e its mean probability; 1 when
  balanced) and the router z-loss mean(logsumexp(logits)^2) (ST-MoE), times their
  coefficients, added to the model's loss.
- Dropless by default: every assignment is computed. With a capacity factor c (training
  only; evaluation and generation stay dropless, as the exported model is), each expert
  takes at most ceil(c * tokens * top_k / experts) assignments, first choices of every token
  before second ones (GShard), in token order; the rest are dropped (their share of the
  output is zero, the residual carries the token) and counted.

Dispatch: the assignments sorted by expert, one matmul per expert over its rows (in bf16 on
a GPU, torch's grouped GEMM: every expert in one kernel). With expert
parallelism (`ExpertParallel`), the E ranks of a group each compute a slice of the experts:
the sorted rows go by all-to-all to the ranks of their experts, and their outputs come back
the same way (autograd runs both exchanges backwards). A rank then keeps only its own
experts' weights (`Experts.offset`: the first it holds; train/expert_shards.py owns them),
except under ZeRO-3, where they stay parameters of every rank that ZeRO partitions as it
partitions the rest.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class Routing:
    """One MoE layer's routing of N tokens: the probabilities [N, E] (fp32), the chosen
    experts and their weights [N, k], and which assignments are kept [N, k] (None: all, dropless)."""

    logits: torch.Tensor
    probs: torch.Tensor
    experts: torch.Tensor
    weights: torch.Tensor
    kept: torch.Tensor | None


def route(logits: torch.Tensor, top_k: int, renormalize: bool, capacity: int | None = None) -> Routing:
    """Top-k softmax routing of router logits [N, E]; `capacity`: assignments per expert at most."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # fp32 at least
    probs = logits.softmax(dim=-1)
    weights, experts = probs.topk(top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    kept = None
    if capacity is not None:
        # Each assignment's place in its expert's queue: first choices of all tokens, then seconds.
        by_priority = experts.t().reshape(-1)
        order = torch.argsort(by_priority, stable=True)
        counts = torch.bincount(by_priority, minlength=logits.shape[-1])
        starts = counts.cumsum(0) - counts
        place = torch.empty_like(by_priority)
        place[order] = torch.arange(len(order), device=logits.device) - starts[by_priority[order]]
        kept = (place < capacity).view(top_k, -1).t()
    return Routing(logits, probs, experts, weights, kept)


def balance_loss(routing: Routing) -> torch.Tensor:
    """Switch's load-balancing loss, E * sum_e f_e P_e: f_e from the routed assignments before
    any drop (not differentiable), P_e the mean router probability (differentiable)."""
    n_experts = routing.probs.shape[-1]
    counts = torch.bincount(routing.experts.reshape(-1), minlength=n_experts).to(routing.probs.dtype)
    return n_experts * (counts / routing.experts.numel() * routing.probs.mean(dim=0)).sum()


def router_z_loss(routing: Routing) -> torch.Tensor:
    """ST-MoE's router z-loss: mean over tokens of logsumexp(router logits)^2."""
    return routing.logits.logsumexp(dim=-1).pow(2).mean()


def capacity_of(capacity_factor: float, tokens: int, top_k: int, n_experts: int) -> int:
    return math.ceil(capacity_factor * tokens * top_k / n_experts)


def expert_mlp(x: torch.Tensor, fc: torch.Tensor, proj: torch.Tensor, gated: bool) -> torch.Tensor:
    """One expert on its rows x [M, d]: fc [gate*f, d], proj [d, f] (nn.Linear's layout)."""
    return F.linear(_activation(F.linear(x, fc), gated), proj)


def _activation(h: torch.Tensor, gated: bool) -> torch.Tensor:
    if gated:
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate) * up
    return F.gelu(h, approximate="tanh")


GROUPED_ROWS = 8  # grouped_mm wants 16-byte strides: rows padded to a multiple of 8 (bf16)


def uses_grouped_mm(rows: torch.Tensor, fc: torch.Tensor) -> bool:
    """torch's grouped GEMM (one kernel for every expert, no host sync for the split sizes)
    where it is built for: bf16 on CUDA (SM 8.0 and later), with 16-byte-aligned widths.
    Elsewhere a matmul per expert."""
    return (
        rows.is_cuda
        and rows.dtype == fc.dtype == torch.bfloat16
        and torch.cuda.get_device_capability(rows.device) >= (8, 0)
        and all(n % GROUPED_ROWS == 0 for n in fc.shape[1:])
    )


def grouped_experts(
    rows: torch.Tensor, counts: torch.Tensor, fc: torch.Tensor, proj: torch.Tensor, gated: bool
) -> torch.Tensor:
    """Every expert on its rows at once: rows [M, d] sorted by expert, counts [E] on the device."""
    offs = counts.cumsum(0).to(torch.int32)
    padded = F.pad(rows, (0, 0, 0, -rows.shape[0] % GROUPED_ROWS))  # rows past offs[-1] are ignored
    h = F.grouped_mm(padded, fc.transpose(-2, -1), offs=offs)
    return F.grouped_mm(_activation(h, gated), proj.transpose(-2, -1), offs=offs)[: rows.shape[0]]


class Experts(nn.Module):
    """`count` experts' weights as [count, out, in] tensors. Under expert parallelism a rank's
    may hold only its own experts, from expert `offset` on (tensors the expert shards own, not
    parameters of the module: train/expert_shards.py)."""

    def __init__(self, count: int, d_model: int, hidden: int, gated: bool):
        super().__init__()
        self.gated = gated
        self.fc = nn.Parameter(torch.empty(count, (2 if gated else 1) * hidden, d_model))
        self.proj = nn.Parameter(torch.empty(count, d_model, hidden))
        self.offset = 0

    def forward(
        self, rows: torch.Tensor, counts: torch.Tensor, first: int = 0, sizes: list[int] | None = None
    ) -> torch.Tensor:
        """rows [M, d] sorted by expert, counts[i] of them (a tensor on rows' device) for
        expert first + i; `sizes`: the counts on the host, when the caller already has them."""
        first -= self.offset
        fc, proj = self.fc[first : first + len(counts)], self.proj[first : first + len(counts)]
        if uses_grouped_mm(rows, fc):
            return grouped_experts(rows, counts, fc, proj, self.gated)
        if sizes is None:
            sizes = counts.tolist()  # host sync: the split sizes
        parts = rows.split(sizes)
        outs = [expert_mlp(part, fc[i], proj[i], self.gated) for i, part in enumerate(parts) if sizes[i]]
        if outs:
            return torch.cat(outs)
        # No rows for any of these experts (a rank whose experts got no tokens): an empty result
        # still tied to the weights, so that every rank's gradients exist (zeros) and every
        # rank's reduction sees the same tensors.
        return rows.new_zeros(0, proj.shape[1]) + fc[:0].sum() + proj[:0].sum()

    def every_row(self, x: torch.Tensor) -> torch.Tensor:
        """The first expert on every row (the shared experts, kept as one)."""
        return expert_mlp(x, self.fc[0], self.proj[0], self.gated)


class ExpertParallel:
    """This rank's expert-parallel group (torch.distributed), its size and its place in it:
    the rank at place p computes experts [p * E / size, (p + 1) * E / size)."""

    def __init__(self, group, size: int, place: int):
        self.group, self.size, self.place = group, size, place

    def run(self, experts: Experts, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """The experts' outputs for rows [M, d] sorted by expert (counts [E] on the device),
        computed where each expert lives; collective over the group."""
        import torch.distributed as dist
        from torch.distributed.nn.functional import all_to_all_single

        local = counts.numel() // self.size
        received = torch.empty_like(counts)  # [source, local expert]: rows each rank sends here
        dist.all_to_all_single(received, counts, group=self.group)
        by_source = received.view(self.size, local)
        # The split sizes on the host: the one sync of the exchange.
        per_expert = by_source.sum(0)
        sizes = torch.cat([counts.view(self.size, local).sum(1), by_source.sum(1), per_expert]).tolist()
        sent, came, mine = sizes[: self.size], sizes[self.size : 2 * self.size], sizes[2 * self.size :]
        inbound = all_to_all_single(rows.new_empty(sum(came), rows.shape[1]), rows, came, sent, self.group)
        # Arrived by source, then by expert: regrouped by expert (a stable sort on expert x sources
        # + source) for one matmul each, and put back before the return trip.
        key = (
            torch.arange(local, device=rows.device) * self.size
            + torch.arange(self.size, device=rows.device)[:, None]
        )
        regroup = torch.argsort(
            torch.repeat_interleave(key.reshape(-1), by_source.reshape(-1), output_size=sum(came)),
            stable=True,
        )
        out = experts(inbound[regroup], per_expert, first=self.place * local, sizes=mine)
        back = torch.empty_like(out).index_copy(0, regroup, out)
        return all_to_all_single(rows.new_empty(sum(sent), out.shape[1]), back, sent, came, self.group)


class MoE(nn.Module):
    """The MoE MLP of one block (see the module's docstring). While gradients are computed,
    `last` holds this forward's coefficient-weighted router losses (a tensor in the graph) and
    its statistics (detached, on the device): [balance, z, dropped, assignments, load per expert]."""

    def __init__(self, cfg):
        super().__init__()
        d, f = cfg.d_model, cfg.moe_ffn_hidden
        self.n_experts, self.top_k, self.renormalize = cfg.moe_experts, cfg.moe_top_k, cfg.moe_renormalize
        self.aux_loss, self.z_loss = cfg.moe_aux_loss, cfg.moe_z_loss
        self.capacity_factor = cfg.moe_capacity_factor
        self.router = nn.Linear(d, self.n_experts, bias=False)
        self.experts = Experts(self.n_experts, d, f, cfg.gated)
        # The shared experts as one expert that many times wider, which every token uses.
        self.shared = Experts(1, d, cfg.moe_shared_experts * f, cfg.gated) if cfg.moe_shared_experts else None
        self.drop = nn.Dropout(cfg.dropout)
        self.last: tuple[torch.Tensor, torch.Tensor] | None = None
        self.expert_parallel: ExpertParallel | None = None  # set by the trainer's build

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        training = self.training and torch.is_grad_enabled()
        capacity = None
        if training and self.capacity_factor is not None:
            capacity = capacity_of(self.capacity_factor, x.shape[0], self.top_k, self.n_experts)
        routing = route(self.router(x), self.top_k, self.renormalize, capacity)
        y = self.dispatch(x, routing)
        if self.shared is not None:
            y = y + self.shared.every_row(x)
        if training:
            self.last = self._losses_and_stats(routing)
        return self.drop(y).view(shape)

    def dispatch(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        """sum over each token's kept assignments of weight * expert(x), one matmul per expert."""
        chosen = routing.experts.reshape(-1)
        order = torch.argsort(chosen, stable=True)
        if routing.kept is not None:  # boolean indexing: a host sync, only with a capacity
            order = order[routing.kept.reshape(-1)[order]]
        counts = torch.bincount(chosen[order], minlength=self.n_experts)
        token = order // self.top_k
        if self.expert_parallel is None:
            out = self.experts(x[token], counts)
        else:
            out = self.expert_parallel.run(self.experts, x[token], counts)
        weight = routing.weights.reshape(-1)[order].to(out.dtype)
        return torch.zeros_like(x).index_add_(0, token, out * weight[:, None])

    def _losses_and_stats(self, routing: Routing) -> tuple[torch.Tensor, torch.Tensor]:
        balance, z = balance_loss(routing), router_z_loss(routing)
        loss = self.aux_loss * balance + self.z_loss * z
        load = torch.bincount(routing.experts.reshape(-1), minlength=self.n_experts)
        dropped = (~routing.kept).sum() if routing.kept is not None else load.new_zeros(())
        assigned = load.new_tensor(routing.experts.numel())
        head = torch.stack([balance.detach(), z.detach(), dropped, assigned]).double()
        return loss, torch.cat([head, load.double()])


STATS_HEAD = 4  # balance, z, dropped, assigned; then the load of each expert


def load_shares(stats: torch.Tensor) -> torch.Tensor:
    """[layers, experts]: each expert's share of its layer's routed assignments (1/experts each
    when balanced), from statistics [layers, STATS_HEAD + experts] summed over a step."""
    load = stats[:, STATS_HEAD:]
    return load / load.sum(dim=1, keepdim=True).clamp(min=1)


def router_metrics(stats: torch.Tensor, blocks: list[int], histogram: bool = False) -> dict:
    """A metrics row's MoE part from one step's statistics (host, float64; means over the
    global batch's micro-batches): the balance and z losses before their coefficients (mean
    over layers), the share of assignments dropped by the capacity, per MoE block (by its
    index) the smallest and largest expert's share of the assignments, and with `histogram`
    every expert's share (`moe_load`: {block: [shares]})."""
    shares = load_shares(stats)
    row = {
        "moe_balance": float(stats[:, 0].mean()),
        "moe_z": float(stats[:, 1].mean()),
        "moe_dropped": float(stats[:, 2].sum() / stats[:, 3].sum()),
    }
    for block, layer in zip(blocks, shares, strict=True):
        row[f"moe_load_min/{block}"], row[f"moe_load_max/{block}"] = float(layer.min()), float(layer.max())
    if histogram:
        row["moe_load"] = {str(block): layer.tolist() for block, layer in zip(blocks, shares, strict=True)}
    return row
