"""The llama architecture's pieces against straightforward float64 implementations, the
z-loss gradient against its formula, the parameter groups, and export to transformers'
LlamaForCausalLM / Qwen3ForCausalLM (logits and greedy text)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from megatrain.errors import UserError
from megatrain.model import GPT, GPTConfig, param_count
from megatrain.model.gpt import LMLoss, RMSNorm, llama_ffn_hidden, rotate
from megatrain.model.hf import to_hf
from megatrain.optim import param_groups


def llama(**kw) -> GPTConfig:
    return GPTConfig(
        **{
            "vocab_size": 97,
            "seq_len": 16,
            "n_layer": 2,
            "n_head": 4,
            "d_model": 32,
            "arch": "llama",
            "n_kv_head": 2,
            "ffn_hidden": 48,
            "bias": False,
            "init_seed": 5,
            **kw,
        }
    )


def rms_norm_reference(x, weight, eps):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * weight


def rotary_reference(x, start, theta):
    """x [B, H, T, d] as d/2 complex numbers z_i = x_i + i x_{i+d/2}, each turned by
    (start + t) * theta^(-2i/d)."""
    d, T = x.shape[-1], x.shape[2]
    z = torch.complex(x[..., : d // 2], x[..., d // 2 :])
    freq = theta ** (-torch.arange(0, d // 2, dtype=torch.float64) * 2 / d)
    angle = torch.arange(start, start + T, dtype=torch.float64)[:, None] * freq[None, :]
    z = z * torch.polar(torch.ones_like(angle), angle)
    return torch.cat([z.real, z.imag], dim=-1)


def block_reference(block, x, cfg: GPTConfig):
    """One llama block written out: RMSNorm, q|k|v, per-head QK-norm, rotary, grouped-query
    causal softmax attention with an explicit mask, RMSNorm, SwiGLU."""
    B, T, d = x.shape
    hd, H, KV = cfg.head_dim, cfg.n_head, cfg.n_kv_head
    h = rms_norm_reference(x, block.ln1.weight, cfg.norm_eps)
    q, k, v = (h @ block.attn.qkv.weight.T).split([H * hd, KV * hd, KV * hd], dim=-1)
    q, k, v = q.view(B, T, H, hd), k.view(B, T, KV, hd), v.view(B, T, KV, hd)
    if cfg.qk_norm:
        q = rms_norm_reference(q, block.attn.q_norm.weight, cfg.norm_eps)
        k = rms_norm_reference(k, block.attn.k_norm.weight, cfg.norm_eps)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    q, k = rotary_reference(q, 0, cfg.rope_theta), rotary_reference(k, 0, cfg.rope_theta)
    out = torch.empty(B, H, T, hd, dtype=x.dtype)
    for head in range(H):
        shared = head // (H // KV)  # the key/value head this query head reads
        scores = q[:, head] @ k[:, shared].transpose(-1, -2) / math.sqrt(hd)
        scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        out[:, head] = scores.softmax(-1) @ v[:, shared]
    x = x + out.transpose(1, 2).reshape(B, T, d) @ block.attn.proj.weight.T
    h = rms_norm_reference(x, block.ln2.weight, cfg.norm_eps)
    gate, up = (h @ block.mlp.fc.weight.T).split(cfg.ffn_hidden, dim=-1)
    return x + (gate * torch.sigmoid(gate) * up) @ block.mlp.proj.weight.T


def test_rms_norm_and_rotary_match_float64_references():
    x = torch.randn(2, 3, 7, 8, dtype=torch.float64)
    norm = RMSNorm(8, eps=1e-5).double()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    assert torch.allclose(norm(x), rms_norm_reference(x, norm.weight, 1e-5), rtol=1e-12, atol=1e-12)
    for start in (0, 5):
        assert torch.allclose(
            rotate(x, start, 10000.0), rotary_reference(x, start, 10000.0), rtol=1e-10, atol=1e-12
        )
    # Rotation keeps norms and makes q.k depend on the offset between positions only.
    q, k = torch.randn(1, 1, 1, 8, dtype=torch.float64), torch.randn(1, 1, 1, 8, dtype=torch.float64)
    dots = [(rotate(q, a + 3, 500.0) * rotate(k, a, 500.0)).sum() for a in (0, 4, 11)]
    assert torch.allclose(torch.stack(dots), dots[0].expand(3), rtol=1e-10)


@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("n_kv_head", [4, 2, 1])  # multi-head, grouped-query, multi-query
def test_block_matches_the_written_out_reference(n_kv_head, qk_norm):
    cfg = llama(n_kv_head=n_kv_head, qk_norm=qk_norm)
    model = GPT(cfg).double()
    block = model.blocks[0]
    with torch.no_grad():
        for name, p in block.named_parameters():
            if name.endswith("norm.weight") or ".ln" in f".{name}":
                p.uniform_(0.5, 1.5)  # not the initial ones: a wrong scale would show
    x = torch.randn(2, 9, cfg.d_model, dtype=torch.float64)
    assert torch.allclose(block(x), block_reference(block, x, cfg), rtol=1e-10, atol=1e-12)


def test_llama_sizes_parameters_and_groups():
    assert (
        llama_ffn_hidden(4096) == 11008 and llama_ffn_hidden(2048, 256) == 5632
    )  # Llama 7B; a 2048-wide model
    cfg = llama(tie_embeddings=False, qk_norm=True)
    model = GPT(cfg)
    assert sum(p.numel() for p in model.parameters()) == param_count(cfg)
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    # Norm weights (RMSNorm, QK-norm, final) and the input embedding are never decayed; the untied head is.
    assert {n for n in names.values() if "norm" in n or ".ln" in n} | {"embed.wte.weight"} == no_decay_names
    assert "head.lm_head.weight" in {names[id(p)] for p in decay["params"]}


def test_z_loss_gradient_is_the_formulas():
    """d/dlogits of CE + c * mean(logsumexp^2) = (softmax - onehot + 2c * lse * softmax) / N."""
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 11, requires_grad=True)
    targets = torch.randint(0, 11, (3, 5))
    loss_fn = LMLoss(z_loss=1e-2)
    loss = loss_fn(logits, targets)
    loss.backward()
    flat = logits.detach().double().reshape(-1, 11)
    lse = flat.logsumexp(-1, keepdim=True)
    p = (flat - lse).exp()
    expected = (p - F.one_hot(targets.reshape(-1), 11).double() + 2e-2 * lse * p) / flat.shape[0]
    assert torch.allclose(logits.grad.double().reshape(-1, 11), expected, rtol=1e-5, atol=1e-7)
    z, n = loss_fn.take_z()
    assert n == 1 and z.item() == pytest.approx((lse**2).mean().item(), rel=1e-6)
    assert loss.item() == pytest.approx(
        F.cross_entropy(flat, targets.reshape(-1)).item() + 1e-2 * z.item(), rel=1e-6
    )
    with torch.no_grad():  # evaluation: the cross-entropy alone, nothing kept
        assert loss_fn(logits, targets).item() == pytest.approx(
            F.cross_entropy(flat, targets.reshape(-1)).item(), rel=1e-6
        )
    assert loss_fn.take_z() == (None, 0)


@pytest.mark.parametrize("qk_norm, tie", [(False, False), (True, True), (False, True)])
def test_export_gives_the_same_logits_and_greedy_text(qk_norm, tie):
    cfg = llama(qk_norm=qk_norm, tie_embeddings=tie, init_std=0.2)  # large weights: logits that differ
    model = GPT(cfg).eval()
    hf = to_hf(model.state_dict(), cfg, eos_id=0)
    assert type(hf).__name__ == ("Qwen3ForCausalLM" if qk_norm else "LlamaForCausalLM")
    x = torch.randint(0, cfg.vocab_size, (2, 16))
    with torch.no_grad():
        ours, theirs = model(x), hf(x).logits
    assert ((ours - theirs).norm() / ours.norm()).item() < 1e-4
    prompt = x[:, :4]
    greedy = hf.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        do_sample=False,
        max_new_tokens=10,
        min_new_tokens=10,
        eos_token_id=None,
        pad_token_id=0,
    )
    assert torch.equal(model.generate(prompt, 10, temperature=0), greedy)


def test_gpt3_with_qk_norm_is_refused_for_export():
    cfg = GPTConfig(vocab_size=97, seq_len=16, n_layer=1, n_head=2, d_model=16, qk_norm=True)
    with pytest.raises(UserError, match="no Hugging Face class"):
        to_hf(GPT(cfg).state_dict(), cfg, eos_id=0)
