"""Resuming on another layout, through the real launcher: 20 steps on one layout, 10 on
another, against 30 uninterrupted steps on the first (the same global batch and data,
only the order of summation differs)."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import torch
from helpers import (
    LAUNCH,
    LAYOUTS,
    LONG,
    TINY_CONFIG,
    assert_same_state,
    copy_until,
    edit_megatrain_json,
    flat_state,
    pretrain,
    pretrain_command,
    run_script,
    samples_by_step,
    train_losses,
)

from megatrain.train import layout_free
from megatrain.train.checkpoint import Checkpointer
from megatrain.train.metrics import read_events, read_metrics

DESCRIBED = {
    "2r-zero1": "2 data-parallel rank(s), ZeRO-1",
    "1r-zero0": "1 data-parallel rank(s), ZeRO-0",
    "2r-zero3": "2 data-parallel rank(s), ZeRO-3",
    "1r-zero2": "1 data-parallel rank(s), ZeRO-2",
    "pipe2-zero1": "2 pipeline stages x 1 data-parallel rank(s), ZeRO-1",
    "2r-zero2": "2 data-parallel rank(s), ZeRO-2",
    "tp2-zero1": "tensor-parallel 2 x 1 data-parallel rank(s), ZeRO-1",
    "tp2pp2-zero1": "2 pipeline stages x tensor-parallel 2 x 1 data-parallel rank(s), ZeRO-1",
}


@pytest.mark.parametrize(
    "first, second",
    [
        ("2r-zero1", "1r-zero0"),
        ("1r-zero0", "2r-zero3"),
        ("pipe2-zero1", "1r-zero2"),
        ("2r-zero2", "tp2pp2-zero1"),
        ("tp2pp2-zero1", "1r-zero0"),
        ("tp2pp2-zero1", "2r-zero2"),
    ],
)  # 1 rank -> TP: tests/e2e/test_llama.py; TP alone -> 1 rank: conversion, test_tensor_parallel.py
def test_resume_on_another_layout_continues_exactly(uninterrupted, tmp_path, small_data, first, second):
    source = uninterrupted(first)
    run = copy_until(source / "run", tmp_path / "run", step=20)
    ckpt = run / "checkpoints" / "step-00000020"
    if (
        first == "pipe2-zero1"
    ):  # converted ahead of time, as launch/convert_checkpoint.py does for a big model
        proc = run_script("convert_checkpoint.py", run, "--layout-free")
        assert str(ckpt / layout_free.FILE) in proc.stdout
        how = "from its layout-free form"
    else:
        how = "converted to the layout-free form now"
    if (
        first == "2r-zero1"
    ):  # a conversion interrupted halfway: a temp file, an unlisted file; neither is used
        (ckpt / f"{layout_free.FILE}.tmp").write_bytes(b"partial")
        (ckpt / layout_free.FILE).write_bytes(b"not listed in the manifest")
    nproc, sets = LAYOUTS[second]
    # Written in the background (checkpoint.async_save): checkpoint 30 of every layout, the
    # pipeline's and ZeRO-3's included, is read back below against the source's.
    proc = pretrain(
        run,
        small_data,
        *sets,
        *LONG,
        "checkpoint.async_save=true",
        nproc=nproc,
        record_samples=tmp_path / "samples",
    )
    assert f"resharded step-00000020 from {DESCRIBED[first]} to {DESCRIBED[second]} ({how})" in proc.stdout
    reshards = [e for e in read_events(run) if e["event"] == "reshard"]
    assert len(reshards) == 1 and reshards[0]["checkpoint"].endswith("step-00000020")
    assert [e["step"] for e in read_events(run) if e["event"] == "checkpoint" and e.get("background")] == [30]

    reference = train_losses(source / "run")
    losses = train_losses(run)
    assert len(losses) == 30 and losses[:20] == reference[:20]  # the first 20 rows are the source's
    assert losses[20:] == pytest.approx(reference[20:], rel=1e-5)
    assert_same_state(flat_state(run, 30), flat_state(source / "run", 30), rel=1e-5)
    # The schedules' position, the sampler's and the spike guard's history carried over.
    resumed, reference_state = (
        Checkpointer.read_state(r / "checkpoints" / "step-00000030")["state"] for r in (run, source / "run")
    )
    assert resumed["progress"] == reference_state["progress"] and resumed["data"] == reference_state["data"]
    assert resumed["recovery"]["guard"]["history"]["loss"] == pytest.approx(
        reference_state["recovery"]["guard"]["history"]["loss"], rel=1e-5
    )
    # No sample twice, none lost: each step of 21-30 trains on the same set as the uninterrupted run.
    steps = range(21, 31)
    resumed = samples_by_step(tmp_path / "samples", steps=steps)
    assert sorted(resumed) == list(steps)
    assert resumed == samples_by_step(source / "samples", steps=steps)
    assert Checkpointer.verify(ckpt) is None  # the layout-free file is covered by the manifest
    if nproc == 2 and first != "pipe2-zero1":  # converted by both ranks, each writing and hashing its share
        entry = json.loads((ckpt / "manifest.json").read_text())["files"][layout_free.FILE]
        assert len(entry["parts"]) == 2 and sum(p["bytes"] for p in entry["parts"]) == entry["bytes"]
        with open(ckpt / layout_free.FILE, "r+b") as f:  # one bit flipped in the second share
            f.seek(entry["bytes"] - 1)
            last = f.read(1)[0]
            f.seek(entry["bytes"] - 1)
            f.write(bytes([last ^ 1]))
        problem = f"{ckpt / layout_free.FILE}: sha256 does not match the manifest (altered)"
        assert Checkpointer.verify(ckpt) == problem
        assert {Checkpointer.verify(ckpt, (0, 2)), Checkpointer.verify(ckpt, (1, 2))} == {
            None,
            problem,
        }  # one rank's


def test_zero3_checkpoint_resumes_without_zero(runs, tmp_path, small_data):
    """A ZeRO-3 source (parameters, moments in per-rank sub-group partitions) on 2 ranks ->
    plain data parallel on one rank, steps 4-6 against the uninterrupted run."""
    run = copy_until(runs(3, "fp32"), tmp_path / "run", step=3)
    proc = pretrain(run, small_data, "parallel.zero_stage=0", nproc=1)
    assert (
        "resharded step-00000003 from 2 data-parallel rank(s), ZeRO-3 to 1 data-parallel rank(s), ZeRO-0"
        in proc.stdout
    )
    assert train_losses(run) == pytest.approx(train_losses(runs(3, "fp32")), rel=1e-5)
    assert_same_state(flat_state(run, 6), flat_state(runs(3, "fp32"), 6), rel=1e-5)


def test_bf16_resumes_on_another_layout(runs, tmp_path, small_data):
    """bf16 with ZeRO-0 (DeepSpeed's fp32 copies are the masters) -> ZeRO-1 on one rank:
    close to the uninterrupted run (bf16 rounding, not summation order, sets the tolerance)."""
    run = copy_until(runs(0, "bf16"), tmp_path / "run", step=3)
    proc = pretrain(run, small_data, "train.precision=bf16", "parallel.zero_stage=1", nproc=1)
    assert (
        "resharded step-00000003 from 2 data-parallel rank(s), ZeRO-0 to 1 data-parallel rank(s), ZeRO-1"
        in proc.stdout
    )
    reference = train_losses(runs(0, "bf16"))
    assert train_losses(run) == pytest.approx(reference, rel=2e-2)


def test_a_layout_that_cannot_hold_the_global_batch_is_refused(runs, tmp_path, small_data):
    """The 512-token batch of 2 ranks x 4 x 32 cannot be made of micro-batches of 3 x 32 on one rank."""
    run = copy_until(runs(1, "fp32"), tmp_path / "run", step=6)
    before = {p: p.stat().st_mtime_ns for p in (run / "checkpoints").rglob("*")}
    proc = pretrain(
        run,
        small_data,
        "parallel.zero_stage=1",
        "train.micro_batch=3",
        "train.max_steps=8",
        nproc=0,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert (
        line.startswith("error: ")
        and "step-00000006: the run's global batch (512 tokens) cannot be split" in line
    )
    assert "3 x 32 x 1 = 96 tokens does not divide 512" in line
    assert "data-parallel sizes that can with micro_batch=3: none" in line
    assert {p: p.stat().st_mtime_ns for p in (run / "checkpoints").rglob("*")} == before  # nothing written
    proc = pretrain(
        run, small_data, "parallel.zero_stage=1", "train.micro_batch=8", "train.max_steps=7", nproc=0
    )
    assert (
        "resharded step-00000006 from 2 data-parallel rank(s), ZeRO-1 to 1 data-parallel rank(s), ZeRO-1"
        in proc.stdout
    )
    rows = [r for r in read_metrics(run) if r["kind"] == "train"]
    assert (
        rows[-1]["step"] == 7 and rows[-1]["batch_tokens"] == 512 and rows[-1]["grad_accum"] == 2
    )  # 2 x 8 x 32


def test_supervisor_continues_with_the_ranks_left_in_the_hostfile(uninterrupted, tmp_path, small_data):
    """Rank 1 dies while writing checkpoint 20 (its node lost) and the hostfile shrinks from 2
    slots to 1, as a scheduler would leave it: the supervisor relaunches on one rank, which
    reshards checkpoint 10 and trains on as the uninterrupted 2-rank run did."""
    hostfile, faults, run = tmp_path / "hosts", tmp_path / "faults", tmp_path / "run"
    hostfile.write_text("localhost slots=2\n")
    cmd = pretrain_command(
        TINY_CONFIG,
        [f"run.dir={run}", f"data.path={small_data}", "parallel.zero_stage=1", *LONG],
        nproc="{ranks}",
        faults=["checkpoint_write@20:1"],
        fault_state=faults,
    )
    cmd = [
        sys.executable,
        str(LAUNCH / "supervise.py"),
        "--max-restarts",
        "2",
        "--delay",
        "3",
        "--hostfile",
        str(hostfile),
        "--min-ranks",
        "1",
        "--",
        *cmd,
    ]
    log = tmp_path / "supervise.log"
    with open(log, "w") as out:
        sup = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 600
        while not (faults / "checkpoint_write@20.rank1").exists() and sup.poll() is None:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        hostfile.write_text("localhost slots=1\n")  # within the 3 s before the relaunch
        assert sup.wait(timeout=600) == 0, log.read_text()[-4000:]
    output = log.read_text()
    assert f"supervise: {hostfile}: 1 rank(s) (was 2: the run resumes on the new layout)" in output
    assert (
        "resharded step-00000010 from 2 data-parallel rank(s), ZeRO-1 to 1 data-parallel rank(s), ZeRO-1"
        in output
    )
    reference = train_losses(uninterrupted("2r-zero1") / "run")
    assert train_losses(run) == pytest.approx(reference, rel=1e-5)


def test_bf16_zero1_checkpoint_is_read_whole(runs):
    """ZeRO-1 in bf16 accumulates in fp32 through DeepSpeed's BF16_Optimizer, whose files
    DeepSpeed's own zero_to_fp32 does not read ("is not a zero checkpoint"): the layout-free
    reader does, and its fp32 masters round to the bf16 weights the model was saved with."""
    ckpt = runs(1, "bf16") / "checkpoints" / "step-00000006"
    assert list(ckpt.glob("bf16_zero_pp_rank_*_optim_states.pt"))
    ours, step = layout_free.read(ckpt)
    module = torch.load(ckpt / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    assert step == 6 and sorted(ours) == sorted(f"{kind}/{k}" for k in module for kind in layout_free.KINDS)
    assert all(torch.equal(ours[f"param/{k}"].bfloat16(), t) for k, t in module.items())


@pytest.mark.parametrize("stage, precision", [(1, "fp32"), (2, "bf16"), (3, "fp32")])
def test_layout_free_weights_are_zero_to_fp32s(runs, stage, precision):
    """The layout-free reader reassembles each parameter from the ranks' partitions itself
    (one parameter at a time); DeepSpeed's zero_to_fp32, which reassembles whole groups, is
    the reference: the same fp32 weights, bit for bit."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    checkpoints = runs(stage, precision) / "checkpoints"
    ours, _ = layout_free.read(checkpoints / "step-00000006", moments=False)
    theirs = get_fp32_state_dict_from_zero_checkpoint(str(checkpoints), tag="step-00000006")
    assert sorted(ours) == sorted(f"param/{k}" for k in theirs)
    assert all(torch.equal(ours[f"param/{k}"], t) for k, t in theirs.items())


def test_deepspeed_adamw_zero0_checkpoint_resumes_on_another_layout(tmp_path, small_data):
    """DeepSpeed's own AdamW (optim.name=adamw) under ZeRO-0 counts each parameter group's
    steps in its last parameter's state only (the others stay at 0): the count is read from
    there. 2 ranks ZeRO-0 -> 1 rank ZeRO-2 from step 3, against the uninterrupted run."""
    _six_steps_resharded_at_3(tmp_path, small_data, ["optim.name=adamw"], (0, 2), (1, 2))


def _six_steps_resharded_at_3(
    tmp_path, small_data, sets: list[str], stages: tuple[int, int], ranks: tuple[int, int]
):
    """(source, run): 6 steps on `ranks[0]` ranks under ZeRO `stages[0]`, and its checkpoint 3
    continued on `ranks[1]` ranks under ZeRO `stages[1]`, which must follow the source's losses."""
    sets = [*sets, "train.max_steps=6", "checkpoint.every_steps=3", "train.eval_every=0"]
    source = tmp_path / "source"
    pretrain(source, small_data, *sets, f"parallel.zero_stage={stages[0]}", nproc=ranks[0])
    run = copy_until(source, tmp_path / "run", step=3)
    proc = pretrain(run, small_data, *sets, f"parallel.zero_stage={stages[1]}", nproc=ranks[1])
    assert (
        f"resharded step-00000003 from {ranks[0]} data-parallel rank(s), ZeRO-{stages[0]} to {ranks[1]} "
        f"data-parallel rank(s), ZeRO-{stages[1]}"
    ) in proc.stdout
    assert train_losses(run) == pytest.approx(train_losses(source), rel=1e-5)
    return source, run


def test_three_zero3_ranks_take_padded_partitions(tmp_path, small_data):
    """3 ranks under ZeRO-3 do not divide most parameters (d_model 32): each rank's partition
    is padded, and the last rank's slice ends inside it (it read past the parameter's end).
    2 ranks ZeRO-1 -> 3 ranks ZeRO-3 from step 3 (a global batch of 768 tokens both split),
    against the uninterrupted run, state included."""
    source, run = _six_steps_resharded_at_3(
        tmp_path, small_data, ["schedule.batch_final_tokens=768"], (1, 3), (2, 3)
    )
    assert_same_state(flat_state(run, 6), flat_state(source, 6), rel=1e-5)


def _as_written_before(state: dict) -> None:
    """megatrain.json as megatrain wrote it before recording the optimizer flavour, the
    global-batch unit, the tensor-parallel size, per-source sample counts and
    train.grad_accum_dtype (bf16 gradients were summed in bf16 then)."""
    for key in ("optimizer_flavour", "batch_unit_tokens"):
        del state[key]
    del state["layout"]["tensor_parallel"], state["state"]["data"]["source_samples"]
    del state["config"]["train"]["grad_accum_dtype"]


def test_a_checkpoint_of_an_earlier_megatrain_resumes(tmp_path, small_data):
    """ZeRO-1 in bf16 from before fp32 accumulation (DeepSpeed's ZeRO optimizer, whose files
    its BF16_Optimizer, used now, cannot load), with the megatrain.json of then: on the same
    layout it is resharded into the new optimizer and goes on; on another layout too."""
    sets = [
        "parallel.zero_stage=1",
        "train.precision=bf16",
        "train.max_steps=6",
        "checkpoint.every_steps=3",
        "train.eval_every=0",
    ]
    source = tmp_path / "source"
    pretrain(source, small_data, *sets, "train.grad_accum_dtype=bf16")
    for name, more, nproc in (("same", [], 2), ("other", ["parallel.zero_stage=2"], 1)):
        run = copy_until(source, tmp_path / name, step=3)
        edit_megatrain_json(run / "checkpoints" / "step-00000003", _as_written_before)
        proc = pretrain(run, small_data, *sets, *more, nproc=nproc)
        to = "1 data-parallel rank(s), ZeRO-2" if more else "2 data-parallel rank(s), ZeRO-1 (bf16)"
        source_form = "ZeRO-1" if more else "ZeRO-1 (zero12)"
        assert (
            f"resharded step-00000003 from 2 data-parallel rank(s), {source_form} to {to}" in proc.stdout
        ), name
        assert train_losses(run) == pytest.approx(train_losses(source), rel=2e-2), name
