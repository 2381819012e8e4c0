"""The MoE layer against a float64 reference written token by token (routing, top-k,
renormalisation, dropless and capacity modes, the load-balancing and z losses, shared
experts), forward and backward; and the model around it (parameter counts, the router
losses reaching the training loss, evaluation dropless)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from megatrain.model import GPT, GPTConfig, flops_per_token, matmul_params, param_count
from megatrain.model.moe import STATS_HEAD, MoE


def _cfg(arch="llama", **moe) -> GPTConfig:
    fields = dict(moe_experts=4, moe_top_k=2, moe_ffn_hidden=6, moe_aux_loss=0.01, moe_z_loss=0.001)
    fields.update(moe)
    return GPTConfig(vocab_size=40, seq_len=8, n_layer=2, n_head=2, d_model=8, arch=arch, **fields)


def _mlp(x, fc, proj, gated):
    h = x @ fc.t()
    if gated:
        gate, up = h.chunk(2, dim=-1)
        return (F.silu(gate) * up) @ proj.t()
    return F.gelu(h, approximate="tanh") @ proj.t()


def reference(layer: MoE, x: torch.Tensor, cfg: GPTConfig, capacity: int | None):
    """(output, balance loss, z loss, dropped assignments), one token and one slot at a time."""
    E, k = cfg.moe_experts, cfg.moe_top_k
    logits = x @ layer.router.weight.t()
    probs = logits.softmax(-1)
    choices = []
    for t in range(x.shape[0]):
        experts = sorted(range(E), key=lambda e: -probs[t, e].item())[:k]
        weights = probs[t, experts]
        choices.append((experts, weights / weights.sum() if cfg.moe_renormalize else weights))
    taken, kept = [0] * E, {}
    for slot in range(k):  # every token's first choice before any second one
        for t, (experts, _) in enumerate(choices):
            e = experts[slot]
            kept[t, slot] = capacity is None or taken[e] < capacity
            taken[e] += 1
    rows = []
    for t, (experts, weights) in enumerate(choices):
        row = torch.zeros_like(x[t])
        for slot, e in enumerate(experts):
            if kept[t, slot]:
                row = row + weights[slot] * _mlp(x[t], layer.experts.fc[e], layer.experts.proj[e], cfg.gated)
        rows.append(row)
    out = torch.stack(rows)
    if layer.shared is not None:
        out = out + _mlp(x, layer.shared.fc[0], layer.shared.proj[0], cfg.gated)
    chosen = torch.tensor([sum(e in ex for ex, _ in choices) for e in range(E)], dtype=x.dtype)
    share = chosen / (len(choices) * k)
    balance = E * (share * probs.mean(0)).sum()
    z = logits.logsumexp(-1).pow(2).mean()
    return out, balance, z, sum(not v for v in kept.values())


@pytest.mark.parametrize(
    "arch, moe",
    [
        ("llama", {}),
        ("gpt3", {}),
        ("llama", {"moe_renormalize": False, "moe_top_k": 1}),
        ("llama", {"moe_shared_experts": 2}),
        ("llama", {"moe_capacity_factor": 0.5}),
        ("gpt3", {"moe_capacity_factor": 1.0, "moe_top_k": 3, "moe_shared_experts": 1}),
    ],
)
def test_layer_matches_a_float64_reference(arch, moe):
    cfg = _cfg(arch, **moe)
    torch.manual_seed(0)
    layer = MoE(cfg).double()
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.5)
    x = torch.randn(2, 12, cfg.d_model, dtype=torch.float64, requires_grad=True)
    layer.train()
    out = layer(x)
    aux, stats = layer.last
    capacity = None
    if cfg.moe_capacity_factor is not None:
        capacity = math.ceil(cfg.moe_capacity_factor * 24 * cfg.moe_top_k / cfg.moe_experts)
    x_ref = x.detach().clone().requires_grad_(True)
    ref, balance, z, dropped = reference(layer, x_ref.view(-1, cfg.d_model), cfg, capacity)
    torch.testing.assert_close(out.view(-1, cfg.d_model), ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(stats[0], balance.detach(), rtol=1e-12, atol=0)
    torch.testing.assert_close(stats[1], z.detach(), rtol=1e-12, atol=0)
    assert stats[2] == dropped and stats[3] == 24 * cfg.moe_top_k
    assert stats[STATS_HEAD:].sum() == 24 * cfg.moe_top_k
    assert (dropped > 0) == (capacity is not None and capacity < 24 * cfg.moe_top_k / cfg.moe_experts * 2)

    # Backward: the same upstream gradient through both, plus both losses.
    g = torch.randn_like(ref)
    grads = torch.autograd.grad(
        (out.view(-1, cfg.d_model) * g).sum() + aux, [x, *layer.parameters()], allow_unused=False
    )
    ref_loss = (ref * g).sum() + cfg.moe_aux_loss * balance + cfg.moe_z_loss * z
    ref_grads = torch.autograd.grad(ref_loss, [x_ref, *layer.parameters()])
    for mine, theirs in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-10, atol=1e-12)


def test_capacity_drops_in_training_only():
    cfg = _cfg(moe_capacity_factor=0.25)
    layer = MoE(cfg).double()
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.5)
    x = torch.randn(1, 16, cfg.d_model, dtype=torch.float64)
    with torch.no_grad():
        dropless = reference(layer, x[0], cfg, None)[0]
        torch.testing.assert_close(layer.eval()(x)[0], dropless)  # evaluation computes every token
    layer.train()
    dropped = layer(x.requires_grad_(True))
    assert layer.last[1][2] > 0
    assert not torch.allclose(dropped[0], dropless)


def test_parameter_counts_and_flops_count_every_and_active_experts():
    for moe in ({}, {"moe_every": 2, "moe_shared_experts": 1}):
        cfg = _cfg(**moe)
        model = GPT(cfg)
        assert sum(p.numel() for p in model.parameters()) == param_count(cfg)
        expert = 3 * cfg.d_model * cfg.moe_ffn_hidden  # SwiGLU: gate, up and down
        idle = len(cfg.moe_blocks) * (cfg.moe_experts - cfg.moe_top_k) * expert
        assert param_count(cfg) - param_count(cfg, active=True) == idle
        assert matmul_params(cfg) - matmul_params(cfg, active=True) == idle
        attention = 12 * cfg.n_layer * cfg.d_model * cfg.seq_len
        assert flops_per_token(cfg) == 6 * matmul_params(cfg, active=True) + attention  # MFU counts active
    assert _cfg(moe_every=2).moe_blocks == [1] and _cfg().moe_blocks == [0, 1]


def test_router_losses_reach_the_training_loss_and_are_counted_once():
    torch.manual_seed(0)
    cfg = _cfg(moe_aux_loss=0.5, moe_z_loss=0.25)
    model = GPT(cfg)
    idx = torch.randint(0, cfg.vocab_size, (2, cfg.seq_len))
    model.eval()
    with torch.no_grad():
        cross_entropy = model(idx, idx)
    model.train()
    loss = model(idx, idx)
    stats = model.router.take()
    assert stats.shape == (2, STATS_HEAD + cfg.moe_experts)
    expected = cross_entropy + (0.5 * stats[:, 0] + 0.25 * stats[:, 1]).sum()
    torch.testing.assert_close(loss.double(), expected.to(torch.float64), rtol=1e-6, atol=0)
    # With activation checkpointing the recomputation in backward adds nothing to the statistics.
    model.cfg.activation_checkpointing = True
    model(idx, idx).backward()
    assert model.router.take().shape == stats.shape
    assert model.router.take() is None


@pytest.mark.parametrize(
    "moe, cls",
    [
        ({}, "MixtralForCausalLM"),
        ({"qk_norm": True, "moe_every": 2, "moe_renormalize": False}, "Qwen3MoeForCausalLM"),
    ],
)
def test_export_loads_offline_with_the_same_logits(tmp_path, monkeypatch, moe, cls):
    import transformers

    from megatrain.model.hf import to_hf

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = _cfg(**{"init_std": 0.2, "moe_experts": 8, "moe_ffn_hidden": 8, **moe})  # grouped_mm: 16-byte rows
    model = GPT(cfg).eval()
    exported = to_hf(model.state_dict(), cfg, eos_id=0)
    assert type(exported).__name__ == cls
    exported.save_pretrained(tmp_path)  # transformers writes the experts one by one
    loaded = getattr(transformers, cls).from_pretrained(tmp_path).eval()
    x = torch.randint(0, cfg.vocab_size, (2, cfg.seq_len))
    with torch.no_grad():
        ours, theirs = model(x), loaded(x).logits
    assert ((ours - theirs).abs().max() / ours.abs().max()).item() < 1e-4


@pytest.mark.parametrize(
    "moe, why",
    [
        ({"arch": "gpt3"}, "arch gpt3"),
        ({"moe_shared_experts": 1}, "shared_experts"),
        ({"moe_every": 2}, "every=2"),
        ({"moe_renormalize": False}, "renormalize"),
    ],
)
def test_export_refuses_what_no_class_holds(moe, why):
    from megatrain.errors import UserError
    from megatrain.model.hf import to_hf

    arch = moe.pop("arch", "llama")
    cfg = _cfg(arch, **moe)
    with pytest.raises(UserError, match=why):
        to_hf(GPT(cfg).state_dict(), cfg, eos_id=0)


def test_upcycling_copies_the_dense_mlp_into_every_expert(tmp_path, monkeypatch):
    """model.init_from a dense Hugging Face Llama with model.moe set: every MoE block's experts
    start as the source's MLP and the router as a fresh model's, so the upcycled model
    computes what the dense one does (the renormalised top-k weights sum to 1)."""
    from megatrain.config import load_config
    from megatrain.model.gpt import initial_value
    from megatrain.model.hf import to_hf
    from megatrain.train import init_from

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    dense_cfg = _cfg(moe_experts=0, ffn_hidden=16)
    dense = GPT(dense_cfg).eval()
    to_hf(dense.state_dict(), dense_cfg, eos_id=0).save_pretrained(tmp_path / "hf")
    sets = [f"model.init_from={tmp_path / 'hf'}", "model.moe.experts=4", "model.moe.every=2"]
    sets += ["train.seq_len=8", f"data.path={tmp_path}", "train.max_steps=1"]  # data and steps unused
    cfg = load_config(None, sets)
    source = init_from.open_source(tmp_path / "hf")
    model_cfg = init_from.model_config(cfg, source, 40, None)
    assert (model_cfg.moe_experts, model_cfg.moe_ffn_hidden, model_cfg.moe_blocks) == (4, 16, [1])
    tensors, _ = init_from._start_tensors(source, model_cfg, moments=False)
    moe = GPT(model_cfg, init_weights=False).eval()
    moe.load_state_dict({k.removeprefix("param/"): d.make() for k, d in tensors.items()})
    fc = moe.blocks[1].mlp.experts.fc
    assert all(torch.equal(fc[e], dense.blocks[1].mlp.fc.weight) for e in range(4))
    router = moe.blocks[1].mlp.router.weight
    assert torch.equal(router, initial_value("blocks.1.mlp.router.weight", router.shape, model_cfg))
    x = torch.randint(0, 40, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(moe(x), dense(x), rtol=1e-5, atol=1e-5)
    bad = load_config(None, [*sets, "model.moe.shared_experts=1"])
    with pytest.raises(Exception, match="upcycling to 4 experts: model.moe.shared_experts"):
        init_from.model_config(bad, source, 40, None)


def test_the_planner_counts_experts_and_their_all_to_alls():
    from megatrain.config import load_config
    from megatrain.layout import Layout
    from megatrain.plan import Links, comm_time, plan

    cfg = load_config(Path(__file__).parents[2] / "configs" / "mixtral-8x7b.yaml", ["data.path=x"])
    m = GPTConfig.from_config(cfg, 32000)
    got = plan(cfg, m, Layout.from_config(cfg, world=64), device_memory=80e9, peak_flops=989e12)
    assert got["params"] == pytest.approx(46.7e9, rel=0.01)  # Mixtral's paper: 46.7B, 12.9B active
    assert got["active_params"] == pytest.approx(12.9e9, rel=0.01)
    assert got["expert_params"] == 32 * 8 * 3 * 4096 * 14336
    layouts = [Layout(3, 1, 1, 64, 1, True, expert_parallel=ep) for ep in (1, 2, 8)]
    times = [comm_time(cfg, m, lay, 4e6, 8, Links()) for lay in layouts]
    assert times[0] < times[1] < times[2]  # more of each token's rows leave the rank


def test_the_planner_counts_experts_split_over_ranks():
    """Under ZeRO 0-2, E = 8 on 64 ranks: each rank keeps 1/8 of the experts (bf16 weights,
    fp32 gradients) and 1/8 of their masters and moments (the 8 ranks keeping the same ones
    share them): the 8 x 7B shape that needs 370+ GiB a rank with every rank keeping every
    expert fits an 80 GB device, and the search takes it over ZeRO-3."""
    from megatrain.config import load_config
    from megatrain.layout import Layout
    from megatrain.plan import per_rank_bytes, search

    cfg = load_config(Path(__file__).parents[2] / "configs" / "mixtral-8x7b.yaml", ["data.path=x"])
    m = GPTConfig.from_config(cfg, 32000)
    whole, split = (per_rank_bytes(cfg, m, Layout(1, 1, 1, 64, 1, True, expert_parallel=e)) for e in (1, 8))
    experts = 32 * 8 * 3 * 4096 * 14336
    mine = experts / 8
    assert whole["params"] - split["params"] == pytest.approx(experts * 2 - mine * 2)
    # ZeRO-1 shards every expert's masters and moments over the 64 ranks; split, a rank's 1/8
    # of the experts over its 8 replicas: the same share.
    assert split["optimizer"] == pytest.approx(whole["optimizer"])
    assert (
        split["grads"] < whole["grads"] / 7
    )  # fp32 and of 1/8 of the experts, not DeepSpeed's whole fp32 copy
    assert whole["total"] > 370 * 2**30 and split["total"] < 80e9
    best = search(cfg, m, gpus=64, gpus_per_node=8, device_memory=80e9, peak_flops=989e12)[0]
    assert best["layout"]["expert_parallel"] > 1 and best["layout"]["zero_stage"] < 3


@pytest.mark.parametrize("gated", [True, False])
def test_grouped_gemm_path_equals_a_matmul_per_expert(monkeypatch, gated):
    """The grouped-GEMM path (taken on CUDA in bf16: uses_grouped_mm) run on the CPU in fp32,
    where torch has it too: the same outputs and gradients as a matmul per expert, with an
    expert without rows and a row count that needs padding."""
    from megatrain.model import moe

    experts = moe.Experts(4, 16, 8, gated=gated)
    for p in experts.parameters():
        torch.nn.init.normal_(p, std=0.2)
    rows, counts = torch.randn(13, 16), torch.tensor([5, 0, 6, 2])
    results = []
    for grouped in (False, True):
        monkeypatch.setattr(moe, "uses_grouped_mm", lambda rows, fc, grouped=grouped: grouped)
        experts.zero_grad()
        x = rows.clone().requires_grad_()
        out = experts(x, counts)
        out.square().sum().backward()
        results.append([out.detach(), x.grad, experts.fc.grad.clone(), experts.proj.grad.clone()])
    for loop, grouped in zip(*results, strict=True):  # fp32 both, summed in another order
        assert float((grouped - loop).abs().max()) <= 1e-5 * float(loop.abs().max())


def test_experts_without_rows_still_get_gradients():
    """A rank whose experts received no tokens: zero gradients, not none (every rank must hand
    DeepSpeed the same gradients to reduce)."""
    from megatrain.model.moe import Experts

    experts = Experts(4, 8, 6, gated=True)
    experts(torch.zeros(0, 8), torch.tensor([0, 0]), first=2).sum().backward()
    assert torch.equal(experts.fc.grad, torch.zeros_like(experts.fc))
    assert torch.equal(experts.proj.grad, torch.zeros_like(experts.proj))


@pytest.mark.parametrize(
    "sets, message",
    [
        (["model.moe.top_k=5"], "model.moe.top_k must be in [1, model.moe.experts (4)], got 5"),
        (["model.moe.every=3"], "model.moe.every (3) leaves no block of 2 with experts"),
        (["model.moe.capacity_factor=0"], "model.moe.capacity_factor must be > 0"),
        (["parallel.pipeline_stages=2"], "model.moe cannot be combined with parallel.pipeline_stages=2 yet"),
        (["parallel.tensor_parallel=2"], "model.moe cannot be combined with parallel.tensor_parallel=2 yet"),
        (["parallel.expert_parallel=3"], "parallel.expert_parallel=3 must divide model.moe.experts (4)"),
        (["model.moe.experts=0", "parallel.expert_parallel=2"], "must divide model.moe.experts (0)"),
        (
            ["parallel.expert_parallel=2", "optim.name=torch_adamw"],
            "parallel.expert_parallel=2 needs optim.name=fused_adamw under ZeRO 0-2, not torch_adamw",
        ),
        (
            ["parallel.expert_parallel=2", "train.precision=fp16"],
            "parallel.expert_parallel=2 cannot be combined with train.precision=fp16 under ZeRO 0-2",
        ),
    ],
)
def test_configs_experts_cannot_serve_are_refused_in_one_line(tmp_path, sets, message):
    from megatrain.config import load_config
    from megatrain.errors import UserError

    base = [f"data.path={tmp_path}", "train.max_steps=1", "model.n_layer=2", "model.moe.experts=4"]
    with pytest.raises(UserError) as err:
        load_config(None, [*base, *sets])
    assert message in str(err.value) and "\n" not in str(err.value)


def test_expert_parallel_must_divide_the_data_parallel_ranks(tmp_path):
    from megatrain.config import load_config
    from megatrain.errors import UserError
    from megatrain.layout import Layout

    cfg = load_config(None, [f"data.path={tmp_path}", "train.max_steps=1", "model.moe.experts=4"])
    cfg.parallel.expert_parallel = 4
    with pytest.raises(
        UserError, match="parallel.expert_parallel=4 does not divide the 2 data-parallel ranks"
    ):
        Layout.from_config(cfg, world=2)
    assert Layout.from_config(cfg, world=8, rank=6).ep_rank == 2
    assert Layout.from_config(cfg, world=8).expert_parallel_groups() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    # The ranks holding the same experts: one place of every group.
    assert Layout.from_config(cfg, world=8).expert_replica_groups() == [[0, 4], [1, 5], [2, 6], [3, 7]]


@pytest.mark.parametrize("zero_stage, split", [(0, True), (2, True), (3, False)])
def test_a_checkpoint_records_experts_split_over_ranks(tmp_path, zero_stage, split):
    """Under ZeRO 0-2 each rank's file holds its experts: the layout a checkpoint records says
    how many ways (a resume on another number goes through the layout-free form); ZeRO-3
    partitions the experts as every weight, and its checkpoints do not depend on it."""
    from megatrain.config import load_config
    from megatrain.layout import Layout

    sets = [f"data.path={tmp_path}", "train.max_steps=1", "model.moe.experts=4", "parallel.expert_parallel=2"]
    cfg = load_config(None, [*sets, f"parallel.zero_stage={zero_stage}"])
    lay = Layout.from_config(cfg, world=4)
    assert lay.experts_split == split
    form = lay.checkpoint_form()
    assert form.get("expert_parallel") == (2 if split else None)
    assert Layout.from_checkpoint(form).checkpoint_form() == form


def test_router_metrics_shares_and_histogram():
    from megatrain.model.moe import router_metrics

    # two blocks, 4 experts: [balance, z, dropped, assigned, load...]
    stats = torch.tensor(
        [[1.2, 3.0, 2.0, 16.0, 8, 4, 4, 0], [1.0, 5.0, 0.0, 16.0, 4, 4, 4, 4]], dtype=torch.float64
    )
    row = router_metrics(stats, [1, 3], histogram=True)
    assert row["moe_balance"] == pytest.approx(1.1) and row["moe_z"] == pytest.approx(4.0)
    assert row["moe_dropped"] == pytest.approx(2 / 32)
    assert (row["moe_load_min/1"], row["moe_load_max/1"]) == (0.0, 0.5)
    assert row["moe_load"] == {"1": [0.5, 0.25, 0.25, 0.0], "3": [0.25] * 4}
    assert "moe_load" not in router_metrics(stats, [1, 3])
