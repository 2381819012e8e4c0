"""On a CUDA device: the fused kernel against a float64 reference, the trainer in bf16 under
ZeRO 0-3 and with activation checkpointing, fp16's loss scale, and the device-placement
rules. Skipped only when CUDA is absent (`make test-gpu` runs them; see docs/gpu.md for
where they have run). In the order of what matters most, so that a lent machine's time
limit cuts the least important: the kernel, the device rules, bf16 training under ZeRO-1
and ZeRO-3 and fp16's first-step overflow, then the rest. Runs are plain processes (a
world of one) except one through the deepspeed launcher: it is the same code, and a
launcher start costs seconds the machine's lease does not have."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import pretrain, train_losses

from megatrain.optim.fused_adamw import FusedAdamWClip, fused_op_runs_on
from megatrain.train.metrics import read_metrics

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
CUDA = torch.device("cuda")


def _reference_step(params, grads, lr, betas, eps, wd, max_norm, steps):
    """torch AdamW + clip_grad_norm_ in float64 on the CPU."""
    ps = [p.detach().double().cpu().clone().requires_grad_(True) for p in params]
    opt = torch.optim.AdamW(ps, lr=lr, betas=betas, eps=eps, weight_decay=wd, foreach=False)
    for _ in range(steps):
        for p, g in zip(ps, grads, strict=True):
            p.grad = g.double().cpu()
        torch.nn.utils.clip_grad_norm_(ps, max_norm)
        opt.step()
    return ps


@pytest.mark.parametrize("sizes", [[1, 3, 1023, 4097, 65537], [7] * 300, [2**20 + 13, 5]])
@pytest.mark.parametrize("scale", [1e-3, 10.0])  # clipping off / on
def test_cuda_kernel_matches_float64_reference(sizes, scale):
    assert fused_op_runs_on("cuda"), "the op was built without CUDA kernels on a CUDA machine"
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(n, device=CUDA)) for n in sizes]
    grads = [torch.randn(n, device=CUDA) * scale for n in sizes]
    start = [p.detach().clone() for p in params]
    opt = FusedAdamWClip(params, lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, max_grad_norm=1.0)
    assert opt.uses_fused_op_on(CUDA)
    for _ in range(3):
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
        opt.step()
    ref = _reference_step(start, grads, 1e-3, (0.9, 0.95), 1e-8, 0.1, 1.0, steps=3)
    ours = torch.cat([p.detach().double().cpu() for p in params])
    want = torch.cat([p.detach() for p in ref])
    assert float((ours - want).abs().max() / want.abs().max()) < 1e-6


def test_cuda_kernel_skips_a_non_finite_step():
    p = torch.nn.Parameter(torch.ones(1001, device=CUDA))
    opt = FusedAdamWClip([p], lr=1e-2)
    p.grad = torch.full_like(p, float("nan"))
    opt.step()
    assert torch.equal(p.detach(), torch.ones_like(p)) and int(opt.skipped_steps) == 1


def test_cuda_binding_refuses_tensors_on_two_devices():
    """The binding makes the parameters' device current and refuses moments elsewhere (one
    line, not a launch on the wrong device)."""
    p, g = torch.zeros(8, device=CUDA), torch.ones(8, device=CUDA)
    m, v = torch.zeros(8), torch.zeros(8)  # on the host
    step, skipped = torch.zeros((), device=CUDA), torch.zeros((), dtype=torch.int64, device=CUDA)
    with pytest.raises(RuntimeError, match="moments must be on the parameters' device"):
        torch.ops.megatrain.adamw_clip_step_(
            [p], [g], [m], [v], [1e-3], [0.0], 0.9, 0.95, 1e-8, torch.ones(1, device=CUDA), 1.0, step, skipped
        )


def test_cuda_kernel_past_2_to_the_31_elements():
    """A tensor of more than 2^31 elements (indexing in 64 bits), when memory allows."""
    n = 2**31 + 5
    free, _ = torch.cuda.mem_get_info()
    if free < 5 * 4 * n:
        pytest.skip(f"needs {5 * 4 * n / 2**30:.0f} GiB free on the device")
    p = torch.nn.Parameter(torch.zeros(n, device=CUDA))
    p.grad = torch.ones(n, device=CUDA)
    opt = FusedAdamWClip([p], lr=1e-3, weight_decay=0.0, max_grad_norm=0.0)
    opt.step()
    assert float(p[-1]) == pytest.approx(-1e-3, rel=1e-5) and float(p[0]) == pytest.approx(-1e-3, rel=1e-5)
    del p, opt
    torch.cuda.empty_cache()


def test_collectives_and_losses_live_on_the_device():
    from megatrain.train import distributed as dist

    assert dist.collective_device().type == "cuda"
    t = torch.tensor([1.5, 2.5], dtype=torch.float64, device=dist.collective_device())
    assert dist.all_reduce_mean(t) == [1.5, 2.5]
    json.dumps(dist.all_reduce_mean([3.0]))  # plain floats come back


def test_rng_state_is_the_ranks_own_gpu():
    from megatrain.train.state import RNG

    saved = RNG().state_dict()
    drawn = torch.rand(5, device=CUDA)
    RNG().load_state_dict(saved)
    assert torch.equal(torch.rand(5, device=CUDA), drawn)
    # one generator's state, not every visible GPU's (a resume on fewer GPUs per machine has no generator for
    # them)
    assert isinstance(saved["cuda"], torch.Tensor)


@pytest.mark.parametrize("stage", [1, 3])
def test_trainer_bf16_on_one_gpu(stage, tmp_path, small_data):
    """20 steps on one GPU (ZeRO-1 through the deepspeed launcher): the loss falls; the MFU
    comes from the data-sheet table for a known device, never from a CPU probe. ZeRO 1 and 3
    resume on each other's stage (the layout-free state loaded into CUDA tensors, ZeRO-3 as
    source and as target)."""
    _trainer_bf16(stage, tmp_path, small_data)


def _trainer_bf16(stage: int, tmp_path, small_data) -> None:
    run = tmp_path / "run"
    nproc = 1 if stage == 1 else 0
    pretrain(
        run,
        small_data,
        f"parallel.zero_stage={stage}",
        "train.precision=bf16",
        "train.max_steps=20",
        "train.peak_flops=null",
        "checkpoint.every_steps=10",
        nproc=nproc,
    )
    losses = train_losses(run)
    assert len(losses) == 20 and losses[-1] < losses[0]
    rows = [r for r in read_metrics(run) if r["kind"] == "train"]
    name = torch.cuda.get_device_name()
    if any(k in name for k in ("A100", "H100", "H200", "L40S")):
        assert rows[-1]["mfu_peak"].endswith("bf16 data sheet") and 0 < rows[-1]["mfu"] < 1
    else:
        assert "mfu" not in rows[-1]
    # Resumed from step 10 on the GPU, one launch per stage: ZeRO 0 and 2 on their own stage
    # (DeepSpeed's own load), ZeRO 1 and 3 on each other's.
    resumed = stage if stage % 2 == 0 else (stage + 2) % 4
    proc = pretrain(
        run,
        small_data,
        f"parallel.zero_stage={resumed}",
        "train.precision=bf16",
        "train.max_steps=20",
        "train.peak_flops=null",
        "checkpoint.every_steps=10",
        nproc=0,
        resume=str(run / "checkpoints" / "step-00000010"),
    )
    converted = f"to 1 data-parallel rank(s), ZeRO-{resumed}" in proc.stdout
    assert converted == (resumed != stage)
    assert train_losses(run) == pytest.approx(losses, rel=1e-2)


def test_fp16_first_steps_overflow_and_are_skipped(tmp_path, small_data):
    """fp16 under ZeRO-1 with megatrain's fused clip, the loss scale starting at 2^32: the
    first steps overflow and DeepSpeed skips them without calling the optimizer (the norm
    was read as None there: a TypeError at step 1, again at every restart). They log an
    infinite norm and count as skipped, the scale comes down, and training goes on."""
    run = tmp_path / "run"
    pretrain(
        run,
        small_data,
        "parallel.zero_stage=1",
        "train.precision=fp16",
        "deepspeed.fp16.initial_scale_power=32",
        "train.max_steps=12",
        "checkpoint.every_steps=0",
        "train.eval_every=0",
        nproc=0,
    )
    rows = [r for r in read_metrics(run) if r["kind"] == "train"]
    assert rows[0]["grad_norm"] == math.inf and rows[0]["skipped_steps"] == 1
    skipped = rows[-1]["skipped_steps"]
    assert 1 <= skipped < 12 and all(math.isfinite(r["grad_norm"]) for r in rows[skipped:])
    assert rows[-1]["loss_scale"] < 2**32 and rows[-1]["loss"] < rows[skipped]["loss"]


@pytest.mark.parametrize("stage", [0, 2])
def test_trainer_bf16_on_one_gpu_zero0_and_2(stage, tmp_path, small_data):
    """As ZeRO 1 and 3 (above), each resumed on its own stage by DeepSpeed's own load."""
    _trainer_bf16(stage, tmp_path, small_data)


