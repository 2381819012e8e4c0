"""Continued pretraining and curricula (docs/continued-pretraining.md): a run started from
another run's checkpoint (2 ranks, ZeRO-1) on a second corpus with a two-stage mixture,
against the same run from scratch; exact resume across the stage boundary; the optimizer
state and schedule position taken over; Hugging Face and consolidated sources; the
vocabulary refused, then resized."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from helpers import STDLIB, copy_until, pretrain, train_losses

from megatrain.data import prepare_dataset
from megatrain.train import layout_free
from megatrain.train.checkpoint import Checkpointer
from megatrain.train.convert import export_hf, save_consolidated
from megatrain.train.metrics import read_events, read_metrics

BOUNDARY = 5888  # tokens: sample 184, inside step 12 (16 samples of 32 tokens per step)
STEPS = 20


@pytest.fixture(scope="module")
def other_data(tmp_path_factory, small_tokenizer):
    """A second corpus with the same tokenizer: stdlib packages the first does not have."""
    out = tmp_path_factory.mktemp("other") / "other"
    prepare_dataset(
        small_tokenizer,
        [str(STDLIB / "asyncio")],
        out,
        valid_fraction=0.1,
        workers=2,
        shard_mb=0.1,
        progress=False,
    )
    return out


def curriculum(small_data, other_data) -> list[str]:
    """20 steps on the first corpus 0.8 : the new one 0.2, then 0.2 : 0.8 from BOUNDARY tokens,
    with a warmup and a cosine over these 20 steps (the re-warmup a continued run needs)."""
    data = {
        "path": [
            {"path": str(small_data), "weight": 0.8, "name": "old"},
            {"path": str(other_data), "weight": 0.2, "name": "new"},
        ],
        "stages": [{"tokens": BOUNDARY, "weights": {"old": 0.2, "new": 0.8}}],
    }
    return [
        f"data={json.dumps(data)}",
        f"train.max_steps={STEPS}",
        "checkpoint.every_steps=10",
        "schedule.warmup_tokens=2048",
        "schedule.lr_shape=cosine",
        "schedule.decay_tokens=10240",
    ]


@pytest.fixture(scope="module")
def source(uninterrupted):
    return uninterrupted("2r-zero1") / "run"  # 30 steps on small_data, 2 ranks, ZeRO-1


@pytest.fixture(scope="module")
def runs(tmp_path_factory, small_data, other_data, source):
    root = tmp_path_factory.mktemp("continued")
    sets = curriculum(small_data, other_data)
    pretrain(root / "scratch", small_data, *sets, nproc=0)
    pretrain(root / "continued", small_data, *sets, f"model.init_from={source}", nproc=0)
    return root


def valid_losses(run_dir, name: str) -> list[float]:
    return [r["val_loss"] for r in read_metrics(run_dir) if r["kind"] == "valid" and r["set"] == name]


def test_a_continued_run_learns_the_new_corpus_faster_than_from_scratch(runs, source):
    continued, scratch = valid_losses(runs / "continued", "new"), valid_losses(runs / "scratch", "new")
    assert len(continued) == len(scratch) >= 5
    assert all(c < s for c, s in zip(continued, scratch, strict=True)), (
        continued,
        scratch,
    )  # at equal tokens
    assert scratch[-1] - continued[-1] > 0.1
    event = next(e for e in read_events(runs / "continued") if e["event"] == "init_from")
    assert event["kind"] == "checkpoint" and event["step"] == 0 and event["optimizer_step"] == 0
    assert not (runs / "continued" / ".init-from.safetensors").exists()
    rows = [r for r in read_metrics(runs / "continued") if r["kind"] == "train"]
    assert rows[0]["lr"] == 0.0 and rows[4]["lr"] == pytest.approx(3e-3)  # warms up again from the new start
    assert rows[-1]["lr"] == pytest.approx(3e-4, rel=0.1)  # and decays to the new end
    resolved = yaml.safe_load((runs / "continued" / "config.yaml").read_text())["model"]
    shape = Checkpointer.read_state(Checkpointer(source, 1).latest())["model_shape"]
    assert {k: resolved[k] for k in ("n_layer", "d_model", "vocab_size")} == {
        k: shape[k] for k in ("n_layer", "d_model", "vocab_size")
    }


def test_two_stage_mixture_changes_the_share_at_the_boundary_and_resumes_exactly_across_it(
    runs, tmp_path, small_data, other_data, source
):
    rows = [r for r in read_metrics(runs / "continued") if r["kind"] == "train"]
    before, after, previous = [0, 0], [0, 0], {"old": 0, "new": 0}
    for r in rows:
        counts = [r["source_tokens"][k] - previous[k] for k in ("old", "new")]
        previous = r["source_tokens"]
        assert sum(counts) == r["batch_tokens"]
        if r["tokens"] <= BOUNDARY:
            before = [a + b for a, b in zip(before, counts, strict=True)]
            assert r["mixture_stage"] == 0
        elif r["tokens"] - r["batch_tokens"] >= BOUNDARY:
            after = [a + b for a, b in zip(after, counts, strict=True)]
            assert r["mixture_stage"] == 1
    for tokens, share in ((before, 0.2), (after, 0.8)):
        samples = sum(tokens) / 32
        error = 3 * (share * (1 - share) / samples) ** 0.5  # three standard errors of a random draw
        assert abs(tokens[1] / sum(tokens) - share) < error, (tokens, share)
    # resumed from step 10, before the boundary: the same losses and draws after it, bit for bit
    resumed = copy_until(runs / "continued", tmp_path / "resumed", 10)
    pretrain(resumed, small_data, *curriculum(small_data, other_data), f"model.init_from={source}", nproc=0)
    assert train_losses(resumed) == train_losses(runs / "continued")
    assert [r["source_tokens"] for r in read_metrics(resumed) if r["kind"] == "train"] == [
        r["source_tokens"] for r in rows
    ]
    assert not any(e["event"] == "init_from" for e in read_events(resumed)[-3:])  # its own checkpoint wins


def test_optimizer_state_and_schedule_position_are_taken_over_on_another_layout(tmp_path, small_data, source):
    """ZeRO-1 on 2 ranks -> ZeRO-2 on 1: a run that starts at the source's step trains no step
    and checkpoints exactly the source's weights, moments and step count."""
    ckpt = Checkpointer(source, 1).latest()
    pretrain(
        tmp_path / "run",
        small_data,
        f"model.init_from={ckpt}",
        "optim.init_from_state=true",
        "schedule.init_from=keep",
        "parallel.zero_stage=2",
        "train.max_steps=30",
        nproc=0,
    )
    mine = Checkpointer(tmp_path / "run", 1).latest()
    assert mine.name == ckpt.name
    theirs, their_step = layout_free.read(ckpt)
    ours, our_step = layout_free.read(mine)
    assert our_step == their_step == 30 and ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    progress = Checkpointer.read_state(mine)["state"]["progress"]
    assert progress == {**progress, "step": 30, "tokens": 30 * 512}


