"""FusedAdamWClip against torch.optim.AdamW + clip_grad_norm_ computed in float64.

Fresh random inputs every run (no fixed seed): sizes from empty to multi-chunk,
several hyperparameters, clipping on and off, several steps, fp32 and bf16 storage,
through the compiled CPU op and through the pure-torch fallback.
"""

from __future__ import annotations

import copy
import random

import pytest
import torch

from megatrain.optim.fused_adamw import FusedAdamWClip, fused_op_available

SIZES = [1, 3, 7, 0, 1023, 65536 + 17, 4096]
PATHS = [pytest.param(True, id="fused-op"), pytest.param(False, id="torch-fallback")]


def test_the_compiled_op_is_built():
    assert fused_op_available(), "megatrain._fused_adamw was not built by setup.py (make install)"


def _reference(params64, grads_per_step, lr, betas, eps, wd, max_norm, round_to=None):
    """torch AdamW + clip_grad_norm_ in float64; optionally rounding parameters to a dtype
    after each step (to mirror bf16 storage). Returns per-step params, states and norms."""
    ps = [p.clone().requires_grad_(True) for p in params64]
    opt = torch.optim.AdamW(ps, lr=lr, betas=betas, eps=eps, weight_decay=wd, foreach=False)
    history = []
    for grads in grads_per_step:
        for p, g in zip(ps, grads, strict=True):
            p.grad = g.double()
        norm = torch.nn.utils.clip_grad_norm_(ps, max_norm if max_norm > 0 else float("inf"))
        opt.step()
        if round_to is not None:
            with torch.no_grad():
                for p in ps:
                    p.copy_(p.to(round_to).double())
        history.append(
            (
                [p.detach().clone() for p in ps],
                [opt.state[p]["exp_avg"].clone() for p in ps],
                [opt.state[p]["exp_avg_sq"].clone() for p in ps],
                float(norm),
            )
        )
    return history


def _rel_err(a, b) -> float:
    """max |a - b| / max |b| over a tensor or a list of tensors taken together (the state
    as a whole: a single moment that cancels to near zero is not the yardstick)."""
    a = torch.cat([t.double().reshape(-1) for t in a]) if isinstance(a, list) else a.double()
    b = torch.cat([t.double().reshape(-1) for t in b]) if isinstance(b, list) else b.double()
    if b.numel() == 0:
        return 0.0
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def _random_case(clip_active: bool):
    lr = random.choice([1e-3, 6e-4, 3e-2])
    wd = random.choice([0.0, 0.1, 0.01])
    betas = random.choice([(0.9, 0.95), (0.9, 0.999), (0.8, 0.9)])
    params = [torch.randn(n, dtype=torch.float64) for n in SIZES]
    scale = 10.0 if clip_active else 1e-3  # total norm far above / below max_norm = 1
    grads = [[torch.randn(n) * scale for n in SIZES] for _ in range(4)]
    return lr, wd, betas, params, grads


@pytest.mark.parametrize("use_op", PATHS)
@pytest.mark.parametrize("clip_active", [True, False])
def test_fp32_matches_float64_reference(use_op, clip_active):
    for _trial in range(3):
        lr, wd, betas, params64, grads = _random_case(clip_active)
        ours = [p.float().clone() for p in params64]
        opt = FusedAdamWClip(
            [{"params": ours}],
            lr=lr,
            betas=betas,
            eps=1e-8,
            weight_decay=wd,
            max_grad_norm=1.0,
            use_fused_op=use_op,
        )
        ref = _reference(params64, grads, lr, betas, 1e-8, wd, 1.0)
        for step, step_grads in enumerate(grads):
            for p, g in zip(ours, step_grads, strict=True):
                p.grad = g.clone()
            norm = opt.step()
            ref_params, ref_m, ref_v, ref_norm = ref[step]
            assert float(norm) == pytest.approx(ref_norm, rel=1e-6)
            assert (ref_norm > 1.0) == clip_active
            assert _rel_err(ours, ref_params) < 1e-6
            assert _rel_err([opt.state[p]["exp_avg"] for p in ours], ref_m) < 1e-6
            assert _rel_err([opt.state[p]["exp_avg_sq"] for p in ours], ref_v) < 1e-6
        assert float(opt.state[ours[0]]["step"]) == len(grads)


