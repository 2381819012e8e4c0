"""Work the ranks do together: a failure on one rank reaches every rank
(distributed.on_every_rank), and a file they write between them (layout_free.write_shared)
is the one file one process writes, or is not there at all. Two real processes in a Gloo
process group."""

from __future__ import annotations

import json
import traceback

import pytest
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp
from safetensors.torch import save

from megatrain.errors import UserError
from megatrain.files import Deferred, file_sha256
from megatrain.train import distributed as dist
from megatrain.train import layout_free

TENSORS = {
    "a": torch.arange(12, dtype=torch.float32).reshape(3, 4),
    "b": torch.ones(5, dtype=torch.float64),
    "c": torch.full((7,), 2.0),
}


def _rank(rank: int, tmp_path, case: str) -> None:
    torch_dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path}/rendezvous", rank=rank, world_size=2
    )
    try:
        outcome = {"result": _case(rank, tmp_path, case)}
    except Exception as e:  # noqa: BLE001 (what each rank raised is the result)
        outcome = {"raised": type(e).__name__, "message": str(e), "trace": traceback.format_exc()}
    (tmp_path / f"rank{rank}.json").write_text(json.dumps(outcome))
    torch_dist.barrier()
    torch_dist.destroy_process_group()


def _case(rank: int, tmp_path, case: str):
    if case == "initial values drawn in turn":
        return _drawn_in_turn()
    if case == "user error on rank 1":
        return dist.on_every_rank(lambda: _fail(UserError("data.bin: damaged")) if rank == 1 else rank)
    if case == "crash on rank 0":
        return dist.on_every_rank(lambda: _fail(OSError("disk full")) if rank == 0 else rank)
    if case == "all well":
        return dist.on_every_rank(lambda: rank * 10)
    tensors = dict(TENSORS)
    if case == "write fails on rank 1":  # "a" is written by rank 0, "c" (placed last) by rank 1
        tensors["c"] = Deferred(
            (7,), torch.float32, lambda: _fail(UserError("the checkpoint is inconsistent"))
        )
    return layout_free.write_shared(
        tmp_path / "out.safetensors", tensors, {"format": "test/1"}, progress="test"
    )


def _drawn_in_turn() -> dict:
    from megatrain.model import GPTConfig, gpt
    from megatrain.train import build

    drawn = []

    def counting(*args, **kwargs):
        for offset, values in gpt.initial_value_pieces(*args, **kwargs):
            drawn.append(offset)
            yield offset, values

    build.initial_value_pieces = counting
    cfg = GPTConfig(vocab_size=64, seq_len=8, n_layer=1, n_head=2, d_model=8)
    shape, name = (7, 143), "blocks.0.mlp.fc.weight"  # 1001 elements: 11 pieces of 100
    value = build.initial_value_drawn_in_turn(name, shape, cfg, torch.device("cpu"), piece=100)
    return {"equal": torch.equal(value, gpt.initial_value(name, shape, cfg, piece=100)), "drawn": drawn}


def _fail(e: Exception):
    raise e


def _run(tmp_path, case: str) -> list[dict]:
    mp.start_processes(_rank, args=(tmp_path, case), nprocs=2, start_method="spawn")
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.parametrize(
    "case, raised, message",
    [
        ("user error on rank 1", ["UserError", "UserError"], ["data.bin: damaged", "data.bin: damaged"]),
        ("crash on rank 0", ["OSError", "RuntimeError"], ["disk full", "rank 0 failed: disk full"]),
        ("all well", [None, None], [None, None]),
    ],
)
def test_a_failure_on_one_rank_is_raised_on_every_rank(tmp_path, case, raised, message):
    outcomes = _run(tmp_path, case)
    assert [o.get("raised") for o in outcomes] == raised
    assert [o.get("message") for o in outcomes] == message
    if case == "all well":
        assert [o["result"] for o in outcomes] == [0, 10]


def test_two_ranks_write_one_file_or_none(tmp_path):
    out = tmp_path / "out.safetensors"
    entries = [o["result"] for o in _run(tmp_path, "shares")]
    assert out.read_bytes() == save(TENSORS, metadata={"format": "test/1"})
    entry = entries[0]
    assert entries[1] == entry and entry["bytes"] == out.stat().st_size and len(entry["parts"]) == 2
    start = 0
    for part in entry["parts"]:  # each rank's hash of what it wrote is the hash of those bytes
        assert part["sha256"] == file_sha256(out, start, part["bytes"])
        start += part["bytes"]
    assert start == entry["bytes"]

    out.unlink()
    outcomes = _run(tmp_path, "write fails on rank 1")
    assert [o["raised"] for o in outcomes] == ["UserError", "UserError"]
    assert all(o["message"] == "the checkpoint is inconsistent" for o in outcomes)
    assert not out.exists() and not (tmp_path / "out.safetensors.tmp").exists()


def test_initial_values_are_drawn_in_turn_and_summed(tmp_path):
    """Under ZeRO 0-2 and tensor parallelism the ranks draw a parameter's pieces in turn and
    sum them (build.initial_value_drawn_in_turn): each rank draws its half, and both get
    the value one process draws whole, bitwise."""
    results = [r["result"] for r in _run(tmp_path, "initial values drawn in turn")]
    assert all(r["equal"] for r in results)
    drawn = sorted(offset for r in results for offset in r["drawn"])
    assert drawn == list(range(0, 1001, 100)) and {len(r["drawn"]) for r in results} == {5, 6}
