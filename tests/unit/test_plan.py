"""The planner (megatrain/plan.py, launch/plan.py): its model states against DeepSpeed's own
estimators, how the layout moves each part, the search, the CLI's JSON."""

from __future__ import annotations

import json

import pytest
from helpers import REPO, run_script

from megatrain.config import load_config
from megatrain.layout import Layout
from megatrain.model import GPTConfig, param_count
from megatrain.plan import layouts, per_rank_bytes, plan, search

GPT3_13B = REPO / "configs" / "gpt3-13b.yaml"


def config(*sets: str):
    cfg = load_config(GPT3_13B, list(sets))
    return cfg, GPTConfig.from_config(cfg, 50257)


def model_states(parts: dict) -> float:
    return parts["params"] + parts["grads"] + parts["optimizer"]


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("gpt3-*.yaml")), ids=lambda p: p.stem)
def test_model_states_against_deepspeeds_estimators(path):
    """bf16 on 16 data-parallel ranks, every GPT-3 config, term by term. ZeRO-2: DeepSpeed's
    2N + 18N/G less the 16-bit gradient share, which its engine frees as it makes the fp32
    one (its estimator counts both): within 5%. ZeRO-3: its 18N/G plus the 16-bit parameter
    share its estimator leaves out, less the fp32 gradients beyond one sub-group (the
    engine makes them a sub-group at a time); its largest layer gathered the planner counts
    under buffers. What the engine allocates: tests/e2e/test_plan_memory.py."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    flat = ["parallel.tensor_parallel=1", "parallel.pipeline_stages=1", "parallel.sequence_parallel=false"]
    cfg = load_config(path, flat)
    m = GPTConfig.from_config(cfg, 50257)
    n, gpus = param_count(m), 16
    _, zero2 = estimate_zero2_model_states_mem_needs(n, num_gpus_per_node=8, num_nodes=2, cpu_offload=False)
    _, zero3, largest = estimate_zero3_model_states_mem_needs(
        n, 12 * m.d_model**2, num_gpus_per_node=8, num_nodes=2, cpu_offload=False
    )
    share = n / gpus
    expected = {2: zero2 - 2 * share, 3: zero3 - largest + 2 * share - 4 * max(0.0, share - 1e9)}
    ours = {z: model_states(per_rank_bytes(cfg, m, Layout(z, 1, 1, gpus, 1, True))) for z in (2, 3)}
    for stage in (2, 3):
        assert ours[stage] == pytest.approx(expected[stage], rel=1e-6), stage
    assert ours[2] == pytest.approx(zero2, rel=0.05)


def test_each_layout_moves_its_part():
    cfg, m = config()
    at = {z: per_rank_bytes(cfg, m, Layout(z, 1, 1, 8, 1, True)) for z in range(4)}
    # ZeRO-1 in bf16 sums gradients in fp32 (DeepSpeed's BF16_Optimizer): whole fp32 ones beside the bf16
    assert at[1]["optimizer"] < at[0]["optimizer"] and at[1]["grads"] == pytest.approx(3 * at[0]["params"])
    bf16_sums = config("train.grad_accum_dtype=bf16")[0]
    assert per_rank_bytes(bf16_sums, m, Layout(1, 1, 1, 8, 1, True))["grads"] == pytest.approx(
        at[0]["params"]
    )
    assert at[0]["grads"] == pytest.approx(3 * at[0]["params"])  # bf16 and DeepSpeed's fp32 copy
    assert at[2]["grads"] < at[1]["grads"] and at[3]["params"] < at[2]["params"]
    assert at[3]["total"] < at[2]["total"] < at[1]["total"] < at[0]["total"]
    tp = per_rank_bytes(cfg, m, Layout(1, 8, 1, 1, 1, True))
    assert (
        at[1]["params"] / 8 < tp["params"] < at[1]["params"] / 6
    )  # the blocks split 8 ways, the embeddings whole
    no_ckpt = per_rank_bytes(cfg, m, Layout(1, 1, 1, 8, 1, False))
    assert no_ckpt["activations"] > 5 * at[1]["activations"]
    # Sequence parallelism splits the rest of a block's activations (10 of 34 per token) too.
    tp8, sp8 = (
        per_rank_bytes(cfg, m, Layout(1, 8, 1, 1, 1, False, sequence_parallel=sp)) for sp in (False, True)
    )
    logits = 2048 * 50257 / 8 * (2 + 8)  # s * V / T * (w + 8), split either way
    assert (sp8["activations"] - logits) == pytest.approx((tp8["activations"] - logits) * 34 / (10 * 8 + 24))
    pipe = per_rank_bytes(cfg, m, Layout(1, 1, 4, 2, 1, True))
    assert pipe["params"] < at[1]["params"] / 2


def test_fits_search_and_the_set_line():
    cfg, m = config()
    mine = plan(cfg, m, Layout.from_config(cfg, 64), device_memory=80e9, peak_flops=989e12)
    assert mine["fits"] and mine["layout"]["zero_stage"] == 3 and mine["layout"]["data_parallel"] == 64
    assert not plan(cfg, m, Layout.from_config(cfg, 64), device_memory=1e9, peak_flops=989e12)["fits"]
    assert 1 < mine["train_days"] < 1000 and mine["tokens_per_s"] > 0
    assert mine["checkpoint_bytes"] == param_count(m) * 14  # bf16 weights, fp32 masters and two moments
    assert sum(s["to_tokens"] - s["from_tokens"] for s in mine["ramp_stages"]) == pytest.approx(300e9)
    found = search(cfg, m, gpus=64, gpus_per_node=8, device_memory=80e9, peak_flops=989e12)
    assert found and all(p["fits"] for p in found)
    assert [p["step_time_s"] for p in found] == sorted(p["step_time_s"] for p in found)
    best = found[0]["layout"]
    again = load_config(GPT3_13B, [s.removeprefix("--set ") for s in found[0]["sets"].split(" --set ")])
    assert Layout.from_config(again, 64).as_dict() == best
    assert not search(cfg, m, gpus=8, gpus_per_node=8, device_memory=2e9, peak_flops=989e12)
    # The tensor ranks split the vocabulary: GPT-3's 50257 pieces allow no tensor parallelism, 50304 do.
    assert {lay.tensor_parallel for lay in layouts(cfg, m, 64, 8)} == {1}  # m: 50257
    padded = GPTConfig.from_config(cfg, 50304)
    assert {lay.tensor_parallel for lay in layouts(cfg, padded, 64, 8)} == {1, 2, 4, 8}


def test_cli_json_and_bad_input(tmp_path, small_data):
    out = tmp_path / "plan.json"
    proc = run_script(
        "plan.py", "--config", GPT3_13B, "--gpus", 64, "--gpu", "h100", "--search", "--json", out
    )
    assert "best: --set parallel.zero_stage=" in proc.stdout
    got = json.loads(out.read_text())
    assert set(got["layout"]) == {
        "zero_stage",
        "tensor_parallel",
        "pipeline_stages",
        "data_parallel",
        "micro_batch",
        "activation_checkpointing",
        "expert_parallel",
        "sequence_parallel",
    }
    assert {"params", "grads", "optimizer", "activations", "buffers", "total"} <= set(got["per_rank_bytes"])
    for key in (
        "fits",
        "host_bytes_per_node",
        "checkpoint_bytes",
        "step_time_s",
        "tokens_per_s",
        "train_days",
    ):
        assert key in got
    assert got["candidates"] and all(c["fits"] for c in got["candidates"])
    # The vocabulary from the data's manifest when the data exists.
    proc = run_script(
        "plan.py",
        "--config",
        GPT3_13B,
        "--set",
        f"data.path={small_data}",
        "--gpus",
        8,
        "--gpu-mem-gb",
        80,
        "--peak-tflops",
        300,
    )
    assert "vocabulary 1024 (" in proc.stdout
    for bad, message in (
        (["--gpu", "v100"], "error: --gpu v100: not a known GPU; known: h100-pcie, h100"),
        (
            ["--gpu", "h100", "--set", "parallel={tensor_parallel: 8, zero_stage: 1}", "--gpus", 12],
            "error: --gpus 12: the config's layout needs a multiple of parallel.tensor_parallel x "
            "parallel.pipeline_stages = 8 GPUs",
        ),
        (
            ["--config", REPO / "configs" / "gpt3-175b.yaml", "--gpu", "h100", "--search"],
            "error: --gpus 8: the config's layout needs a multiple of parallel.tensor_parallel x "
            "parallel.pipeline_stages = 64 GPUs",
        ),
        (
            ["--config", REPO / "configs" / "gpt3-175b.yaml", "--gpu", "h100", "--search"]
            + ["--set", "parallel={tensor_parallel: 1, pipeline_stages: 1, sequence_parallel: false}"],
            "error: " + str(REPO / "configs" / "gpt3-175b.yaml") + ": no layout of 8 GPUs fits 80 GB "
            "per GPU; the fewest that can: --gpus 64",
        ),
    ):
        proc = run_script("plan.py", "--config", GPT3_13B, "--gpus", 8, *bad, check=False)
        assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith(message), proc.stderr


def test_llama_counts_its_own_parameters_and_widths():
    """configs/llama-1b.yaml: one rank's weights are the model's (GQA's narrow k|v, SwiGLU's
    three matrices, the untied head) in bf16; tensor parallelism splits the blocks and the
    vocabulary tables (input and output), not the final norm; its FLOPs follow the same
    matmul weights."""
    import torch

    from megatrain.model import GPT, flops_per_token, matmul_params

    cfg = load_config(REPO / "configs" / "llama-1b.yaml", [])
    m = GPTConfig.from_config(cfg, 32000)
    one = per_rank_bytes(cfg, m, Layout(0, 1, 1, 1, 1, True))
    assert one["params"] == 2 * param_count(m) and param_count(m) == pytest.approx(1.10e9, rel=0.01)
    tp = per_rank_bytes(cfg, m, Layout(1, 2, 1, 1, 1, True))
    assert tp["params"] / 2 == pytest.approx((param_count(m) - m.d_model) / 2 + m.d_model)  # the norm whole
    # The 6N of the FLOPs: every weight a token meets in a matmul, counted on a small built model.
    small = GPTConfig(
        vocab_size=64,
        seq_len=8,
        n_layer=2,
        n_head=4,
        d_model=16,
        arch="llama",
        n_kv_head=2,
        ffn_hidden=40,
        tie_embeddings=False,
    )
    model = GPT(small)
    linear = sum(mod.weight.numel() for mod in model.modules() if isinstance(mod, torch.nn.Linear))
    norms = sum(p.numel() for n, p in model.named_parameters() if "ln" in n)
    assert matmul_params(small) == linear + norms
    assert flops_per_token(small) > 6 * linear


def test_plan_script_plans_the_model_of_model_init_from(tmp_path):
    """launch/plan.py with model.init_from: the shape is the source's (a Hugging Face config here)."""
    import transformers
    from helpers import run_script

    transformers.GPT2LMHeadModel(
        transformers.GPT2Config(
            vocab_size=96, n_positions=64, n_embd=32, n_layer=3, n_head=4, bos_token_id=0, eos_token_id=0
        )
    ).save_pretrained(tmp_path / "hf")
    config = tmp_path / "continued.yaml"
    config.write_text(
        f"model: {{init_from: {tmp_path / 'hf'}}}\ndata: {{path: d}}\n"
        "train: {seq_len: 64, micro_batch: 2, max_steps: 10}\n"
    )
    out = run_script("plan.py", "--config", config, "--gpus", "1", "--gpu", "h100").stdout
    assert f"vocabulary 96 (model.init_from {tmp_path / 'hf'})" in out, out
    with pytest.raises(AssertionError, match="model.n_layer is 2 in the config, 3 in the source"):
        run_script("plan.py", "--config", config, "--gpus", "1", "--gpu", "h100", "--set", "model.n_layer=2")