@pytest.mark.parametrize("use_op", PATHS)
def test_bf16_params_and_grads(use_op):
    """bf16 storage, fp32 math: every step lands within one bf16 rounding of torch's AdamW in
    float64 started from the same bf16 parameters and moments (re-synced each step, because
    one differently rounded element would otherwise make the trajectories drift apart)."""
    lr, wd, betas, params64, grads = _random_case(clip_active=True)
    ours = [p.to(torch.bfloat16) for p in params64]
    opt = FusedAdamWClip(
        [{"params": ours}], lr=lr, betas=betas, weight_decay=wd, max_grad_norm=1.0, use_fused_op=use_op
    )
    for step, step_grads in enumerate(grads, start=1):
        step_grads = [g.to(torch.bfloat16) for g in step_grads]
        ref = [p.double().requires_grad_(True) for p in ours]
        ref_opt = torch.optim.AdamW(ref, lr=lr, betas=betas, eps=1e-8, weight_decay=wd, foreach=False)
        for r, p, g in zip(ref, ours, step_grads, strict=True):
            r.grad = g.double()
            if step > 1:
                ref_opt.state[r] = {
                    "step": torch.tensor(float(step - 1), dtype=torch.float64),
                    "exp_avg": opt.state[p]["exp_avg"].double(),
                    "exp_avg_sq": opt.state[p]["exp_avg_sq"].double(),
                }
            p.grad = g.clone()
        torch.nn.utils.clip_grad_norm_(ref, 1.0)
        before = [p.double() for p in ours]
        ref_opt.step()
        opt.step()
        for a, b, start in zip(ours, ref, before, strict=True):
            expected = b.detach().to(torch.bfloat16).double()
            # One bf16 unit in the last place of the result, plus 2^-16 of the weight before
            # the step: an update that nearly cancels the weight leaves a remainder whose own
            # unit is far below the fp32 arithmetic's error on the operands (1 in ~300 draws).
            ulp = expected.abs().clamp_min(1e-30) * 2.0**-7 + start.abs() * 2.0**-16
            assert ((a.double() - expected).abs() <= ulp).all()
        assert (
            _rel_err(
                [opt.state[p]["exp_avg_sq"] for p in ours], [ref_opt.state[r]["exp_avg_sq"] for r in ref]
            )
            < 1e-6
        )


@pytest.mark.parametrize("use_op", PATHS)
def test_fp32_params_with_bf16_grads(use_op):
    lr, wd, betas, params64, grads = _random_case(clip_active=False)
    grads_bf16 = [[g.to(torch.bfloat16) for g in step] for step in grads]
    ours = [p.float() for p in params64]
    for p in ours:
        p.grad_dtype = None  # torch >= 2.10 otherwise refuses a gradient of another dtype
    opt = FusedAdamWClip([{"params": ours}], lr=lr, betas=betas, weight_decay=wd, use_fused_op=use_op)
    ref = _reference(params64, [[g.double() for g in s] for s in grads_bf16], lr, betas, 1e-8, wd, 1.0)
    for step, step_grads in enumerate(grads_bf16):
        for p, g in zip(ours, step_grads, strict=True):
            p.grad = g.clone()
        opt.step()
        assert _rel_err(ours, ref[step][0]) < 1e-6


@pytest.mark.parametrize("use_op", PATHS)
def test_param_groups_and_no_clipping(use_op):
    """Per-group lr and weight decay; max_grad_norm=0 turns clipping off."""
    a64, b64 = torch.randn(300, dtype=torch.float64), torch.randn(17, dtype=torch.float64)
    a, b = a64.float(), b64.float()
    opt = FusedAdamWClip(
        [{"params": [a], "weight_decay": 0.1}, {"params": [b], "weight_decay": 0.0, "lr": 1e-2}],
        lr=1e-3,
        max_grad_norm=0.0,
        use_fused_op=use_op,
    )
    ga = torch.randn(300) * 50
    gb = torch.randn(17) * 50
    ra = _reference([a64], [[ga]], 1e-3, (0.9, 0.95), 1e-8, 0.1, 0.0)
    rb = _reference([b64], [[gb]], 1e-2, (0.9, 0.95), 1e-8, 0.0, 0.0)
    a.grad, b.grad = ga.clone(), gb.clone()
    norm = opt.step()
    assert float(norm) == pytest.approx(
        float(torch.cat([ga, gb]).double().norm()), rel=1e-6
    )  # > 1, not clipped
    assert _rel_err([a, b], [ra[0][0][0], rb[0][0][0]]) < 1e-6


