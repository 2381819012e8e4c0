"""The GPT model: shapes, parameter counts, FLOPs, initialisation, causality, tying."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import REPO

from megatrain.config import load_config
from megatrain.model import GPT, GPTConfig, canonical_name, flops_per_token, matmul_params, param_count


def tiny(**kw) -> GPTConfig:
    return GPTConfig(**{"vocab_size": 97, "seq_len": 16, "n_layer": 3, "n_head": 2, "d_model": 24, **kw})


@pytest.mark.parametrize("bias", [True, False])
def test_matmul_params_counts_the_module(bias):
    cfg = tiny(bias=bias)
    model = GPT(cfg)
    total = sum(p.numel() for p in model.parameters())  # the tied table once
    counted = total - model.embed.positions.wpe.weight.numel()  # the tied table is the head's matmul
    assert matmul_params(cfg) == counted
    assert param_count(cfg) == total


def test_gpt3_configs_have_the_papers_sizes():
    """Table 2.1 sizes with GPT-2's 50257-token vocabulary, within 3%."""
    expected = {
        "125m": 125e6,
        "350m": 350e6,
        "760m": 760e6,
        "1.3b": 1.3e9,
        "2.7b": 2.7e9,
        "6.7b": 6.7e9,
        "13b": 13e9,
        "175b": 175e9,
    }
    for name, n in expected.items():
        c = load_config(REPO / "configs" / f"gpt3-{name}.yaml")
        g = GPTConfig(
            vocab_size=50257,
            seq_len=c.train.seq_len,
            n_layer=c.model.n_layer,
            n_head=c.model.n_head,
            d_model=c.model.d_model,
        )
        total = matmul_params(g) + g.seq_len * g.d_model  # + learned positions
        assert abs(total / n - 1) < 0.03, (name, total)
        assert c.optim.betas == [0.9, 0.95] and c.optim.weight_decay == 0.1 and c.train.max_tokens == 300e9


def test_flops_per_token_palm_formula():
    g = GPTConfig(vocab_size=50257, seq_len=2048, n_layer=96, n_head=96, d_model=12288)
    n = matmul_params(g)
    assert flops_per_token(g) == 6 * n + 12 * 96 * 12288 * 2048
    # the attention term 12*L*d*T is about 2.8% of 6N for GPT-3 175B at 2048 tokens
    assert 0.025 < (flops_per_token(g) - 6 * n) / (6 * n) < 0.03


def test_initialisation_follows_gpt2():
    cfg = tiny(n_layer=8, d_model=256, n_head=4)
    model = GPT(cfg)
    resid = model.blocks[0].attn.proj.weight.std().item()
    assert abs(resid - 0.02 / math.sqrt(16)) < 0.001
    assert abs(model.blocks[0].mlp.proj.weight.std().item() - 0.02 / math.sqrt(16)) < 0.001
    assert abs(model.blocks[0].mlp.fc.weight.std().item() - 0.02) < 0.001
    assert model.blocks[0].mlp.fc.bias.abs().max() == 0 and torch.all(model.blocks[3].ln2.weight == 1)
    assert abs(model.embed.wte.weight.std().item() - 0.02) < 0.002


def test_initialisation_depends_on_seed_and_name_only():
    """The same seed gives the same weights whatever the global RNG state; another seed differs;
    parameters of the same shape differ from each other."""
    torch.manual_seed(1)
    a = GPT(tiny())
    torch.manual_seed(2)
    b = GPT(tiny())
    c = GPT(tiny(init_seed=1))
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))
    assert not torch.equal(a.embed.wte.weight, c.embed.wte.weight)
    assert not torch.equal(a.blocks[0].attn.qkv.weight, a.blocks[1].attn.qkv.weight)


def test_loss_at_init_is_near_uniform():
    model = GPT(tiny(vocab_size=1000, d_model=64, n_head=4))
    x = torch.randint(0, 1000, (4, 17))
    loss = model(x[:, :-1], x[:, 1:]).item()
    assert abs(loss - math.log(1000)) < 0.2


def test_causal():
    torch.manual_seed(0)
    model = GPT(tiny()).eval()
    x = torch.randint(0, 97, (2, 16))
    y = x.clone()
    y[:, 10] = (y[:, 10] + 1) % 97
    a, b = model(x), model(y)
    assert torch.allclose(a[:, :10], b[:, :10], atol=1e-6)
    assert not torch.allclose(a[:, 10:], b[:, 10:], atol=1e-3)


def test_embeddings_tied():
    model = GPT(tiny())
    x = torch.randint(0, 97, (2, 9))
    model(x[:, :-1], x[:, 1:]).backward()
    names = [n for n, _ in model.named_parameters()]
    assert not any(
        "head" in n and "weight" in n and "ln" not in n for n in names
    )  # no separate output matrix
    # the token table gets gradient from the output projection for every vocabulary row
    assert (model.embed.wte.weight.grad.abs().sum(dim=1) > 0).all()


