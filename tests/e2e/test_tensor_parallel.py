"""Tensor parallelism (DeepSpeed AutoTP with megatrain's partition specs, the vocabulary
split by rows) through the real launcher, alone and under a pipeline (tensor x pipeline x
data): the trajectory of the same model without it, exact resume, conversion to the plain
model, and randomness shared within a tensor-parallel group."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import (
    LAYOUTS,
    LONG,
    assert_same_state,
    copy_until,
    flat_state,
    pretrain,
    run_script,
    samples_by_step,
    train_losses,
)

from megatrain.data import TokenDataset
from megatrain.train.convert import load_model
from megatrain.train.metrics import read_metrics


def test_tp2_follows_the_one_rank_trajectory(uninterrupted):
    """Two ranks splitting every block (ZeRO-1 under it) train as one rank does: the same
    losses, weights and moments (summation order aside), the same samples on both ranks."""
    tp, one = uninterrupted("tp2-zero1"), uninterrupted("1r-zero0")
    assert train_losses(tp / "run") == pytest.approx(train_losses(one / "run"), rel=1e-5)
    # The global norm (which clips and which the spike guard watches) counts every parameter once.
    norms = [[r["grad_norm"] for r in read_metrics(d / "run") if r["kind"] == "train"] for d in (tp, one)]
    assert norms[0] == pytest.approx(norms[1], rel=1e-5) and min(norms[1]) < 0.6 < max(
        norms[1]
    )  # clipped or not
    assert_same_state(flat_state(tp / "run", 30), flat_state(one / "run", 30), rel=1e-5)
    by_rank = [
        [json.loads(line)["samples"] for line in (tp / "samples" / f"samples-rank{r}.jsonl").open()]
        for r in (0, 1)
    ]
    assert by_rank[0] == by_rank[1]  # the data-parallel rank, not the global rank, picks the slice
    steps = range(1, 31)
    assert samples_by_step(tp / "samples", steps=steps) == samples_by_step(one / "samples", steps=steps)


@pytest.mark.parametrize(
    "layout, ranks",
    [
        ("tp2-zero1", "2 ranks: 1 pipeline x 2 tensor x 1 data parallel, ZeRO-1"),
        # a layer file per layer and tensor rank
        ("tp2pp2-zero1", "4 ranks: 2 pipeline x 2 tensor x 1 data parallel, ZeRO-1"),
    ],
)
def test_resumes_exactly_on_its_own_layout(uninterrupted, tmp_path, small_data, layout, ranks):
    """DeepSpeed's own files on the same layout: the losses of the uninterrupted run, bitwise."""
    source = uninterrupted(layout) / "run"
    run = copy_until(source, tmp_path / "run", step=20)
    nproc, sets = LAYOUTS[layout]
    proc = pretrain(run, small_data, *sets, *LONG, nproc=nproc)
    assert ranks in proc.stdout
    assert "plan: " in proc.stdout and " per rank predicted (params " in proc.stdout
    assert "resumed from" in proc.stdout and "resharded" not in proc.stdout
    assert train_losses(run) == train_losses(source)


def test_tp2_checkpoint_gives_the_one_rank_models_logits(uninterrupted, small_data):
    """launch/convert_checkpoint.py and export gather the shards (layout_free.read)."""
    tp = load_model(uninterrupted("tp2-zero1") / "run")
    one = load_model(uninterrupted("1r-zero0") / "run")
    tokens = torch.from_numpy(
        TokenDataset(small_data, 32, split="valid").batch(list(range(4))).astype("int64")
    )
    with torch.no_grad():
        a, b = tp(tokens[:, :-1]), one(tokens[:, :-1])
    assert ((a - b).norm() / b.norm()).item() < 1e-5


def test_tp2_pp2_follows_the_one_rank_trajectory_and_converts(uninterrupted, small_data, tmp_path):
    """Two pipeline stages of two tensor-parallel ranks (ZeRO-1; the tied embedding's
    vocabulary shard on the first and last stage of each tensor rank): the one rank's
    losses, clipped norms, weights and moments, samples, and, converted and exported to
    transformers, its logits."""
    from transformers import AutoModelForCausalLM

    tp, one = uninterrupted("tp2pp2-zero1"), uninterrupted("1r-zero0")
    assert train_losses(tp / "run") == pytest.approx(train_losses(one / "run"), rel=1e-5)
    norms = [[r["grad_norm"] for r in read_metrics(d / "run") if r["kind"] == "train"] for d in (tp, one)]
    assert norms[0] == pytest.approx(norms[1], rel=1e-5)
    assert_same_state(flat_state(tp / "run", 30), flat_state(one / "run", 30), rel=1e-5)
    steps = range(1, 31)
    assert samples_by_step(tp / "samples", steps=steps) == samples_by_step(one / "samples", steps=steps)
    files = sorted(f.name for f in (tp / "run" / "checkpoints" / "step-00000030").glob("layer_00-*"))
    assert files == ["layer_00-model_00-model_states.pt", "layer_00-model_01-model_states.pt"]
    tokens = torch.from_numpy(
        TokenDataset(small_data, 32, split="valid").batch(list(range(4))).astype("int64")
    )
    with torch.no_grad():
        a, b = (load_model(d / "run")(tokens[:, :-1]) for d in (tp, one))
    assert ((a - b).norm() / b.norm()).item() < 1e-5
    run_script("export_hf.py", tp / "run", "--out", tmp_path / "hf", env={"HF_HUB_OFFLINE": "1"})
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", local_files_only=True).eval()
    with torch.no_grad():
        assert float((hf(tokens[:, :-1]).logits - a).abs().max()) < 1e-4


