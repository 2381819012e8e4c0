"""Pretraining through the real deepspeed launcher: 2 ranks on CPU, a tiny model, real shards."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import copy_until, pretrain, run_script, train_losses

from megatrain.train.checkpoint import Checkpointer
from megatrain.train.metrics import read_events, read_metrics

STAGES = [0, 1, 2, 3]


# Every stage in fp32 and bf16; bf16-autocast (torch.autocast around the forward pass, which
# no stage changes) with whole parameters (ZeRO-0) and with partitioned ones (ZeRO-3).
@pytest.mark.parametrize(
    "stage, precision",
    [(stage, p) for stage in STAGES for p in ("fp32", "bf16")] + [(0, "bf16-autocast"), (3, "bf16-autocast")],
)
def test_every_zero_stage_trains(runs, stage, precision):
    losses = train_losses(runs(stage, precision))
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0] - 0.05, losses  # the loss falls on real text
    valid = [r for r in read_metrics(runs(stage, precision)) if r["kind"] == "valid"]
    assert [r["step"] for r in valid] == [3, 6] and valid[1]["val_loss"] < valid[0]["val_loss"]


def test_fp32_zero_stages_agree(runs):
    reference = train_losses(runs(0, "fp32"))
    for stage in STAGES[1:]:
        assert train_losses(runs(stage, "fp32")) == pytest.approx(reference, rel=1e-5), stage


def test_bf16_autocast_keeps_fp32_weights_and_casts_matmuls(runs):
    """bf16-autocast starts from the same fp32 weights as fp32 and stays within bf16 rounding
    of it, but is not fp32: the matmuls really ran in bf16."""
    reference = train_losses(runs(0, "fp32"))
    for stage in STAGES:
        losses = train_losses(runs(stage, "bf16-autocast"))
        assert losses == pytest.approx(reference, rel=1e-3), stage
        assert losses != reference, stage

    def weight_dtypes(run):  # ZeRO-0 saves the module as the engine holds it
        ckpt = run / (run / "latest").read_text().strip() / "mp_rank_00_model_states.pt"
        return {t.dtype for t in torch.load(ckpt, map_location="cpu", weights_only=False)["module"].values()}

    assert weight_dtypes(runs(0, "bf16-autocast")) == {torch.float32}
    assert weight_dtypes(runs(0, "bf16")) == {torch.bfloat16}


def test_metrics_fields(runs):
    for stage in (0, 2):
        rows = read_metrics(runs(stage, "fp32"))
        train = [r for r in rows if r["kind"] == "train"]
        assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
        assert [r["tokens"] for r in train] == [512 * s for s in range(1, 7)]
        for r in train:
            assert r["batch_tokens"] == 512 and r["grad_accum"] == 2 and r["lr"] == 3e-3
            assert r["grad_norm"] > 0 and r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1
            assert "loss_scale" not in r  # fp16 only
        valid = [r for r in rows if r["kind"] == "valid"]
        assert all(r["val_ppl"] == pytest.approx(math.exp(r["val_loss"])) for r in valid)
    events = [e["event"] for e in read_events(runs(0, "fp32"))]
    assert events == ["start", "checkpoint", "checkpoint", "end"]
    assert "zero_stage: 0" in (runs(0, "fp32") / "config.yaml").read_text()


def test_checkpoints_are_published_atomically(runs):
    run = runs(1, "fp32")
    assert (run / "latest").read_text().strip() == "checkpoints/step-00000006"
    ckpts = Checkpointer(run, keep=3).complete_checkpoints()
    assert [c.name for c in ckpts] == ["step-00000003", "step-00000006"]
    assert not list((run / "checkpoints").glob(".tmp-*"))
    for c in ckpts:
        assert Checkpointer.verify(c) is None
        manifest = json.loads((c / "manifest.json").read_text())
        assert {"megatrain.json", "megatrain-rank00000.pt", "megatrain-rank00001.pt"} <= set(
            manifest["files"]
        )


def test_resume_is_exact_in_fp32(runs, tmp_path, small_data):
    straight = runs(1, "fp32")
    resumed = copy_until(straight, tmp_path / "resumed", step=3)
    proc = pretrain(resumed, small_data, "parallel.zero_stage=1", "train.precision=fp32")
    assert "resumed from" in proc.stdout and "step-00000003" in proc.stdout
    assert train_losses(resumed) == train_losses(straight)  # bitwise
    assert any(e["event"] == "resume" and e["step"] == 3 for e in read_events(resumed))


def test_resume_in_bf16_within_tolerance(runs, tmp_path, small_data):
    """bf16 resumes to the same trajectory within 1e-3 relative (DeepSpeed's bf16 optimizer
    keeps fp32 master weights in its checkpoint; on this CPU it even comes out bitwise)."""
    straight = runs(1, "bf16")
    resumed = copy_until(straight, tmp_path / "resumed", step=6)  # `latest` says 6; resume from 3 by path
    pretrain(
        resumed,
        small_data,
        "parallel.zero_stage=1",
        "train.precision=bf16",
        resume=str(resumed / "checkpoints" / "step-00000003"),
    )
    assert train_losses(resumed) == pytest.approx(train_losses(straight), rel=1e-3)


def test_kill_during_checkpoint_write_keeps_latest(runs, tmp_path, small_data):
    """SIGKILL of rank 1 while it writes checkpoint 6: `latest` stays on 3, and --resume auto
    finishes the run with the losses of a run that was never killed."""
    run = tmp_path / "run"
    proc = pretrain(run, small_data, "parallel.zero_stage=1", check=False, faults=["checkpoint_write@6:1"])
    assert proc.returncode != 0
    assert (run / "latest").read_text().strip() == "checkpoints/step-00000003"
    # the unfinished write is never published (rank 0 may remove it before the launcher stops it)
    assert not (run / "checkpoints" / "step-00000006").exists()
    pretrain(run, small_data, "parallel.zero_stage=1")
    assert train_losses(run) == train_losses(runs(1, "fp32"))
    assert not list((run / "checkpoints").glob(".tmp-*"))


def test_damaged_checkpoint_falls_back_to_previous(runs, tmp_path, small_data):
    run = copy_until(runs(1, "fp32"), tmp_path / "run", step=6)
    target = run / "checkpoints" / "step-00000006" / "mp_rank_00_model_states.pt"
    target.write_bytes(target.read_bytes()[:-1000])  # truncated
    proc = pretrain(run, small_data, "parallel.zero_stage=1")
    assert "warning: skipping damaged checkpoint step-00000006" in proc.stdout + proc.stderr
    assert "mp_rank_00_model_states.pt" in proc.stdout + proc.stderr
    assert "resumed from" in proc.stdout and "step-00000003" in proc.stdout
    assert train_losses(run) == train_losses(runs(1, "fp32"))


def test_a_lagging_listing_still_hashes_every_file(runs, tmp_path, small_data):
    """Rank 1's listing of checkpoint 3 sees every other file (a network filesystem's cache
    lagging): the manifest still lists and hashes every file of the checkpoint, each by a
    rank that saw it, and the checkpoint verifies and resumes."""
    run = tmp_path / "run"
    pretrain(run, small_data, "parallel.zero_stage=1", faults=["stale_listing@3:1"])
    ckpt = run / "checkpoints" / "step-00000003"
    listed = json.loads((ckpt / "manifest.json").read_text())["files"]
    on_disk = {p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*") if p.is_file()} - {"manifest.json"}
    assert set(listed) == on_disk and len(on_disk) >= 5
    assert Checkpointer.verify(ckpt) is None
    resumed = copy_until(run, tmp_path / "resumed", step=3)
    pretrain(resumed, small_data, "parallel.zero_stage=1")
    assert train_losses(resumed) == train_losses(runs(1, "fp32"))


def test_a_run_dir_a_rank_does_not_share_is_refused(runs, tmp_path, small_data):
    """Rank 1's run.dir is a path of its own (as a node-local directory would be): refused in
    one line naming the rank, exit 2, before anything is written; the run's files as they were."""
    run = copy_until(runs(1, "fp32"), tmp_path / "run", step=3)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    proc = pretrain(run, small_data, "parallel.zero_stage=1", check=False, faults=["own_run_dir@0:1"])
    assert proc.returncode == 2
    assert (
        f"error: run.dir={run}: rank 1 (on " in proc.stderr
        and "does not see the files rank 0 writes there; "
        "every rank writes checkpoints into it: put it on a filesystem all nodes share"
        in proc.stderr
    )
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_changed_model_shape_is_refused(runs, tmp_path, small_data):
    """(A changed layout is resumed: tests/e2e/test_reshard.py.)"""
    run = copy_until(runs(1, "fp32"), tmp_path / "run", step=6)
    proc = pretrain(
        run, small_data, "parallel.zero_stage=1", "model.n_layer=3", "train.max_steps=8", nproc=0, check=False
    )
    assert proc.returncode == 2
    assert (
        proc.stderr.strip()
        .splitlines()[-1]
        .endswith("the checkpoint is for another model shape n_layer: 2 in the checkpoint, 3 now")
    )