def test_activation_checkpointing_changes_nothing():
    torch.manual_seed(0)
    a = GPT(tiny())
    b = GPT(tiny(activation_checkpointing=True))
    b.load_state_dict(a.state_dict())
    x = torch.randint(0, 97, (2, 17))
    la, lb = a(x[:, :-1], x[:, 1:]), b(x[:, :-1], x[:, 1:])
    la.backward()
    lb.backward()
    assert la.item() == lb.item()
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa.grad, pb.grad)


def test_pipeline_names_map_onto_gpt():
    """Every GPT parameter has exactly one pipeline layer behind it (the tied table twice)."""
    cfg = GPTConfig(vocab_size=50, seq_len=8, n_layer=3, n_head=2, d_model=8)
    gpt_names = set(dict(GPT(cfg).named_parameters()))
    layer_names = ["0.weight", "1.wpe.weight", "5.weight", "5.bias", "tied_modules.wte.weight"] + [
        f"{2 + i}.{rest}"
        for i in range(3)
        for rest in [
            "ln1.weight",
            "ln1.bias",
            "attn.qkv.weight",
            "attn.qkv.bias",
            "attn.proj.weight",
            "attn.proj.bias",
            "ln2.weight",
            "ln2.bias",
            "mlp.fc.weight",
            "mlp.fc.bias",
            "mlp.proj.weight",
            "mlp.proj.bias",
        ]
    ]
    assert {canonical_name(n, 3) for n in layer_names} == gpt_names
    assert canonical_name("6.weight", 3) == "head.lm_head.weight"  # an untied output projection
    with pytest.raises(ValueError):
        canonical_name("7.weight", 3)