def test_tp2_pp2_dp2_on_eight_ranks_with_sequence_parallelism_equals_dp2(uninterrupted, tmp_path, small_data):
    """Tensor x pipeline x data: 8 ranks as 2 data-parallel replicas of 2 stages of 2 tensor
    ranks, each tensor rank holding half the sequence between the tensor-parallel regions,
    against 2 data-parallel ranks (ZeRO-1 in both), the same global batch. (Without sequence
    parallelism: the 4-rank run above.)"""
    proc = pretrain(
        tmp_path / "3d",
        small_data,
        *LAYOUTS["tp2pp2-zero1"][1],
        "parallel.sequence_parallel=true",
        "train.max_steps=8",
        "checkpoint.every_steps=0",
        "train.eval_every=0",
        nproc=8,
    )
    assert "8 ranks: 2 pipeline x 2 tensor x 2 data parallel (sequence parallel)" in proc.stdout
    rows = [r for r in read_metrics(tmp_path / "3d") if r["kind"] == "train"]
    assert all(r["micro_batches"] == 2 for r in rows)  # 512 tokens / (4 x 32 x 2 replicas)
    reference = train_losses(uninterrupted("2r-zero1") / "run")[:8]
    assert [r["loss"] for r in rows] == pytest.approx(reference, rel=1e-5)


def test_dropout_masks_agree_within_a_tensor_parallel_group(tmp_path, small_data):
    """With dropout, the ranks of a group draw the same masks for the activations they all
    hold whole, so the parameters every rank keeps whole stay bitwise equal across the group
    (layout_free.read checks that) and so do their generators."""
    run = tmp_path / "run"  # ZeRO-0: whole gradients, the norm all-reduced over the group
    pretrain(
        run,
        small_data,
        "parallel.tensor_parallel=2",
        "parallel.zero_stage=0",
        "model.dropout=0.1",
        "train.eval_every=0",
    )
    flat_state(run, 6)  # raises if a replicated parameter differs between the two ranks
    ckpt = run / "checkpoints" / "step-00000006"
    rng = [torch.load(ckpt / f"megatrain-rank0000{r}.pt", weights_only=False)["rng"]["torch"] for r in (0, 1)]
    assert torch.equal(rng[0], rng[1])
    assert train_losses(run)[-1] < train_losses(run)[0]


def test_tp2_times_dp2_measured_norm_and_deepspeed_clipping(tmp_path, small_data):
    """4 ranks as 2 data-parallel groups of 2 tensor-parallel ranks, against one rank on the
    same global batch. With torch's AdamW under ZeRO-0 the trainer measures the norm and
    DeepSpeed clips: under T=2 both count every parameter once (the same norms and losses
    as one rank, with clipping active)."""
    common = ["optim.name=torch_adamw", "train.max_steps=6", "checkpoint.every_steps=0", "train.eval_every=0"]
    pretrain(tmp_path / "one", small_data, *common, nproc=1)
    pretrain(tmp_path / "tp", small_data, "parallel.tensor_parallel=2", *common, nproc=4)
    rows = [[r for r in read_metrics(tmp_path / d) if r["kind"] == "train"] for d in ("tp", "one")]
    norms = [[r["grad_norm"] for r in rs] for rs in rows]
    assert norms[0] == pytest.approx(norms[1], rel=1e-5) and min(norms[1]) < 0.6 < max(norms[1])
    assert [r["loss"] for r in rows[0]] == pytest.approx([r["loss"] for r in rows[1]], rel=1e-5)


def test_tp2_with_qk_norm_follows_one_process(tmp_path, small_data):
    """QK-norm's scales are whole on every rank but each rank applies them to its own heads:
    their gradients are summed over the group, so the copies stay equal (the checkpoint
    converts: layout_free.read refuses copies that differ) and the run follows the losses
    and grad norms of one process, state included; with sequence parallelism too (where every
    whole parameter's gradient is summed: the norms, biases and QK-norm's scales)."""
    llama = [
        "model.arch=llama",
        "model.n_head=4",
        "model.n_kv_head=2",
        "model.tie_embeddings=false",
        "model.qk_norm=true",
        "train.eval_every=0",
        "checkpoint.every_steps=6",
    ]
    tp = ["parallel.tensor_parallel=2", "parallel.zero_stage=1"]
    pretrain(tmp_path / "tp", small_data, *llama, *tp)
    pretrain(tmp_path / "sp", small_data, *llama, *tp, "parallel.sequence_parallel=true")
    pretrain(tmp_path / "one", small_data, *llama, nproc=0)
    one = [r for r in read_metrics(tmp_path / "one") if r["kind"] == "train"]
    for run in ("tp", "sp"):
        rows = [r for r in read_metrics(tmp_path / run) if r["kind"] == "train"]
        assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in one], rel=1e-5), run
        assert [r["grad_norm"] for r in rows] == pytest.approx([r["grad_norm"] for r in one], rel=1e-5), run
        assert_same_state(flat_state(tmp_path / run, 6), flat_state(tmp_path / "one", 6), rel=1e-5)