def test_gpu_peaks_by_device_name():
    """The data-sheet row a device name finds: the NVL cards have lower peaks than the SXM
    parts whose names they contain; an unknown device has none (no MFU rather than a wrong one)."""
    from megatrain.train.mfu import table_peak

    names = {
        "NVIDIA H200": 989,
        "NVIDIA H200 NVL": 835,
        "NVIDIA H100 80GB HBM3": 989,
        "NVIDIA H100 NVL": 835,
        "NVIDIA H100 PCIe": 756,
        "NVIDIA A100-SXM4-80GB": 312,
    }
    for name, tflops in names.items():
        assert table_peak(name, "bf16")[0] == tflops * 1e12, name
    assert table_peak("NVIDIA H200 NVL", "tf32") == (418e12, "H200 NVL tf32 data sheet")
    assert table_peak("NVIDIA B200", "bf16") is None


def test_gpt3_175b_on_1024_a100s_uses_all_three_axes():
    """docs/planning.md: for 175B on 1,024 A100-80GB the search's best splits tensors within
    a node, layers into stages and the batch over replicas, in about the 34 days Megatron-LM
    reports for 300B tokens; Megatron's own layout (Narayanan et al. 2021: tensor 8 x
    pipeline 8 x data 16) is within 5% of it; the layouts megatrain had before (no pipeline
    under tensor parallelism, no sequence parallelism) are at least 1.2x slower."""
    cfg = load_config(REPO / "configs" / "gpt3-175b.yaml", [])
    m = GPTConfig.from_config(cfg, 50304)
    found = search(cfg, m, gpus=1024, gpus_per_node=8, device_memory=80e9, peak_flops=312e12)
    best = found[0]
    lay = best["layout"]
    assert lay["tensor_parallel"] == 8 and lay["pipeline_stages"] > 1 and lay["data_parallel"] > 1
    assert 30 < best["train_days"] < 40
    megatron = [
        p
        for p in found
        if (p["layout"]["tensor_parallel"], p["layout"]["pipeline_stages"], p["layout"]["data_parallel"])
        == (8, 8, 16)
    ]
    assert megatron[0]["step_time_s"] < 1.05 * best["step_time_s"]
    before = [
        p
        for p in found
        if not p["layout"]["sequence_parallel"]
        and 1 in (p["layout"]["tensor_parallel"], p["layout"]["pipeline_stages"])
    ]
    assert before[0]["step_time_s"] > 1.2 * best["step_time_s"]