@pytest.mark.parametrize("use_op", PATHS)
def test_non_finite_norm_skips_the_step(use_op):
    p = torch.randn(1000)
    before = p.clone()
    opt = FusedAdamWClip([p], lr=1e-2, use_fused_op=use_op)
    p.grad = torch.randn(1000)
    p.grad[17] = float("nan")
    norm = opt.step()
    assert not torch.isfinite(norm)
    assert torch.equal(p, before) and int(opt.skipped_steps) == 1
    assert float(opt.state[p]["step"]) == 0  # the count does not advance
    assert torch.equal(opt.state[p]["exp_avg"], torch.zeros(1000))
    p.grad = torch.full((1000,), float("inf"))
    opt.step()
    assert int(opt.skipped_steps) == 2 and torch.equal(p, before)
    p.grad = torch.randn(1000)
    opt.step()  # a finite step afterwards is the first real one
    assert float(opt.state[p]["step"]) == 1 and not torch.equal(p, before)


def test_fused_op_equals_fallback_and_is_thread_independent():
    torch.manual_seed(random.randrange(2**31))
    params = [torch.randn(n) for n in SIZES]
    grads = [torch.randn(n) * 3 for n in SIZES]
    results = []
    for use_op, threads in [(True, 1), (True, 2), (False, 2)]:
        torch.set_num_threads(threads)
        ps = [p.clone() for p in params]
        opt = FusedAdamWClip(ps, lr=1e-3, use_fused_op=use_op)
        for p, g in zip(ps, grads, strict=True):
            p.grad = g.clone()
        results.append((opt.step(), ps))
    torch.set_num_threads(2)
    (n1, p1), (n2, p2), (n3, p3) = results
    assert torch.equal(n1, n2) and all(torch.equal(a, b) for a, b in zip(p1, p2, strict=True))  # bitwise
    assert float(n1) == pytest.approx(float(n3), rel=1e-6)
    assert _rel_err(p1, p3) < 1e-6


@pytest.mark.parametrize("use_op", PATHS)
def test_segments_equal_separate_tensors(use_op):
    """A flat tensor described by segments (as under ZeRO-1/2) steps exactly like its pieces."""
    sizes, wds, in_norm = [5, 40, 3, 100], [0.1, 0.0, 0.1, 0.0], [True, True, False, True]
    pieces = [torch.randn(n) for n in sizes]
    grads = [torch.randn(n) * 4 for n in sizes]
    padding = 6
    flat = torch.cat(pieces + [torch.zeros(padding)])
    flat.grad = torch.cat(grads + [torch.zeros(padding)])
    opt = FusedAdamWClip([flat], lr=1e-2, max_grad_norm=1.0, use_fused_op=use_op)
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    opt.set_segments(flat, list(zip(starts, sizes, wds, in_norm, strict=True)))
    norm = opt.step()
    included = torch.cat([g for g, inc in zip(grads, in_norm, strict=True) if inc])
    assert float(norm) == pytest.approx(float(included.double().norm()), rel=1e-6)
    separate = [p.clone() for p in pieces]
    ref = FusedAdamWClip(
        [{"params": [p], "weight_decay": wd} for p, wd in zip(separate, wds, strict=True)],
        lr=1e-2,
        max_grad_norm=0.0,
        use_fused_op=use_op,
    )
    coef = min(1.0, 1.0 / (float(norm) + 1e-6))
    for p, g in zip(separate, grads, strict=True):
        p.grad = g * coef  # the clipping the segmented step applied, by hand
    ref.step()
    assert _rel_err([flat[s : s + n] for s, n in zip(starts, sizes, strict=True)], separate) < 1e-6
    assert torch.equal(flat[-padding:], torch.zeros(padding))  # padding untouched


