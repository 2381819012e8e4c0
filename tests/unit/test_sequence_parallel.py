"""Sequence parallelism's region entry and exit against a float64 reference on the whole
sequence, forward and backward: two real processes in a Gloo group each hold half the
sequence and half the MLP (its first layer by output columns, its second by input rows),
the LayerNorm and the second layer's bias whole, their gradients summed over the group."""

from __future__ import annotations

import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from megatrain.model.sequence_parallel import column_linear, row_linear, sum_gradients
from megatrain.train.distributed import free_port

B, S, D, H = 3, 8, 6, 10  # batch, sequence, model width, MLP width


def _case() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    shapes = {"x": (B, S, D), "ln": (D,), "w1": (H, D), "b1": (H,), "w2": (D, H), "b2": (D,), "up": (B, S, D)}
    return {k: torch.randn(*shape, generator=g, dtype=torch.float64) for k, shape in shapes.items()}


def _block(x, ln, w1, b1, w2, b2, first, second):
    """The residual MLP of a block, its two linears given."""
    h = F.layer_norm(x, (D,), ln)
    return x + second(F.gelu(first(h, w1, b1)), w2, b2)


def _reference():
    t = {k: v.clone().requires_grad_() for k, v in _case().items() if k != "up"}
    y = _block(t["x"], t["ln"], t["w1"], t["b1"], t["w2"], t["b2"], F.linear, F.linear)
    (y * _case()["up"]).sum().backward()
    return y.detach(), {k: v.grad for k, v in t.items()}


def _rank(rank: int, port: int, out) -> None:
    torch_dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    c, seq, cols = (
        _case(),
        slice(rank * S // 2, (rank + 1) * S // 2),
        slice(rank * H // 2, (rank + 1) * H // 2),
    )
    mine = {
        "x": c["x"][:, seq],
        "ln": c["ln"],
        "w1": c["w1"][cols],
        "b1": c["b1"][cols],
        "w2": c["w2"][:, cols],
        "b2": c["b2"],
    }
    mine = {k: v.clone().requires_grad_() for k, v in mine.items()}
    sum_gradients([mine["ln"], mine["b2"]], None)  # the parameters both ranks keep whole

    def first(h, w, b):
        return column_linear(h, w, b, None)

    def second(h, w, b):
        return row_linear(h, w, b, None)

    y = _block(mine["x"], mine["ln"], mine["w1"], mine["b1"], mine["w2"], mine["b2"], first, second)
    (y * c["up"][:, seq]).sum().backward()
    out[rank] = (y.detach(), {k: v.grad for k, v in mine.items()})
    torch_dist.destroy_process_group()


def test_sequence_parallel_block_matches_the_whole_sequence_in_float64():
    with mp.Manager() as manager:
        out = manager.dict()
        mp.start_processes(_rank, args=(free_port(), out), nprocs=2, start_method="spawn")
        results = dict(out)
    y, grads = _reference()
    (y0, g0), (y1, g1) = results[0], results[1]
    assert y0.shape == (B, S // 2, D)  # each rank keeps its half of the sequence
    assert torch.allclose(torch.cat([y0, y1], dim=1), y, rtol=1e-12, atol=1e-12)
    assert torch.allclose(torch.cat([g0["x"], g1["x"]], dim=1), grads["x"], rtol=1e-12, atol=1e-12)
    assert torch.allclose(torch.cat([g0["w1"], g1["w1"]]), grads["w1"], rtol=1e-12, atol=1e-12)
    assert torch.allclose(torch.cat([g0["b1"], g1["b1"]]), grads["b1"], rtol=1e-12, atol=1e-12)
    assert torch.allclose(torch.cat([g0["w2"], g1["w2"]], dim=1), grads["w2"], rtol=1e-12, atol=1e-12)
    for whole in ("ln", "b2"):  # summed over the group: both ranks hold the whole sequence's gradient
        assert torch.allclose(g0[whole], grads[whole], rtol=1e-12, atol=1e-12)
        assert torch.equal(g0[whole], g1[whole])