@pytest.mark.parametrize("numel", [1, 15, 16, 17, 1000, 4099, 2**16 + 7])
def test_initial_values_are_drawn_by_pieces_and_a_rank_draws_only_its_own(numel):
    """Each piece of a parameter has its own generator (megatrain/model/gpt.py INIT_PIECE):
    the whole value is its pieces end to end, a ZeRO-3 rank asking for a range of elements
    gets exactly the pieces that overlap it, for weights and for fills; a parameter of one
    piece is the plain one-call draw (the values of the small models are as they were)."""
    from megatrain.model.gpt import _init_rule, initial_value, initial_value_pieces

    cfg = GPTConfig(vocab_size=50, seq_len=8, n_layer=2, n_head=2, d_model=8, init_seed=3)
    for name in (
        "blocks.0.mlp.fc.weight",
        "blocks.1.attn.proj.weight",
        "blocks.0.ln1.weight",
        "head.ln_f.bias",
    ):
        for piece in (16, 1000, 1 << 22):
            whole = initial_value(name, (numel,), cfg, piece=piece)
            pieces = list(initial_value_pieces(name, (numel,), cfg, piece=piece))
            assert [o for o, _ in pieces] == list(range(0, numel, piece))
            assert torch.equal(torch.cat([v for _, v in pieces]), whole), (name, piece)
            for lo, hi in ((0, 1), (numel // 3, numel // 2 + 1), (numel - 1, numel + 50), (numel, numel + 9)):
                got = list(initial_value_pieces(name, (numel,), cfg, lo, hi, piece=piece))
                assert [o for o, _ in got] == [o for o, v in pieces if o < hi and o + v.numel() > lo]
                for o, v in got:
                    assert torch.equal(v, whole[o : o + v.numel()])
        if "weight" in name and "ln" not in name:
            _, std, seed = _init_rule(name, cfg)
            one_call = torch.randn(numel, generator=torch.Generator().manual_seed(seed))
            assert torch.equal(initial_value(name, (numel,), cfg), one_call * whole.new_tensor(std))
            if numel > 16:  # separate generators: not one stream cut into pieces
                assert not torch.equal(
                    initial_value(name, (numel,), cfg, piece=16), initial_value(name, (numel,), cfg)
                )
    shape = (37, 29)  # a matrix is its flattened draw
    assert torch.equal(
        initial_value("blocks.0.mlp.fc.weight", shape, cfg, piece=100).flatten(),
        initial_value("blocks.0.mlp.fc.weight", (37 * 29,), cfg, piece=100),
    )


def test_generation_with_and_without_the_kv_cache_is_the_same():
    cfg = GPTConfig(vocab_size=97, seq_len=24, n_layer=2, n_head=2, d_model=16, init_seed=1)
    model = GPT(cfg).eval()
    prompt = torch.randint(0, 97, (3, 5), generator=torch.Generator().manual_seed(0))
    cached = model.generate(prompt, 12, temperature=0)
    assert torch.equal(cached, model.generate(prompt, 12, temperature=0, use_cache=False))
    assert cached.shape == (3, 17) and torch.equal(cached[:, :5], prompt)
    with torch.no_grad():  # each greedy token is the argmax of the full forward pass
        assert torch.equal(model(cached[:, :-1])[:, 4:].argmax(-1), cached[:, 5:])
    assert model.generate(prompt, 100, temperature=0).shape[1] == cfg.seq_len  # stops at the context
    first = int(cached[0, 5])
    stopped = model.generate(prompt[:1], 12, temperature=0, eos_id=first)
    assert stopped.shape == (1, 6)  # ends at eos
    drawn = [
        model.generate(prompt, 8, temperature=1.0, generator=torch.Generator().manual_seed(s))
        for s in (1, 1, 2)
    ]
    assert torch.equal(drawn[0], drawn[1]) and not torch.equal(drawn[0], drawn[2])


def test_sampling_keeps_to_top_k_and_top_p():
    from megatrain.model.gpt import sample

    logits = torch.tensor([[4.0, 3.0, 2.0, -1.0, -2.0]]).repeat(2000, 1)
    gen = torch.Generator().manual_seed(0)
    assert set(sample(logits, 1.0, top_k=2, generator=gen).tolist()) == {0, 1}
    p = logits[0].softmax(-1)  # 0.66, 0.24, 0.09, ...: the 0.95 nucleus holds the first three
    assert p[:2].sum() < 0.95 < p[:3].sum()
    assert set(sample(logits, 1.0, top_p=0.95, generator=gen).tolist()) == {0, 1, 2}
    assert set(sample(logits, 1.0, top_p=0.5, generator=gen).tolist()) == {0}
    assert sample(logits[:1], 0.0).item() == 0


def test_tensor_parallel_shards_keep_whole_heads_and_gather_back():
    """q|k|v is split per sub-parameter: rank r keeps heads r of q, k and v (grouped-query:
    k and v narrower than q); SwiGLU's gate|up likewise; row-parallel weights split by input
    columns; the vocabulary tables by rows; everything else stays whole. gather inverts shard."""
    from megatrain.model import tensor_parallel as tp

    d = 8
    cfg = GPTConfig(vocab_size=16, seq_len=4, n_layer=4, n_head=4, d_model=d)
    qkv = torch.arange(3 * d * d, dtype=torch.float32).reshape(3 * d, d)
    shards = [tp.shard("blocks.0.attn.qkv.weight", qkv, r, 2, cfg) for r in range(2)]
    q, k, v = qkv.chunk(3)
    assert torch.equal(shards[1], torch.cat([q[d // 2 :], k[d // 2 :], v[d // 2 :]]))
    proj = torch.randn(d, d)
    assert torch.equal(tp.shard("blocks.0.attn.proj.weight", proj, 1, 2, cfg), proj[:, d // 2 :])
    assert tp.split_of("blocks.0.attn.proj.bias", cfg) is None and tp.split_of(
        "blocks.0.mlp.fc.bias", cfg
    ) == (0, None)
    assert tp.split_of("blocks.1.ln1.weight", cfg) is None
    # The vocabulary tables by rows; one every rank kept whole (before they were split) reads as it is.
    wte = torch.randn(16, d)
    assert tp.split_of("embed.wte.weight", cfg) == tp.split_of("head.lm_head.weight", cfg) == (0, None)
    assert torch.equal(tp.shard("embed.wte.weight", wte, 1, 2, cfg), wte[8:])
    assert torch.equal(tp.gather("embed.wte.weight", [wte, wte], cfg), wte)
    for name, full in [
        ("embed.wte.weight", wte),
        ("blocks.0.attn.qkv.weight", qkv),
        ("blocks.0.attn.qkv.bias", torch.randn(3 * d)),
        ("blocks.0.attn.proj.weight", proj),
        ("blocks.3.mlp.fc.weight", torch.randn(4 * d, d)),
        ("blocks.3.mlp.proj.weight", torch.randn(d, 4 * d)),
        ("head.ln_f.weight", torch.randn(d)),
    ]:
        assert torch.equal(tp.gather(name, [tp.shard(name, full, r, 4, cfg) for r in range(4)], cfg), full), (
            name
        )
    # llama: 4 query heads of 2 dims sharing 2 key/value heads, a SwiGLU of 12 packed as gate|up.
    llama = GPTConfig(
        vocab_size=16, seq_len=4, n_layer=1, n_head=4, d_model=d, arch="llama", n_kv_head=2, ffn_hidden=12
    )
    qkv = torch.randn(d + 2 * 4, d)
    q, k, v = qkv.split([d, 4, 4])
    assert torch.equal(
        tp.shard("blocks.0.attn.qkv.weight", qkv, 1, 2, llama), torch.cat([q[4:], k[2:], v[2:]])
    )
    fc = torch.randn(24, d)
    gate, up = fc.chunk(2)
    assert torch.equal(tp.shard("blocks.0.mlp.fc.weight", fc, 0, 2, llama), torch.cat([gate[:6], up[:6]]))
    for name, full in [("blocks.0.attn.qkv.weight", qkv), ("blocks.0.mlp.fc.weight", fc)]:
        assert torch.equal(
            tp.gather(name, [tp.shard(name, full, r, 2, llama) for r in range(2)], llama), full
        )
    specs = {s["patterns"][0]: s for s in tp.autotp_config(2, llama)["partition_config"]["layer_specs"]}
    assert specs[r".*\.attn\.qkv\.weight$"]["shape"] == [[d, 4, 4], -1]
    assert specs[r".*\.mlp\.fc\.weight$"]["shape"] == [2, -1]
    ds = tp.autotp_config(2, cfg)
    assert ds["autotp_size"] == 2 and not ds["partition_config"]["use_default_specs"]