def test_activation_checkpointing_on_gpu(tmp_path, small_data):
    run = tmp_path / "run"
    pretrain(
        run,
        small_data,
        "model.activation_checkpointing=true",
        "train.precision=bf16",
        "train.max_steps=10",
        nproc=0,
    )
    rows = [r for r in read_metrics(run) if r["kind"] == "train"]
    assert rows[-1]["loss"] < rows[0]["loss"] and rows[-1]["hfu"] > rows[-1]["mfu"]


@pytest.mark.parametrize("optimizer", ["fused_adamw", "adamw"])
def test_fp16_and_its_loss_scale_across_a_reshard_on_gpu(optimizer, tmp_path, small_data):
    """fp16 on one GPU under ZeRO-0, where DeepSpeed wraps megatrain's optimizer in its
    FP16_UnfusedOptimizer and its own FusedAdam (optim.name=adamw) in FP16_Optimizer, which
    keeps flat fp32 masters: the loss falls and the scale is logged; starting at 2^24,
    overflows bring it down in the first steps, and a resume from step 10 on ZeRO-1 goes on
    from the scale reached, not from 2^24 again, and from the masters (the same losses)."""
    run = tmp_path / "run"
    sets = [
        "train.precision=fp16",
        "train.max_steps=20",
        "checkpoint.every_steps=10",
        "deepspeed.fp16.initial_scale_power=24",
        f"optim.name={optimizer}",
    ]
    pretrain(run, small_data, "parallel.zero_stage=0", *sets, nproc=0)
    rows = [r for r in read_metrics(run) if r["kind"] == "train"]
    scales, losses = [r["loss_scale"] for r in rows], [r["loss"] for r in rows]
    assert all(math.isfinite(s) for s in scales) and scales[9] < 2**24, scales
    assert losses[-1] < losses[0]
    proc = pretrain(
        run,
        small_data,
        "parallel.zero_stage=1",
        *sets,
        nproc=0,
        resume=str(run / "checkpoints" / "step-00000010"),
    )
    assert "to 1 data-parallel rank(s), ZeRO-1" in proc.stdout
    resumed = [r for r in read_metrics(run) if r["kind"] == "train"]
    # ZeRO-1's scaler has hysteresis (ZeRO-0's has none to carry): an overflow at step 11
    # would not move it yet, so step 11 logs the scale carried over
    assert resumed[10]["step"] == 11 and resumed[10]["loss_scale"] == scales[9]
    assert [r["loss"] for r in resumed] == pytest.approx(losses, rel=1e-2)


