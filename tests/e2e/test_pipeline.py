"""Pipeline parallelism, checkpoint conversion and multi-node runs, through the real launcher."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import (
    DEEPSPEED,
    REPO,
    TINY_CONFIG,
    copy_until,
    pretrain,
    pretrain_command,
    run_script,
    train_losses,
)

from megatrain.data import TokenDataset
from megatrain.model import GPT, GPTConfig
from megatrain.train.convert import consolidate, load_consolidated, load_model
from megatrain.train.distributed import free_port
from megatrain.train.metrics import read_metrics

PIPE = ["parallel.pipeline_stages=2", "parallel.zero_stage=1"]


@pytest.fixture(scope="module")
def p2_run(tmp_path_factory, small_data):
    """tests/configs/tiny.yaml with 2 pipeline stages on 2 ranks (so 1 data-parallel rank)."""
    run = tmp_path_factory.mktemp("p2") / "run"
    pretrain(run, small_data, *PIPE)
    return run


def test_pipeline_equals_data_parallel(p2_run, runs):
    """P=2 and P=1 (ZeRO-1, 2 data-parallel ranks) on the same global batch: same trajectory in fp32."""
    assert train_losses(p2_run) == pytest.approx(train_losses(runs(1, "fp32")), rel=1e-5)
    p2 = [r for r in read_metrics(p2_run) if r["kind"] == "train"]
    p1 = [r for r in read_metrics(runs(1, "fp32")) if r["kind"] == "train"]
    assert [r["grad_norm"] for r in p2] == pytest.approx([r["grad_norm"] for r in p1], rel=1e-5)
    assert any(r["grad_norm"] > 0.6 for r in p2) and any(
        r["grad_norm"] < 0.6 for r in p2
    )  # clipped steps: the norm spans both stages, tied table once
    assert all(r["micro_batches"] == r["grad_accum"] == 4 for r in p2)  # 512 tokens / (4 x 32 x 1 rank)


def test_pipeline_bf16_trains(tmp_path, small_data):
    """bf16 weights on a pipeline (bf16-autocast, DeepSpeed's torch_autocast around the same
    engine, is tested without one: tests/e2e/test_pretrain.py)."""
    pretrain(tmp_path / "run", small_data, *PIPE, "train.precision=bf16", "checkpoint.every_steps=0")
    losses = train_losses(tmp_path / "run")
    assert len(losses) == 6 and losses[-1] < losses[0] - 0.05


def test_pipeline_with_activation_checkpointing(p2_run, tmp_path, small_data):
    """The blocks are recomputed in the backward pass, the embedding is not (its int64 input
    under DeepSpeed's reentrant checkpoint left nothing on the first stage requiring grad,
    and the backward raised): the same losses as without, and the hardware does more."""
    pretrain(
        tmp_path / "run", small_data, *PIPE, "model.activation_checkpointing=true", "checkpoint.every_steps=0"
    )
    assert train_losses(tmp_path / "run") == train_losses(p2_run)
    assert all(r["hfu"] > r["mfu"] for r in read_metrics(tmp_path / "run") if r["kind"] == "train")


def test_zero2_with_pipeline_is_refused(tmp_path, small_data):
    proc = pretrain(
        tmp_path / "run",
        small_data,
        "parallel.pipeline_stages=2",
        "parallel.zero_stage=2",
        nproc=0,
        check=False,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: {TINY_CONFIG}: parallel.zero_stage=2 cannot be combined with parallel.pipeline_stages=2: "
        "DeepSpeed's "
        "pipeline engine supports ZeRO-1 at most (it would partition gradients the pipeline schedule still "
        "needs); "
        "use parallel.zero_stage=1"
    ]


def test_pipeline_resume_is_exact(p2_run, tmp_path, small_data):
    resumed = copy_until(p2_run, tmp_path / "resumed", step=3)
    proc = pretrain(resumed, small_data, *PIPE)
    assert "resumed from" in proc.stdout
    assert train_losses(resumed) == train_losses(p2_run)  # bitwise


def test_batch_ramp_changes_pipeline_micro_batches(tmp_path, small_data):
    ramp = [
        "schedule.batch_start_tokens=128",
        "schedule.batch_final_tokens=1024",
        "schedule.batch_ramp_tokens=3000",
        "train.micro_batch=2",
        "train.max_steps=null",
        "train.max_tokens=4096",
        "checkpoint.every_steps=0",
        "train.eval_every=0",
    ]
    pretrain(tmp_path / "run", small_data, *PIPE, *ramp)
    rows = [r for r in read_metrics(tmp_path / "run") if r["kind"] == "train"]
    micro = [r["micro_batches"] for r in rows]
    assert micro == [r["grad_accum"] for r in rows] == [r["batch_tokens"] // 64 for r in rows]
    assert micro[0] == 2 and micro[-1] == 16 and len(set(micro)) >= 4  # the engine's count really moved
    assert all(a <= b for a, b in zip(micro, micro[1:], strict=False))


# --- one consolidated state dict from any layout ----------------------------------------


def _validation_loss(model: GPT, data, n_samples: int, micro_batch: int) -> float:
    """The trainer's validation: the first n samples of valid/, mean over equal micro-batches."""
    valid = TokenDataset(data, model.cfg.seq_len, split="valid")
    model.eval()
    with torch.no_grad():
        losses = []
        for start in range(0, n_samples, micro_batch):
            batch = torch.from_numpy(valid.batch(np.arange(start, start + micro_batch))).long()
            losses.append(model(batch[:, :-1], batch[:, 1:]).item())
    return float(np.mean(losses))


