"""The llama architecture through the real launcher: the tiny model (grouped-query
attention, an untied head, z-loss) learns on 2 ranks under ZeRO-1, and ZeRO-3 and tensor x
pipeline parallelism follow the same trajectory; it resumes exactly, and on
another layout; it trains in bf16; it exports to LlamaForCausalLM with the same logits and
greedy text; generate.py and evaluate.py take it as they take GPT-3."""

from __future__ import annotations

import pytest
import torch
from helpers import copy_until, fell_by, pretrain, run_script, train_losses

from megatrain.data import TokenDataset
from megatrain.train.convert import load_model
from megatrain.train.metrics import read_metrics

LLAMA = [
    "model.arch=llama",
    "model.n_head=4",
    "model.n_kv_head=2",
    "model.tie_embeddings=false",
    "optim.z_loss=1e-4",
    "train.max_steps=12",
    "checkpoint.every_steps=6",
    "train.eval_every=6",
]
LAYOUTS = {
    "zero3": (2, ["parallel.zero_stage=3", "model.activation_checkpointing=true"]),
    # ZeRO-0: the clipped norm all-reduced over the stages and tensor ranks of a replica;
    # sequence parallel: the stages pass each other their tensor ranks' slices of the sequence
    "tp2pp2-sp": (
        4,
        [
            "parallel.tensor_parallel=2",
            "parallel.pipeline_stages=2",
            "parallel.zero_stage=0",
            "parallel.sequence_parallel=true",
        ],
    ),
}


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory, small_data):
    run = tmp_path_factory.mktemp("llama") / "run"
    pretrain(run, small_data, *LLAMA, "parallel.zero_stage=1")
    return run


def test_tiny_llama_learns_and_logs_its_z_loss(llama_run):
    rows = [r for r in read_metrics(llama_run) if r["kind"] == "train"]
    losses = [r["loss"] for r in rows]
    assert len(losses) == 12 and fell_by(losses, 0.3)
    # The z term, log(Z)^2, is its own metric (the loss is the cross-entropy alone).
    assert all(r["z_loss"] > 0 for r in rows)
    assert [r["step"] for r in read_metrics(llama_run) if r["kind"] == "valid"] == [6, 12]


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_every_layout_follows_the_same_trajectory(llama_run, tmp_path, small_data, layout):
    """The same global batch of 512 tokens split as 2 data-parallel ranks (the reference),
    ZeRO-3 partitions (with activation checkpointing), or two pipeline stages of two
    tensor-parallel ranks (the untied head on the last; q|k|v cut as 4 query and 2 key/value
    heads, SwiGLU's gate|up, the untied head by vocabulary rows) with sequence parallelism."""
    nproc, sets = LAYOUTS[layout]
    pretrain(tmp_path / "run", small_data, *LLAMA, *sets, nproc=nproc)
    assert train_losses(tmp_path / "run") == pytest.approx(train_losses(llama_run), rel=1e-5)
    z = [
        [r["z_loss"] for r in read_metrics(d) if r["kind"] == "train"] for d in (tmp_path / "run", llama_run)
    ]
    assert z[0] == pytest.approx(z[1], rel=1e-4)


def test_tiny_llama_resumes_exactly(llama_run, tmp_path, small_data):
    run = copy_until(llama_run, tmp_path / "run", step=6)
    pretrain(run, small_data, *LLAMA, "parallel.zero_stage=1")
    assert train_losses(run) == train_losses(llama_run)  # bitwise


def test_tiny_llama_resumes_on_another_layout(llama_run, tmp_path, small_data):
    """Checkpoint 6 of the 2-rank ZeRO-1 run continued on 2 tensor-parallel ranks under
    ZeRO-2: the layout-free form cuts q|k|v and gate|up into their shards."""
    run = copy_until(llama_run, tmp_path / "run", step=6)
    proc = pretrain(run, small_data, *LLAMA, "parallel.tensor_parallel=2", "parallel.zero_stage=2")
    assert "resharded step-00000006 from 2 data-parallel rank(s), ZeRO-1 to tensor-parallel 2" in proc.stdout
    assert train_losses(run) == pytest.approx(train_losses(llama_run), rel=1e-5)


def test_tiny_llama_trains_in_bf16(tmp_path, small_data):
    run = tmp_path / "run"
    pretrain(run, small_data, *LLAMA, "train.precision=bf16", "checkpoint.every_steps=0", nproc=0)
    losses = train_losses(run)
    assert fell_by(losses, 0.2)


def test_export_generate_and_evaluate(llama_run, small_data, small_tokenizer, tmp_path):
    """launch/export_hf.py writes LlamaForCausalLM; transformers gives its logits within 1e-4
    and its greedy text token for token; generate.py and evaluate.py work unchanged."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "hf"
    run_script(
        "export_hf.py", llama_run, "--tokenizer", small_tokenizer, "--out", out, env={"HF_HUB_OFFLINE": "1"}
    )
    hf = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    assert type(hf).__name__ == "LlamaForCausalLM" and hf.config.num_key_value_heads == 2
    ours = load_model(llama_run)
    real = torch.from_numpy(
        TokenDataset(small_data, 32, split="valid").batch(list(range(4))).astype("int64")
    )[:, :-1]
    with torch.no_grad():
        assert float((hf(real).logits - ours(real)).abs().max()) < 1e-4
    hf_tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
    prompt = hf_tok("def parse(self, text):\n    return", return_tensors="pt")["input_ids"]
    greedy = hf.generate(
        prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False, eos_token_id=None
    )
    assert torch.equal(ours.generate(prompt, 12, temperature=0), greedy)
    proc = run_script(
        "generate.py",
        "--checkpoint",
        llama_run,
        "--tokenizer",
        small_tokenizer,
        "--prompt",
        "def ",
        "--temperature",
        "0",
        "--max-new-tokens",
        "8",
    )
    assert proc.stdout.strip()
    proc = run_script(
        "evaluate.py", "--checkpoint", llama_run, "--tokenizer", small_tokenizer, "--input", small_data
    )
    assert "bits per byte" in proc.stdout
