"""The vocabulary-parallel cross-entropy against a float64 reference on whole logits, forward
and backward: two real processes in a Gloo group each hold half the vocabulary's logits;
targets in both halves and ignored ones; the cross-entropy and the z term with their own
upstream gradients, as the loss weights them."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from megatrain.model.vocab_parallel import IGNORE, vocab_parallel_cross_entropy, vocab_range
from megatrain.train.distributed import free_port

N, V, Z_WEIGHT = 24, 40, 0.3


def _case(dtype) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    logits = (torch.randn(N, V, generator=g, dtype=torch.float64) * 4).to(dtype)
    targets = torch.randint(0, V, (N,), generator=g)
    targets[[3, 11, 17]] = IGNORE
    return logits, targets


def _reference(logits: torch.Tensor, targets: torch.Tensor):
    """ce + Z_WEIGHT * z on whole float64 logits (LMLoss's terms) and its gradient."""
    whole = logits.double().requires_grad_()
    ce = F.cross_entropy(whole, targets, ignore_index=IGNORE)
    z = whole.logsumexp(dim=-1).pow(2).mean()
    (ce + Z_WEIGHT * z).backward()
    return ce.item(), z.item(), whole.grad


def _rank(rank: int, port: int, dtype, out) -> None:
    torch_dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    logits, targets = _case(dtype)
    start, stop = vocab_range(V, rank, 2)
    shard = logits[:, start:stop].clone().requires_grad_()
    ce, z = vocab_parallel_cross_entropy(shard, targets, start)
    (ce + Z_WEIGHT * z).backward()
    out[rank] = (ce.item(), z.item(), shard.grad.double())
    torch_dist.destroy_process_group()


@pytest.mark.parametrize("dtype, rel", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_vocab_parallel_cross_entropy_matches_a_float64_reference(dtype, rel):
    with mp.Manager() as manager:
        out = manager.dict()
        mp.start_processes(_rank, args=(free_port(), dtype, out), nprocs=2, start_method="spawn")
        results = dict(out)
    ce, z, grad = _reference(*_case(dtype))
    for rank in (0, 1):
        assert results[rank][:2] == pytest.approx((ce, z), rel=rel)
    joined = torch.cat([results[0][2], results[1][2]], dim=1)  # each rank's slice of the vocabulary
    assert torch.allclose(joined, grad, rtol=rel, atol=rel * grad.abs().max().item())


def test_a_vocabulary_that_does_not_split_is_refused():
    assert vocab_range(40, 1, 4) == (10, 20)
    with pytest.raises(ValueError, match="a vocabulary of 50 does not split over 4"):
        vocab_range(50, 0, 4)