@pytest.mark.parametrize("layout", ["zero0", "zero1", "zero3", "pipeline"])
def test_converted_checkpoint_gives_the_reported_validation_loss(layout, runs, p2_run, small_data, tmp_path):
    run = {
        "zero0": lambda: runs(0, "fp32"),
        "zero1": lambda: runs(1, "fp32"),
        "zero3": lambda: runs(3, "fp32"),
        "pipeline": lambda: p2_run,
    }[layout]()
    out = tmp_path / "gpt.safetensors"
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "launch" / "convert_checkpoint.py"),
            str(run / "checkpoints" / "step-00000006"),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes()[8:9] == b"{"  # a safetensors header, no pickle
    model = load_consolidated(out)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    reported = [r for r in read_metrics(run) if r["kind"] == "valid"][-1]
    assert reported["step"] == 6
    loss = _validation_loss(model, small_data, reported["val_samples"], micro_batch=4)
    assert loss == pytest.approx(reported["val_loss"], rel=1e-5)


# --- two "nodes" on one machine ------------------------------------------------------


def test_two_nodes_on_one_machine_match_one_launcher(tmp_path, small_data, runs):
    """Two deepspeed launchers as two nodes (--no_ssh, node_rank 0 and 1, one rank each) give
    the loss trajectory of one launcher with 2 ranks."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    port = free_port()
    run = tmp_path / "run"
    launcher = DEEPSPEED
    sets = [f"run.dir={run}", f"data.path={small_data}", "parallel.zero_stage=1"]
    script = pretrain_command(TINY_CONFIG, sets, nproc=0)[1:]  # without the interpreter
    # Each "node" would take every core of this machine (one local rank each): give each rank
    # the one core it has under one launcher, and with it the same arithmetic.
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, len(os.sched_getaffinity(0)) // 2))}
    nodes = [
        subprocess.Popen(
            [
                launcher,
                "--hostfile",
                str(hostfile),
                "--no_ssh",
                "--node_rank",
                str(rank),
                "--num_nodes",
                "2",
                "--num_gpus",
                "1",
                "--master_addr",
                "127.0.0.1",
                "--master_port",
                str(port),
                *script,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        for rank in (0, 1)
    ]
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs
    assert "done:" in outputs[0]
    assert train_losses(run) == train_losses(runs(1, "fp32"))


def test_an_mpi_style_launch_is_one_world(tmp_path, small_data, runs):
    """Two plain python processes given what mpirun gives each (Open MPI's variables, no
    RANK; MASTER_ADDR/PORT exported) train as one 2-rank world: the losses of the deepspeed
    launcher's 2 ranks, and one checkpoint with both ranks' files (each had been a world of
    one, both writing one run directory)."""
    run, port = tmp_path / "run", free_port()
    sets = [f"run.dir={run}", f"data.path={small_data}", "parallel.zero_stage=1"]
    script = pretrain_command(TINY_CONFIG, sets, nproc=0)
    base = {
        k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_SIZE")
    }
    ranks = [
        subprocess.Popen(
            script,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={
                **base,
                "OMPI_COMM_WORLD_RANK": str(r),
                "OMPI_COMM_WORLD_SIZE": "2",
                "OMPI_COMM_WORLD_LOCAL_RANK": str(r),
                "OMPI_COMM_WORLD_LOCAL_SIZE": "2",
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
            },
        )
        for r in (0, 1)
    ]
    outputs = [rank.communicate(timeout=600)[0] for rank in ranks]
    assert [rank.returncode for rank in ranks] == [0, 0], outputs
    assert "2 rank(s), ZeRO-1" in outputs[0]
    assert train_losses(run) == train_losses(runs(1, "fp32"))
    assert sorted(p.name for p in (run / "checkpoints" / "step-00000006").glob("megatrain-rank*.pt")) == [
        "megatrain-rank00000.pt",
        "megatrain-rank00001.pt",
    ]


def test_initial_weights_are_the_same_in_every_layout(tmp_path, small_data):
    """Built where they are kept (meta device, then each rank's device; ZeRO-3 partitioned
    as built; tensor-parallel shards cut on the meta device), the weights at step 0 equal
    those of the plain GPT built whole in one process, bitwise, for 2 pipeline stages of 2
    tensor-parallel ranks (gathered), 2 tensor-parallel ranks under ZeRO-1 (ZeRO 0-2 without
    tensor parallelism build the same way: each rank keeps all of what the ranks drew in
    turn) and ZeRO-3. The tensor-parallel and ZeRO-3 models have an MLP weight of two init
    pieces (gpt.INIT_PIECE): the tensor-parallel ranks draw one each and sum them; rank 1's
    ZeRO-3 slice straddles them, and each rank draws only the pieces of its slice."""
    from helpers import TINY_CONFIG

    from megatrain.config import load_config
    from megatrain.model.gpt import INIT_PIECE

    cfg = load_config(TINY_CONFIG, [f"data.path={small_data}"])
    wide = ["model.d_model=1280", "model.n_head=8", "model.n_layer=1"]  # mlp.fc: 4 x 1280^2 = 1.56 pieces
    for name, nproc, layout in [
        ("tp2-pipeline", 4, ["parallel.tensor_parallel=2", *PIPE]),
        ("tp2-wide", 2, ["parallel.tensor_parallel=2", "parallel.zero_stage=1", *wide]),
        ("zero3-wide", 2, ["parallel.zero_stage=3", *wide]),
    ]:
        run = tmp_path / name
        pretrain(run, small_data, *layout, "train.max_steps=0", "train.eval_every=0", nproc=nproc)
        sd, model_cfg = consolidate(run / "checkpoints" / "step-00000000")
        whole = GPT(GPTConfig(**{**model_cfg.__dict__, "init_seed": cfg.run.seed})).state_dict()
        assert sd.keys() == whole.keys()
        assert all(torch.equal(sd[k], whole[k]) for k in whole), name
    assert INIT_PIECE < whole["blocks.0.mlp.fc.weight"].numel() < 2 * INIT_PIECE


@pytest.mark.parametrize("layout", ["zero1", "zero3", "pipeline"])
def test_hugging_face_export_gives_the_same_logits_and_greedy_text(
    layout, runs, p2_run, small_data, small_tokenizer, tmp_path
):
    """launch/export_hf.py from a run directory: transformers loads it offline as
    GPT2LMHeadModel with its tokenizer; its fp32 logits equal megatrain's within 1e-4 on
    random and real inputs, and its greedy generation equals megatrain's (KV cache) token
    for token, from a prompt its own tokenizer encoded."""

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tokenizer import Tokenizer

    run = {"zero1": lambda: runs(1, "fp32"), "zero3": lambda: runs(3, "fp32"), "pipeline": lambda: p2_run}[
        layout
    ]()
    out = tmp_path / "hf"
    run_script("export_hf.py", run, "--out", out, env={"HF_HUB_OFFLINE": "1"})  # the run's tokenizer
    hf = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    assert type(hf).__name__ == "GPT2LMHeadModel" and hf.generation_config.eos_token_id == 4
    sd, cfg = consolidate(run / "checkpoints" / "step-00000006")
    ours = GPT(cfg).eval()
    ours.load_state_dict(sd)
    valid = TokenDataset(small_data, cfg.seq_len, split="valid")
    real = torch.from_numpy(valid.batch(np.arange(4))).long()[:, :-1]
    rand = torch.randint(0, cfg.vocab_size, (3, cfg.seq_len), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for idx in (real, rand):
            assert float((hf(idx).logits - ours(idx)).abs().max()) < 1e-4
    hf_tok, tok = AutoTokenizer.from_pretrained(out, local_files_only=True), Tokenizer.load(small_tokenizer)
    text = "def parse(self, text):\n    return"
    prompt = hf_tok(text, return_tensors="pt")["input_ids"]
    assert prompt[0].tolist() == tok.encode(text)
    greedy = ours.generate(prompt, 16, temperature=0)
    theirs = hf.generate(
        prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=16, do_sample=False, eos_token_id=None
    )
    assert torch.equal(greedy, theirs) and hf_tok.decode(theirs[0]) == tok.decode(greedy[0].tolist())


def test_export_refuses_a_damaged_checkpoint(runs, small_tokenizer, tmp_path):
    run = copy_until(runs(1, "fp32"), tmp_path / "run", step=6)
    target = run / "checkpoints" / "step-00000006" / "mp_rank_00_model_states.pt"
    target.write_bytes(target.read_bytes()[:-100])
    out = tmp_path / "hf"
    args = (target.parent, "--tokenizer", small_tokenizer, "--out", out)
    proc = run_script("export_hf.py", *args, check=False)
    assert proc.returncode == 2 and "mp_rank_00_model_states.pt" in proc.stderr.strip().splitlines()[-1]
    assert not out.exists() and not list(tmp_path.glob(".hf.tmp"))


def test_generate_script_streams_greedy_text_and_cuts_long_prompts(
    runs, small_tokenizer, small_data, tmp_path
):
    """launch/generate.py on a run, with the tokenizer the run keeps (no --tokenizer): greedy
    text equals the model's own greedy continuation; a prompt longer than the context keeps
    its last tokens and says so."""
    from tokenizer import Tokenizer

    run = runs(1, "fp32")
    script = [
        sys.executable,
        str(REPO / "launch" / "generate.py"),
        "--checkpoint",
        str(run),
        "--max-new-tokens",
        "12",
        "--temperature",
        "0",
    ]
    proc = subprocess.run([*script, "--prompt", "def parse("], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    tok = Tokenizer.load(small_tokenizer)
    sd, cfg = consolidate(run / "checkpoints" / "step-00000006")
    model = GPT(cfg).eval()
    model.load_state_dict(sd)
    ids = tok.encode("def parse(")
    new = model.generate(torch.tensor([ids]), 12, temperature=0, eos_id=tok.eod_id)[0, len(ids) :].tolist()
    expected = "def parse(" + tok.decode([i for i in new if i != tok.eod_id])
    assert (
        proc.stdout[proc.stdout.index("def parse(") :] == expected + "\n"
    )  # after DeepSpeed's import banner
    long = "x = 1\n" * 40
    proc = subprocess.run([*script, "--prompt", long, "--num-samples", "2"], capture_output=True, text=True)
    assert proc.returncode == 0 and f"generating from its last {cfg.seq_len - 1}" in proc.stderr
    assert proc.stdout.count("--- sample") == 2
    prompts = tmp_path / "prompts.txt"  # two prompts of one length form one batch, the third its own
    prompts.write_text("def f(\nimport os\ndef g(\n")
    proc = subprocess.run(
        [*script, "--prompt-file", str(prompts), "--num-samples", "2"], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    heads = [line for line in proc.stdout.splitlines() if line.startswith("--- prompt")]
    assert heads == [f"--- prompt {i}, sample {j}" for i in (1, 2, 3) for j in (1, 2)]
    # --device and --dtype: the model's own greedy text in bf16; a device that is not here is one line
    proc = subprocess.run(
        [*script, "--prompt", "def parse(", "--device", "cpu", "--dtype", "bf16"],
        capture_output=True,
        text=True,
    )
    bf16 = load_model(run, tok, "cpu", torch.bfloat16)
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    new = bf16.generate(torch.tensor([ids]), 12, temperature=0, eos_id=tok.eod_id)[0, len(ids) :].tolist()
    expected = "def parse(" + tok.decode([i for i in new if i != tok.eod_id])
    assert proc.returncode == 0 and proc.stdout[proc.stdout.index("def parse(") :] == expected + "\n", (
        proc.stderr
    )
    if not torch.cuda.is_available():
        proc = subprocess.run([*script, "--prompt", "x", "--device", "cuda"], capture_output=True, text=True)
        assert proc.returncode == 2 and "no CUDA device here" in proc.stderr.strip().splitlines()[-1]


def test_evaluate_script_scores_documents_in_bits_per_byte(runs, small_tokenizer, small_data, tmp_path):
    """launch/evaluate.py on real files and on a prepared data directory: the JSON has the
    promised fields, per file; bits per byte follow from the loss, tokens and bytes; an
    empty corpus is one line of error."""
    import json
    import math

    from helpers import SMALL_CORPUS

    run = runs(1, "fp32")
    script = [
        sys.executable,
        str(REPO / "launch" / "evaluate.py"),
        "--checkpoint",
        str(run),
        "--tokenizer",
        str(small_tokenizer),
        "--quiet",
        "--stride",
        "16",
    ]
    files = sorted(Path(SMALL_CORPUS[0]).glob("*.py"))[:3]
    for inputs in ([str(f) for f in files], [str(small_data)]):
        out = tmp_path / "eval.json"
        proc = subprocess.run(
            [*script, "--input", *inputs, "--json", str(out)], capture_output=True, text=True
        )
        assert proc.returncode == 0, proc.stderr
        result = json.loads(out.read_text())
        assert {"loss", "perplexity", "bits_per_byte", "tokens", "bytes", "documents", "files"} <= set(result)
        assert result["documents"] > 0 and result["bytes"] > result["tokens"] > 0
        assert result["bits_per_byte"] == pytest.approx(
            result["loss"] * result["tokens"] / math.log(2) / result["bytes"]
        )
        assert 0 < result["bits_per_byte"] < 8 * 2  # better than nothing, on text the run trained on
        assert sum(f["documents"] for f in result["files"]) == result["documents"]
    # in bf16 (half the memory): nearly the same figure
    proc = subprocess.run(
        [*script, "--input", str(small_data), "--json", str(tmp_path / "bf16.json"), "--dtype", "bf16"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    bf16 = json.loads((tmp_path / "bf16.json").read_text())
    assert bf16["tokens"] == result["tokens"] and bf16["loss"] == pytest.approx(result["loss"], rel=0.02)
    assert bf16["loss"] != result["loss"]  # it did run in bf16
    assert [f["path"] for f in json.loads((tmp_path / "eval.json").read_text())["files"]] == [str(small_data)]
    (tmp_path / "empty").mkdir()
    proc = subprocess.run([*script, "--input", str(tmp_path / "empty")], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("error: ")


def test_export_in_bf16_and_one_line_refusals(runs, small_tokenizer, tmp_path):
    """--dtype bf16 writes bf16 weights; a checkpoint whose weights do not fit the shape it
    records, a tokenizer of other data, and a run that keeps no tokenizer without
    --tokenizer are each refused with one line (exit 2)."""
    import json

    from helpers import SMALL_CORPUS, run_script
    from transformers import AutoModelForCausalLM

    run = runs(1, "fp32")
    export = [sys.executable, str(REPO / "launch" / "export_hf.py")]
    proc = subprocess.run(
        [
            *export,
            str(run),
            "--tokenizer",
            str(small_tokenizer),
            "--out",
            str(tmp_path / "bf16"),
            "--dtype",
            "bf16",
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", local_files_only=True, dtype="auto")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    other = tmp_path / "other-tok"
    run_script(
        "train_tokenizer.py", "--input", SMALL_CORPUS[0], "--vocab-size", "500", "--out", other, "--quiet"
    )
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "launch" / "generate.py"),
            "--checkpoint",
            str(run),
            "--tokenizer",
            str(other),
            "--prompt",
            "x",
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "not the tokenizer the run's data" in proc.stderr.strip().splitlines()[-1]
    bad = copy_until(run, tmp_path / "bad", step=6)
    state_file = bad / "checkpoints" / "step-00000006" / "megatrain.json"
    state = json.loads(state_file.read_text())
    state["model_shape"]["n_layer"] = 3
    state_file.write_text(json.dumps(state))
    manifest = bad / "checkpoints" / "step-00000006" / "manifest.json"  # keep the checksums consistent
    entries = json.loads(manifest.read_text())
    from megatrain.files import file_sha256

    entries["files"]["megatrain.json"] = {
        "bytes": state_file.stat().st_size,
        "sha256": file_sha256(state_file),
    }
    manifest.write_text(json.dumps(entries))
    proc = subprocess.run(
        [*export, str(bad), "--tokenizer", str(small_tokenizer), "--out", str(tmp_path / "x")],
        capture_output=True,
        text=True,
    )
    last = proc.stderr.strip().splitlines()[-1]
    assert (
        proc.returncode == 2
        and "the weights do not fit the model shape" in last
        and not (tmp_path / "x").exists()
    )
    # a run made before runs kept their tokenizer: without --tokenizer, one line saying so
    shutil.rmtree(bad / "tokenizer")
    proc = run_script("export_hf.py", bad, "--out", tmp_path / "x", check=False)
    assert proc.returncode == 2 and not (tmp_path / "x").exists()
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: {bad}: no tokenizer kept in this run directory (made before runs kept one): give --tokenizer"
    )