def test_llama_with_z_loss_and_qk_norm_on_gpu(tmp_path, small_data):
    """The llama architecture in bf16 on one GPU (rotary angles, RMSNorm in fp32, the z term
    kept on the device): the loss falls and the z-loss metric is logged."""
    run = tmp_path / "run"
    pretrain(
        run,
        small_data,
        "model.arch=llama",
        "model.n_head=4",
        "model.n_kv_head=2",
        "model.qk_norm=true",
        "optim.z_loss=1e-4",
        "train.precision=bf16",
        "train.max_steps=10",
        nproc=0,
    )
    rows = [r for r in read_metrics(run) if r["kind"] == "train"]
    assert rows[-1]["loss"] < rows[0]["loss"] and all(r["z_loss"] > 0 for r in rows)


def test_generate_and_evaluate_on_the_gpu(tmp_path, small_data, small_tokenizer):
    """launch/generate.py and launch/evaluate.py take a GPU by default: greedy text and the
    scores as on the CPU (fp32). The run trains its fp32 matmuls in TF32 (train.tf32), and
    its MFU is taken against the TF32 peak."""
    from helpers import run_script

    run = tmp_path / "run"
    proc = pretrain(
        run, small_data, "train.max_steps=10", "train.tf32=true", "train.peak_flops=null", nproc=0
    )
    assert "fp32 (fp32 matmuls in TF32)" in proc.stdout
    rows = [r for r in read_metrics(run) if r["kind"] == "train"]
    if any(k in torch.cuda.get_device_name() for k in ("A100", "H100", "H200", "L40S")):
        assert rows[-1]["mfu_peak"].endswith("tf32 data sheet")
    common = ["--checkpoint", run, "--tokenizer", small_tokenizer]
    gen = [*common, "--prompt", "def parse(", "--max-new-tokens", "12", "--temperature", "0"]
    texts = [
        run_script("generate.py", *gen, *device).stdout.split("def parse(", 1)[1]
        for device in ([], ["--device", "cpu"])
    ]
    assert texts[0] == texts[1]
    scores = []
    for device in ([], ["--device", "cpu"]):
        out = tmp_path / f"eval{len(scores)}.json"
        run_script("evaluate.py", *common, "--input", small_data, "--quiet", "--json", out, *device)
        scores.append(json.loads(out.read_text()))
    assert scores[0]["tokens"] == scores[1]["tokens"] and scores[0]["loss"] == pytest.approx(
        scores[1]["loss"], rel=1e-4
    )