def test_a_layout_predicted_not_to_fit_is_refused_before_anything_is_allocated(tmp_path, small_data):
    """GPT-3 175B's shape on one CPU rank: the planner's prediction (terabytes) is printed
    and the run refused in one line, before the model is built."""
    run = tmp_path / "run"
    proc = pretrain(
        run, small_data, "model.n_layer=96", "model.d_model=12288", "model.n_head=96", nproc=0, check=False
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "plan: " in proc.stdout and "GiB per rank predicted (params " in proc.stdout
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("error: plan: this layout needs ") and "host RAM available" in line
    assert line.endswith("no layout of 1 rank(s) fits; --set plan.check=false starts anyway")
    assert not (run / "checkpoints").exists()


def test_world_of_one_zero0_skips_the_allreduce_without_changing_numerics(tmp_path, small_data):
    """In a world of one, ZeRO-0 leaves out DeepSpeed's gradient all-reduce (an identity);
    ZeRO-1, which reduces into its own partition, follows the same trajectory."""
    losses = {}
    for stage in (0, 1):
        pretrain(
            tmp_path / f"zero{stage}",
            small_data,
            f"parallel.zero_stage={stage}",
            "checkpoint.every_steps=0",
            nproc=0,
        )
        losses[stage] = train_losses(tmp_path / f"zero{stage}")
    assert len(losses[0]) == 6 and losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_single_process_with_wandb_offline_and_plot(tmp_path, small_data):
    """A world of one, without the launcher and then with it (one rank, the one-GPU command;
    pretrain() checks that it leaves no shared memory behind), stopping at max_tokens;
    --resume none starts over."""
    run = tmp_path / "run"
    limit = ["train.max_steps=null", "train.max_tokens=1536"]  # 3 steps of 512 tokens
    pretrain(run, small_data, "logging.wandb=true", *limit, nproc=0, env={"WANDB_MODE": "offline"})
    assert len(train_losses(run)) == 3
    pretrain(run, small_data, *limit, nproc=1, resume="none")
    assert [r["step"] for r in read_metrics(run) if r["kind"] == "train"] == [1, 2, 3]  # not appended
    offline = list((run / "wandb").glob("offline-run-*"))
    assert offline and list(offline[0].glob("*.wandb"))
    proc = run_script("plot.py", run)
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "curves.png" in proc.stdout


def test_fp16_refused_on_cpu_with_pointer_to_bf16(tmp_path, small_data):
    proc = pretrain(tmp_path / "run", small_data, "train.precision=fp16", nproc=0, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: train.precision=fp16: DeepSpeed does not support fp16 on "
        "its CPU accelerator; use train.precision=bf16 (or fp32)"
    )


def test_zero3_non_finite_gradients_skip_the_whole_step(tmp_path, small_data):
    """ZeRO-3 steps parameter sub-groups separately; with a NaN loss at step 3 (spike guard
    off) every sub-group on every rank skips together: the fp32 partitions and the step
    counts after step 3 equal those after step 2, and step 4 trains again."""
    run = tmp_path / "run"
    pretrain(
        run,
        small_data,
        "parallel.zero_stage=3",
        "spike.enabled=false",
        "train.max_steps=4",
        "checkpoint.every_steps=1",
        "checkpoint.keep=9",
        "train.eval_every=0",
        faults=["nan_loss@3"],
    )
    assert math.isnan(train_losses(run)[2])

    def optimizer_states(step):
        files = sorted((run / "checkpoints" / f"step-{step:08d}").glob("*optim_states.pt"))
        assert len(files) == 2  # one per rank
        states = [
            torch.load(f, map_location="cpu", weights_only=False)["optimizer_state_dict"] for f in files
        ]
        return (
            [t for s in states for t in s["fp32_flat_groups"]],
            [float(v["step"]) for s in states for v in s["optimizer_state_dict"]["state"].values()],
        )

    (w2, n2), (w3, n3), (w4, n4) = (optimizer_states(s) for s in (2, 3, 4))
    assert (
        len(n2) >= 4 and n2 == n3 == [2.0] * len(n2) and n4 == [3.0] * len(n4)
    )  # every sub-group, both ranks
    assert all(torch.equal(a, b) for a, b in zip(w2, w3, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(w3, w4, strict=True))


def test_a_step_deepspeed_skips_logs_an_infinite_norm(tmp_path, small_data):
    """bf16 under ZeRO-1 with megatrain's fused clip: DeepSpeed finds the NaN gradients of
    steps 1 and 3 and skips them without calling the optimizer. The very first step has no
    earlier norm to fall back on (it raised), a later one must not log the step before's:
    both log an infinite norm and count as skipped; training goes on (spike guard off)."""
    run = tmp_path / "run"
    pretrain(
        run,
        small_data,
        "parallel.zero_stage=1",
        "train.precision=bf16",
        "spike.enabled=false",
        "train.max_steps=4",
        "checkpoint.every_steps=0",
        "train.eval_every=0",
        faults=["nan_loss@1", "nan_loss@3"],
    )
    rows = [r for r in read_metrics(run) if r["kind"] == "train"]
    assert [r["grad_norm"] for r in rows][0::2] == [math.inf, math.inf]
    assert all(math.isfinite(r["grad_norm"]) and math.isfinite(r["loss"]) for r in rows[1::2])
    assert [r["skipped_steps"] for r in rows] == [1, 1, 2, 2]


def test_named_validation_sets_each_get_loss_and_bits_per_byte(tmp_path, small_data):
    """data.valid with two named sets: each is logged at every evaluation with its loss,
    perplexity and bits per byte (from the tokens per byte prepare_data recorded), and
    curves.png draws them."""
    from megatrain.data import TokenDataset

    run = tmp_path / "run"
    pretrain(
        run,
        small_data,
        f"data.valid={{code: {small_data}, again: {small_data}}}",
        "train.max_steps=2",
        "train.eval_every=1",
        "checkpoint.every_steps=0",
    )
    valid = [r for r in read_metrics(run) if r["kind"] == "valid"]
    assert [(r["step"], r["set"]) for r in valid] == [(1, "code"), (1, "again"), (2, "code"), (2, "again")]
    data = TokenDataset(small_data, 32, split="valid")
    assert data.manifest["num_bytes"] > 2 * data.num_tokens  # real text: several bytes per token
    for r in valid:
        assert r["val_bpb"] == pytest.approx(r["val_loss"] / math.log(2) / data.bytes_per_token)
    assert valid[0]["val_loss"] == valid[1]["val_loss"]  # the same data
    run_script("plot.py", run)
    assert (run / "curves.png").stat().st_size > 0
