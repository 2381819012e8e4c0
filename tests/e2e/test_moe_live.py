"""Mixture of experts through the real launcher: the tiny MoE llama learns and logs its
router; 2 expert-parallel ranks, each computing and keeping half the experts (tokens
exchanged by all-to-all), follow the trajectory of every rank keeping every expert; 4 ranks
(2 keeping each half) take a checkpoint of the other layout and resume exactly; a spike is
rolled back exactly; it exports to MixtralForCausalLM with the same logits, and generate.py
and evaluate.py take it."""

from __future__ import annotations

import pytest
import torch
from helpers import copy_until, fell_by, pretrain, run_script, train_losses

from megatrain.data import TokenDataset
from megatrain.train import layout_free
from megatrain.train.convert import load_model
from megatrain.train.metrics import read_events, read_metrics

MOE = [
    "model.arch=llama",
    "model.n_head=4",
    "model.n_kv_head=2",
    "model.moe.experts=4",
    "model.moe.top_k=2",
    "model.moe.ffn_hidden=32",
    "train.max_steps=10",
    "checkpoint.every_steps=5",
    "train.eval_every=5",
    "logging.moe_load_every=5",
    "optim.grad_clip=0.2",  # every step clipped: the experts' share of the norm counts
]
EP2 = ["parallel.expert_parallel=2"]


@pytest.fixture(scope="module")
def moe_run(tmp_path_factory, small_data):
    run = tmp_path_factory.mktemp("moe") / "run"
    pretrain(run, small_data, *MOE, "parallel.zero_stage=1")
    return run


@pytest.fixture(scope="module")
def split_run(tmp_path_factory, small_data):
    """Each of 2 ranks computes and keeps 2 of the 4 experts (ZeRO-0 here; ZeRO-2 below)."""
    run = tmp_path_factory.mktemp("moe-split") / "run"
    proc = pretrain(run, small_data, *MOE, *EP2, "parallel.zero_stage=0")
    assert "2 rank(s) (experts split over 2), ZeRO-0" in proc.stdout
    return run


def test_tiny_moe_learns_and_logs_its_router(moe_run):
    rows = [r for r in read_metrics(moe_run) if r["kind"] == "train"]
    losses = [r["loss"] for r in rows]
    assert len(losses) == 10 and fell_by(losses, 0.2)
    for r in rows:  # the balance loss is 1 when balanced, more otherwise; shares of 4 experts
        assert r["moe_balance"] >= 0.99 and r["moe_z"] > 0 and r["moe_dropped"] == 0
        assert 0 <= r["moe_load_min/0"] <= 0.25 <= r["moe_load_max/1"] <= 1
    histograms = {r["step"]: r["moe_load"] for r in rows if "moe_load" in r}
    assert sorted(histograms) == [5, 10] and sorted(histograms[5]) == ["0", "1"]
    assert sum(histograms[5]["0"]) == pytest.approx(1.0)


def test_expert_parallel_follows_the_same_trajectory(moe_run, split_run):
    """Losses, router statistics and the clipped global norms of every rank keeping every
    expert; each rank's file holds its 2 experts' weights and moments (2 blocks of [2, 64, 32]
    and [2, 32, 32]), and the layout-free form gathers them into the same training state."""
    assert train_losses(split_run) == pytest.approx(train_losses(moe_run), rel=1e-5)
    for key in ("moe_balance", "grad_norm"):
        got, want = ([r[key] for r in read_metrics(d) if r["kind"] == "train"] for d in (split_run, moe_run))
        assert got == pytest.approx(want, rel=1e-5), key
    ckpt = split_run / "checkpoints" / "step-00000010"
    for rank in (0, 1):
        mine = torch.load(ckpt / f"megatrain-rank{rank:05d}.pt", weights_only=False)["experts"]
        assert (mine["place"], mine["replica"], mine["step"]) == (rank, 0, 10)
        assert mine["param"].numel() == mine["exp_avg"].numel() == 2 * 2 * (64 * 32 + 32 * 32)
    split, _ = layout_free.read(ckpt)
    whole, _ = layout_free.read(moe_run / "checkpoints" / "step-00000010")
    assert split.keys() == whole.keys() and split["param/blocks.1.mlp.experts.proj"].shape[0] == 4
    for key, t in whole.items():
        assert float((split[key] - t).abs().max()) <= 1e-4 * float(t.abs().max()), key


