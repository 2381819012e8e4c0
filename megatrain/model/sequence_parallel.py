"""Megatron's sequence parallelism (Korthikanti et al. 2022) within a tensor-parallel group:
between the tensor-parallel regions (the norms, dropouts, residual adds, the final norm) each
of the T ranks keeps 1/T of the sequence, [B, S/T, d], instead of all of it.

    region entry  (column-parallel linear: q|k|v, the MLP's first layer, the logits):
                  all-gather the sequence forward, reduce-scatter the gradient backward
    region exit   (row-parallel linear: attention's output, the MLP's second layer, the
                  embedding's lookups summed over the vocabulary shards):
                  reduce-scatter forward, all-gather the gradient backward

in place of tensor parallelism's all-reduces (an all-reduce is a reduce-scatter then an
all-gather: the same traffic). Rank r keeps positions [r S/T, (r+1) S/T). The parameters every
rank keeps whole (norms, row-parallel biases, position embeddings, QK-norm's scales) then
see only their rank's positions or heads: their gradients are summed over the group
(`sum_gradients`).

The linears are AutoTP's layers; the wall (ds_internals.sequence_parallel_linears) has them
call `column_linear` and `row_linear` below.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def _gather(x: torch.Tensor, group) -> torch.Tensor:
    """[B, s, ...] from every rank of `group`, concatenated along the sequence: [B, T s, ...]."""
    size = dist.get_world_size(group)
    local = x.transpose(0, 1).contiguous()  # the collectives concatenate along dim 0
    out = local.new_empty((size * local.shape[0], *local.shape[1:]))
    dist.all_gather_into_tensor(out, local, group=group)
    return out.transpose(0, 1)


def _reduce_scatter(x: torch.Tensor, group) -> torch.Tensor:
    """[B, S, ...] summed over `group`, each rank keeping its 1/T of the sequence."""
    size = dist.get_world_size(group)
    whole = x.transpose(0, 1).contiguous()
    out = whole.new_empty((whole.shape[0] // size, *whole.shape[1:]))
    dist.reduce_scatter_tensor(out, whole, group=group)
    return out.transpose(0, 1).contiguous()  # a pipeline stage sends it on: contiguous


class _ReduceScatterSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group):
        ctx.group = group
        return _reduce_scatter(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _gather(grad, ctx.group), None


def reduce_scatter_sequence(x: torch.Tensor, group) -> torch.Tensor:
    """Region exit: each rank's partial sums [B, S, ...] -> their sum on this rank's [B, S/T, ...]."""
    return _ReduceScatterSequence.apply(x, group)


class _ColumnLinear(torch.autograd.Function):
    """F.linear of the gathered sequence, keeping only this rank's slice x for the backward
    pass, which gathers it again (as Megatron does): keeping the gathered input would undo
    what the split saves."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, group):
        ctx.group, ctx.bias_dtype = group, None if bias is None else bias.dtype
        ctx.save_for_backward(x, weight)
        return F.linear(_gather(x, group), weight, bias)  # under autocast, in its dtype

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        whole = _gather(x, ctx.group).to(grad.dtype)  # the forward's matmul dtype (autocast)
        grad_input = _reduce_scatter(grad.matmul(weight.to(grad.dtype)), ctx.group).to(x.dtype)
        rows = grad.reshape(-1, grad.shape[-1])
        grad_weight = rows.t().matmul(whole.reshape(-1, whole.shape[-1])).to(weight.dtype)
        grad_bias = None if ctx.bias_dtype is None else rows.sum(0).to(ctx.bias_dtype)
        return grad_input, grad_weight, grad_bias, None


def column_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, group) -> torch.Tensor:
    """A column-parallel linear (this rank's output columns) entered from a sequence slice."""
    return _ColumnLinear.apply(x, weight, bias, group)


def row_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, group) -> torch.Tensor:
    """A row-parallel linear (this rank's input rows) leaving on a sequence slice; the bias,
    kept whole, is added once, after the sum."""
    out = reduce_scatter_sequence(F.linear(x, weight), group)
    return out if bias is None else out + bias


def sum_gradients(params, group) -> None:
    """Sum the gradients of `params` (the parameters every rank keeps whole) over `group` as
    they are computed, before they are accumulated."""

    def hook(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad, group=group)
        return grad

    for p in params:
        p.register_hook(hook)