def test_moe_layer_on_the_gpu_matches_the_cpu_and_trains_in_bf16(tmp_path, small_data):
    """The expert layer on CUDA (sorted dispatch, the split sizes' one copy to the host, the
    statistics kept on the device) against the same layer on the CPU (checked there against a
    float64 reference), forward and backward, with and without a capacity; the grouped GEMM
    bf16 takes against a matmul per expert; then the tiny MoE llama trains in bf16 (grouped
    GEMM) with its router metrics logged."""
    from megatrain.model import GPTConfig
    from megatrain.model.moe import MoE

    for capacity in (None, 0.5):
        cfg = GPTConfig(
            vocab_size=8, seq_len=64, n_layer=1, n_head=2, d_model=64, arch="llama", moe_experts=8,
            moe_top_k=2, moe_ffn_hidden=128, moe_aux_loss=0.01, moe_z_loss=0.001,
            moe_capacity_factor=capacity,
        )  # fmt: skip
        torch.manual_seed(0)
        cpu = MoE(cfg).train()  # fp32 both: the same routing choices, ties included
        for p in cpu.parameters():
            torch.nn.init.normal_(p, std=0.1)
        gpu = MoE(cfg).to(CUDA).train()
        gpu.load_state_dict(cpu.state_dict())
        x = torch.randn(4, 64, 64)
        outs, grads = [], []
        for layer, inp in ((cpu, x.clone()), (gpu, x.to(CUDA))):
            inp.requires_grad_(True)
            out = layer(inp)
            (out.square().sum() + layer.last[0]).backward()
            assert layer.last[1].device == inp.device
            outs.append(out.detach().double().cpu())
            grads.append(layer.experts.fc.grad.double().cpu())
        torch.testing.assert_close(outs[1], outs[0], rtol=1e-3, atol=1e-4)
        torch.testing.assert_close(grads[1], grads[0], rtol=1e-3, atol=1e-3)
    # In bf16 the experts take torch's grouped GEMM: against a matmul per expert on the GPU.
    from megatrain.model import moe as moe_module

    experts = moe_module.Experts(4, 64, 128, gated=True).to(CUDA, torch.bfloat16)
    for p in experts.parameters():
        torch.nn.init.normal_(p, std=0.1)
    rows = torch.randn(37, 64, device=CUDA, dtype=torch.bfloat16)
    counts = torch.tensor([10, 0, 20, 7], device=CUDA)
    assert moe_module.uses_grouped_mm(rows, experts.fc)
    with torch.no_grad():
        grouped = experts(rows, counts).float()
        loop = torch.cat([moe_module.expert_mlp(r, experts.fc[i], experts.proj[i], True)
                          for i, r in enumerate(rows.split([10, 0, 20, 7])) if len(r)]).float()  # fmt: skip
    torch.testing.assert_close(grouped, loop, rtol=2e-2, atol=2e-2)
    run = tmp_path / "run"
    moe = ["model.moe.experts=4", "model.moe.ffn_hidden=64", "model.moe.capacity_factor=1.25"]
    pretrain(run, small_data, "model.arch=llama", *moe, "train.precision=bf16", "train.max_steps=10", nproc=0)
    rows = [r for r in read_metrics(run) if r["kind"] == "train"]
    assert rows[-1]["loss"] < rows[0]["loss"] and all(r["moe_balance"] >= 0.99 for r in rows)