def test_resumes_with_experts_split_from_every_rank_keeping_them_and_exactly(moe_run, tmp_path, small_data):
    """Checkpoint 5 of the 2-rank ZeRO-1 run continued on 4 ranks with experts split over 2
    (2 ranks keep each half) under ZeRO-2 and activation checkpointing (the all-to-all runs
    again in the recomputation): each rank takes its experts' rows of the layout-free form.
    The 2 ranks keeping the same experts own half of their optimizer state each (and write
    that half); a resume on its own layout from step 8 is exact."""
    run = copy_until(moe_run, tmp_path / "run", step=5)
    sets = [*EP2, "parallel.zero_stage=2", "model.activation_checkpointing=true", "checkpoint.every_steps=4"]
    proc = pretrain(run, small_data, *MOE, *sets, nproc=4)
    assert "resharded step-00000005" in proc.stdout
    assert train_losses(run) == pytest.approx(train_losses(moe_run), rel=1e-5)
    ckpt = run / "checkpoints" / "step-00000008"
    for rank in range(4):
        mine = torch.load(ckpt / f"megatrain-rank{rank:05d}.pt", weights_only=False)["experts"]
        assert (mine["place"], mine["replica"], mine["replicas"]) == (rank % 2, rank // 2, 2)
        assert mine["param"].numel() == mine["exp_avg_sq"].numel() == 2 * (64 * 32 + 32 * 32)
    again = copy_until(run, tmp_path / "again", step=8)
    pretrain(again, small_data, *MOE, *sets, nproc=4)
    assert train_losses(again) == train_losses(run)  # bitwise


def test_a_spike_is_rolled_back_exactly_with_experts_split(tmp_path, small_data):
    """A NaN loss at step 13 (always a spike): the run restores its in-memory point of step 10
    (ZeRO-2's flat partitions, and each rank's experts: bf16 weights, fp32 masters and
    moments), skips 4 batches, and then matches a run that skipped them from the start, bitwise."""
    guard = [
        *MOE,
        *EP2,
        "parallel.zero_stage=2",
        "train.precision=bf16",
        "train.max_steps=16",
        "train.eval_every=0",
        "checkpoint.every_steps=10",
        "spike.min_history=6",
        "spike.snapshot_every=5",
        "spike.skip=4",
    ]
    run = tmp_path / "run"
    pretrain(run, small_data, *guard, faults=["nan_loss@13"])
    [rb] = [e for e in read_events(run) if e["event"] == "rollback"]
    assert rb["began"] == 13 and rb["restored_step"] == 10 and rb["source"] == "memory"
    clean = tmp_path / "clean"
    pretrain(clean, small_data, *guard, f"data.skip=[[{rb['position']}, {rb['skipped_samples']}]]")
    assert len(train_losses(run)) == 16 and train_losses(run) == train_losses(clean)


def test_expert_load_reaches_wandb_and_the_plot(tmp_path, small_data):
    """One process, wandb offline: the load histograms go to wandb (one per MoE block) and
    launch/plot.py adds the expert-load row."""
    run = tmp_path / "run"
    sets = [*MOE, "train.max_steps=2", "logging.moe_load_every=1", "logging.wandb=true"]
    pretrain(run, small_data, *sets, "checkpoint.every_steps=0", nproc=0, env={"WANDB_MODE": "offline"})
    assert [sorted(r["moe_load"]) for r in read_metrics(run) if r["kind"] == "train"] == [["0", "1"]] * 2
    [offline] = (run / "wandb").glob("offline-run-*")
    assert b"moe_load/1" in next(offline.glob("*.wandb")).read_bytes()
    assert "curves.png" in run_script("plot.py", run).stdout


def test_export_generate_and_evaluate(split_run, small_data, small_tokenizer, tmp_path):
    """From the checkpoint whose experts are split over the ranks' files."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "hf"
    run_script("export_hf.py", split_run, "--out", out, env={"HF_HUB_OFFLINE": "1"})
    hf = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    assert type(hf).__name__ == "MixtralForCausalLM" and hf.config.num_local_experts == 4
    ours = load_model(split_run)
    real = torch.from_numpy(TokenDataset(small_data, 32, split="valid").batch(list(range(4))).astype("int64"))
    with torch.no_grad():
        assert float((hf(real[:, :-1]).logits - ours(real[:, :-1])).abs().max()) < 1e-4
    proc = run_script(
        "generate.py",
        "--checkpoint",
        split_run,
        "--prompt",
        "def ",
        "--temperature",
        "0",
        "--max-new-tokens",
        "8",
    )
    assert proc.stdout.strip()
    proc = run_script("evaluate.py", "--checkpoint", split_run, "--input", small_data)
    assert "bits per byte" in proc.stdout