@pytest.mark.parametrize("use_op", PATHS)
def test_two_optimizers_clipped_by_one_global_norm(use_op):
    """Expert shards' optimizer beside the dense one (train/expert_shards.py): the first adds
    the second's squared norm (extra_norm_sq), the second steps with the first's total
    (step(norm_sq=...)); together they are one AdamW + clip over every parameter (float64
    reference), clipping on."""
    lr, wd, betas, params, grads = _random_case(clip_active=True)
    ps = [p.float() for p in params]
    dense_ps, expert_ps = ps[:4], ps[4:]
    hyper = dict(lr=lr, betas=betas, eps=1e-8, weight_decay=wd, max_grad_norm=1.0, use_fused_op=use_op)
    dense, experts = FusedAdamWClip(dense_ps, **hyper), FusedAdamWClip(expert_ps, **hyper)
    dense.extra_norm_sq = lambda: experts.sum_squares([p.grad for p in expert_ps], torch.device("cpu"))
    history = _reference(params, grads, lr, betas, 1e-8, wd, 1.0)
    for step_grads, (ref_params, _, _, ref_norm) in zip(grads, history, strict=True):
        for p, g in zip(ps, step_grads, strict=True):
            p.grad = g.clone()
        norm = dense.step()
        experts.step(norm_sq=dense.last_norm_sq)
        assert float(norm) == pytest.approx(ref_norm, rel=1e-5)
        assert _rel_err(ps, ref_params) < 1e-5


def test_state_dict_round_trip_continues_exactly():
    ps = [torch.randn(50), torch.randn(7)]
    opt = FusedAdamWClip(ps, lr=1e-2)
    for _ in range(3):
        for p in ps:
            p.grad = torch.randn_like(p)
        opt.step()
    saved = copy.deepcopy(opt.state_dict())  # state_dict() holds the live tensors; a checkpoint copies them
    clone = [p.clone() for p in ps]
    opt2 = FusedAdamWClip(clone, lr=1e-2)
    opt2.load_state_dict(saved)
    grads = [torch.randn_like(p) for p in ps]
    for o, params in ((opt, ps), (opt2, clone)):
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
        o.step()
    assert all(torch.equal(a, b) for a, b in zip(ps, clone, strict=True))
    assert float(opt2.state[clone[0]]["step"]) == 4


def test_groups_stepped_in_separate_calls_keep_their_own_counts():
    """DeepSpeed's ZeRO-3 swaps optimizer.param_groups to one sub-group per step() call: each
    sub-group's step count advances once per optimizer step, not once per call."""
    a, b = torch.randn(10), torch.randn(10)
    a_ref, b_ref = a.clone(), b.clone()
    opt = FusedAdamWClip([{"params": [a]}, {"params": [b]}], lr=1e-2, max_grad_norm=0.0)
    ref = FusedAdamWClip([{"params": [a_ref]}, {"params": [b_ref]}], lr=1e-2, max_grad_norm=0.0)
    all_groups = opt.param_groups
    for _ in range(3):
        grads = torch.randn(10), torch.randn(10)
        a.grad, b.grad, a_ref.grad, b_ref.grad = grads[0], grads[1], grads[0].clone(), grads[1].clone()
        for group in all_groups:  # one call per group, as ZeRO-3 does
            opt.param_groups = [group]
            opt.step()
        opt.param_groups = all_groups
        ref.step()  # one call for everything
    assert float(opt.state[a]["step"]) == float(opt.state[b]["step"]) == 3
    assert torch.equal(a, a_ref) and torch.equal(b, b_ref)


