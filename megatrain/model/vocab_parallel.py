"""The cross-entropy of an output layer whose vocabulary is split over a tensor-parallel group
(Megatron's vocab-parallel cross-entropy, Shoeybi et al. 2019): each rank holds the logits
of its contiguous slice of the vocabulary, [N, V / T], and the full-vocabulary logits are
never gathered. Three all-reduces of N numbers each replace them: the row maximum (for a
stable softmax), the sum of exponentials, and the target's logit (held by one rank, zero on
the others). The backward pass needs no communication: each rank's gradient is
softmax - one-hot on its own slice.

It returns what LMLoss computes from whole logits (gpt.py): the mean cross-entropy over the
tokens whose target is not IGNORE, and the mean over all tokens of log(Z)^2 (PaLM's z-loss,
Z the softmax's normaliser), so that the caller weights z as it does today.

VocabParallel holds a rank's slice and does the three things that use it (gpt.py calls them
when the trainer has set one on the model, under tensor parallelism): the embedding lookup
of the tokens in its slice (zeros for the others) summed over the group, the logits of its
slice (the hidden states' gradient summed over the group in the backward pass), and this
loss.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatrain.model.sequence_parallel import column_linear, reduce_scatter_sequence

IGNORE = -100  # as F.cross_entropy's default ignore_index


def vocab_range(vocab_size: int, rank: int, size: int) -> tuple[int, int]:
    """[start, stop) of the vocabulary slice tensor-parallel rank `rank` of `size` holds."""
    if vocab_size % size:
        raise ValueError(f"a vocabulary of {vocab_size} does not split over {size} tensor-parallel ranks")
    per = vocab_size // size
    return rank * per, (rank + 1) * per


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, start: int, group):
        ctx.dtype = logits.dtype
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        row_max = logits.max(dim=-1).values
        dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
        exp = (logits - row_max[:, None]).exp()
        sum_exp = exp.sum(dim=-1)
        dist.all_reduce(sum_exp, group=group)
        local = targets - start
        mine = (local >= 0) & (local < logits.shape[-1])  # this rank holds the target's logit
        local = torch.where(mine, local, torch.zeros_like(local))
        target_logit = logits.gather(1, local[:, None]).squeeze(1) * mine
        dist.all_reduce(target_logit, group=group)
        lse = sum_exp.log() + row_max  # log Z
        counted = targets != IGNORE
        n = counted.sum().clamp(min=1)
        ce = ((lse - target_logit) * counted).sum() / n
        z = lse.pow(2).mean()
        ctx.save_for_backward(exp / sum_exp[:, None], local, mine, counted, lse, n)
        return ce, z

    @staticmethod
    def backward(ctx, grad_ce: torch.Tensor, grad_z: torch.Tensor):
        softmax, local, mine, counted, lse, n = ctx.saved_tensors
        # d ce / d logits = (softmax - one-hot) / n on the counted rows; d z / d logits = 2 log Z
        # softmax / N on every row.
        rows = counted.to(softmax.dtype) * (grad_ce / n)
        grad = softmax * (rows + grad_z * 2 * lse / lse.numel())[:, None]
        # The one-hot on the rows whose target this rank holds (elsewhere a zero added at column
        # 0): a scatter, not a boolean index, which would sync the host on a GPU.
        grad.scatter_add_(1, local[:, None], -(rows * mine)[:, None])
        return grad.to(ctx.dtype), None, None, None


def vocab_parallel_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, start: int, group=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean cross-entropy over the targets that are not IGNORE, mean log(Z)^2 over all
    rows) of logits [N, V / T] holding vocabulary [start, start + V / T) of `group`'s ranks
    (vocab_range), targets [N] of the whole vocabulary. Collective over `group`."""
    return _VocabParallelCrossEntropy.apply(logits, targets, start, group)


class _SumOverGroup(torch.autograd.Function):
    """Forward: the sum over the group; backward: the gradient as it is (Megatron's
    reduce_from_tensor_model_parallel_region)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group):
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


class _SumGradientOverGroup(torch.autograd.Function):
    """Forward: the input as it is; backward: the gradient summed over the group (Megatron's
    copy_to_tensor_model_parallel_region)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class VocabParallel:
    """Rank `rank` of a tensor-parallel group of `size` (torch.distributed `group`) holds rows
    [start, stop) of the token embedding (and of an untied output head). With
    `sequence_parallel` the hidden states outside the tensor-parallel regions are this rank's
    1/size of the sequence (model/sequence_parallel.py): the lookups are reduce-scattered to
    it, and the logits computed from the whole sequence gathered back."""

    def __init__(self, group, rank: int, size: int, vocab_size: int, sequence_parallel: bool = False):
        self.group, self.rank = group, rank
        self.start, self.stop = vocab_range(vocab_size, rank, size)
        self.sequence_parallel = sequence_parallel

    def embed(self, idx: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The embeddings of tokens `idx` [B, S] (whole vocabulary) from this rank's rows
        `weight`: [B, S, d], or with sequence parallelism this rank's [B, S/size, d]."""
        local = idx - self.start
        inside = (local >= 0) & (idx < self.stop)
        rows = F.embedding(torch.where(inside, local, torch.zeros_like(local)), weight)
        rows = rows * inside[..., None].to(rows.dtype)
        if self.sequence_parallel:
            return reduce_scatter_sequence(rows, self.group)
        return _SumOverGroup.apply(rows, self.group)

    def first_position(self, local_length: int) -> int:
        """The position of this rank's first hidden state (its slice's start with sequence
        parallelism, else 0), for the position embeddings."""
        return self.rank * local_length if self.sequence_parallel else 0

    def logits(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """This rank's slice of the logits, [..., stop - start], of the whole sequence."""
        if self.sequence_parallel:  # a column-parallel linear entered from the slice
            return column_linear(x, weight, None, self.group)
        return F.linear(_SumGradientOverGroup.apply(x, self.group), weight)

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """vocab_parallel_cross_entropy of this rank's logits [..., V / T] and targets [...]."""
        return vocab_parallel_cross_entropy(
            logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), self.start, self.group
        )


def lookup(rows: VocabParallel | None, idx: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """A token table's embeddings of `idx`: the whole table's (rows None), or under tensor
    parallelism this rank's rows', summed over the group."""
    return F.embedding(idx, weight) if rows is None else rows.embed(idx, weight)


def project(rows: VocabParallel | None, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Logits from a vocabulary table (tied, or an untied head's): the whole vocabulary's, or
    this rank's slice."""
    return F.linear(x, weight) if rows is None else rows.logits(x, weight)