def test_hugging_face_and_consolidated_sources_start_a_run_with_their_exact_weights(
    tmp_path, small_data, small_tokenizer, source
):
    export_hf(source, tmp_path / "hf", small_tokenizer)
    save_consolidated(source, tmp_path / "model.safetensors")
    weights, _ = layout_free.read(Checkpointer(source, 1).latest(), moments=False)
    for name, start in (("hf", tmp_path / "hf"), ("file", tmp_path / "model.safetensors")):
        pretrain(tmp_path / name, small_data, f"model.init_from={start}", "train.max_steps=0", nproc=0)
        ours, _ = layout_free.read(Checkpointer(tmp_path / name, 1).latest(), moments=False)
        assert ours.keys() == weights.keys() and all(torch.equal(ours[k], weights[k]) for k in weights), name
    # a larger vocabulary: refused in one line, unless resized (new rows: the mean embedding)
    proc = pretrain(
        tmp_path / "bigger",
        small_data,
        f"model.init_from={tmp_path / 'hf'}",
        "model.vocab_size=1100",
        "train.max_steps=0",
        nproc=0,
        check=False,
    )
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == (
        f"error: model.init_from={tmp_path / 'hf'}: its vocabulary has 1024 tokens, the run 1100 (the data's "
        "tokenizer: 1024); model.init_from_vocab=resize starts from it anyway (shared rows kept, new rows "
        "the mean "
        "embedding)"
    )
    pretrain(
        tmp_path / "bigger",
        small_data,
        f"model.init_from={tmp_path / 'hf'}",
        "model.vocab_size=1100",
        "model.init_from_vocab=resize",
        "train.max_steps=0",
        nproc=0,
    )
    wte = layout_free.read(Checkpointer(tmp_path / "bigger", 1).latest(), moments=False)[0][
        "param/embed.wte.weight"
    ]
    old = weights["param/embed.wte.weight"]
    assert wte.shape == (1100, old.shape[1]) and torch.equal(wte[:1024], old)
    assert torch.equal(wte[1024:], old.mean(0, keepdim=True).expand(76, -1))