def test_a_device_without_kernels_falls_back_or_says_why(caplog):
    """This machine's build is CPU-only: for CUDA tensors the op has no kernel, so the
    optimizer takes the torch path with one logged line (never a dispatcher crash), or,
    when the fused op was asked for explicitly, stops with a one-line error."""
    from megatrain.optim.fused_adamw import fused_op_runs_on

    if torch.cuda.is_available():
        pytest.skip("a CUDA machine: its build has CUDA kernels (tests/gpu covers it)")
    assert fused_op_runs_on("cpu") and not fused_op_runs_on("cuda") and not fused_op_runs_on("meta")
    p = torch.nn.Parameter(torch.zeros(3))
    auto = FusedAdamWClip([p])
    with caplog.at_level("WARNING"):
        assert auto.uses_fused_op_on(torch.device("cpu"))
        assert not auto.uses_fused_op_on(torch.device("cuda")) and not auto.uses_fused_op_on(
            torch.device("cuda")
        )
    [record] = [r for r in caplog.records if "built without cuda kernels" in r.getMessage()]  # said once
    assert "pure-torch path" in record.getMessage()
    with pytest.raises(RuntimeError, match="built without cuda kernels .* rebuild it with CUDA"):
        FusedAdamWClip([p], use_fused_op=True).uses_fused_op_on(torch.device("cuda"))


def test_torch_adamw_is_torchs_fused_kernel():
    from helpers import TINY_CONFIG

    from megatrain.config import load_config
    from megatrain.layout import Layout
    from megatrain.model import GPT, GPTConfig
    from megatrain.optim.grad_norm import GradNormPolicy
    from megatrain.train.optimizer import build_optimizer

    cfg = load_config(TINY_CONFIG, ["data.path=x", "optim.name=torch_adamw"])
    norm = GradNormPolicy.decide(cfg.optim, cfg.train, Layout.from_config(cfg, 1))
    _, opt = build_optimizer(
        cfg.optim, GPT(GPTConfig(vocab_size=64, seq_len=8, n_layer=1, n_head=2, d_model=8)), norm
    )
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["fused"] and not opt.defaults["foreach"]


def test_the_op_checks_itself_against_the_torch_path(caplog):
    """Before its first step on a device the op is compared with the torch path on a small
    problem; a kernel that disagrees (here a stand-in that gets the learning rate wrong)
    is caught, and the optimizer then trains on the torch path with one loud line."""
    from megatrain.optim import fused_adamw

    cpu = torch.device("cpu")
    assert fused_adamw.fused_op_disagrees(cpu) is None

    def wrong_lr(ps, gs, ms, vs, lrs, *rest):
        return torch.ops.megatrain.adamw_clip_step_(ps, gs, ms, vs, [lr * 1.01 for lr in lrs], *rest)

    assert fused_adamw.fused_op_disagrees(cpu, wrong_lr).startswith("updates off by")
    p = torch.nn.Parameter(torch.zeros(3))
    opt = FusedAdamWClip([p])
    original = fused_adamw.fused_op_disagrees
    fused_adamw.fused_op_disagrees = lambda device: original(device, wrong_lr)
    try:
        with caplog.at_level("ERROR"):
            assert not opt.uses_fused_op_on(cpu)
    finally:
        fused_adamw.fused_op_disagrees = original
    assert any("disagrees with the torch path" in r.getMessage() for r in caplog.records)


def test_an_op_that_cannot_launch_falls_back_to_the_torch_path(caplog):
    """A GPU the op has no kernel image for (built for sm_80/sm_90, run on a later one
    without the PTX) raises at the first launch: the self-check catches it, says so, and the
    optimizer trains on the torch path instead of crashing the run."""
    from megatrain.optim import fused_adamw

    cpu = torch.device("cpu")

    def no_image(*args):
        raise RuntimeError("CUDA error: no kernel image is available for execution on the device\nmore")

    assert fused_adamw.fused_op_disagrees(cpu, no_image) == (
        "it raised RuntimeError: CUDA error: no kernel image is available for execution on the device"
    )
    p = torch.nn.Parameter(torch.ones(3))
    opt = FusedAdamWClip([p], lr=0.1, weight_decay=0.0)
    original = fused_adamw.fused_op_disagrees
    fused_adamw.fused_op_disagrees = lambda device: original(device, no_image)
    try:
        with caplog.at_level("ERROR"):
            p.grad = torch.ones(3)
            opt.step()  # on the torch path
    finally:
        fused_adamw.fused_op_disagrees = original
    assert not opt.uses_fused_op_on(cpu) and torch.all(p < 1)
    assert any("no kernel image" in r.getMessage() for r in caplog.records)
