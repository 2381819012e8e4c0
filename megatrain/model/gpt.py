"""GPT-3 (Brown et al. 2020), as a plain PyTorch module.

Pre-LayerNorm transformer decoder with learned positions, a 4x GELU MLP, input and
output embeddings tied, GPT-2 initialisation (normal 0.02, residual projections
scaled by 1/sqrt(2 n_layer)) and causal attention through
torch.nn.functional.scaled_dot_product_attention. GPT-3's alternating sparse
attention is left out, as in every open reproduction.

The pieces (`Embedding`, `Block`, `Head`) are separate modules so the pipeline
version (megatrain/model/pipeline.py) can lay the same model out over stages.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

SHAPE = ("vocab_size", "seq_len", "n_layer", "n_head", "d_model", "bias")  # what the weights' shapes follow


@dataclass
class GPTConfig:
    """The model: its shape (SHAPE, stored in checkpoints) and how it trains and starts."""

    vocab_size: int
    seq_len: int
    n_layer: int
    n_head: int
    d_model: int
    dropout: float = 0.0
    bias: bool = True
    init_std: float = 0.02
    activation_checkpointing: bool = False
    init_seed: int = 0

    @classmethod
    def from_config(cls, cfg, vocab_size: int) -> GPTConfig:
        """From a run config (megatrain.config.Config) and the vocabulary it trains with."""
        m = cfg.model
        return cls(vocab_size=vocab_size, seq_len=cfg.train.seq_len, n_layer=m.n_layer, n_head=m.n_head,
                   d_model=m.d_model, dropout=m.dropout, bias=m.bias, init_std=m.init_std,
                   activation_checkpointing=m.activation_checkpointing, init_seed=cfg.run.seed)

    @classmethod
    def from_shape(cls, shape: dict) -> GPTConfig:
        return cls(**{k: shape[k] for k in SHAPE})

    def shape(self) -> dict:
        return {k: getattr(self, k) for k in SHAPE}


class Positions(nn.Module):
    """Learned position embeddings added to the token embeddings, then dropout."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.wpe = nn.Embedding(cfg.seq_len, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, start: int = 0) -> torch.Tensor:
        return self.drop(x + self.wpe(torch.arange(start, start + x.shape[1], device=x.device)))


class Embedding(nn.Module):
    """Token plus learned position embeddings; `unembed` reuses the token table (tied)."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.positions = Positions(cfg)

    def forward(self, idx: torch.Tensor, start: int = 0) -> torch.Tensor:
        return self.positions(self.wte(idx), start)

    def unembed(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.wte.weight)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.head_dim = cfg.d_model // cfg.n_head
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=cfg.bias)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.dropout = cfg.dropout
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, cache: dict | None = None) -> torch.Tensor:
        """`cache` (generation): keys and values of the positions before x, extended in place."""
        B, T, _ = x.shape
        qkv = self.qkv(x)
        C = qkv.shape[-1] // 3  # d_model, or under tensor parallelism this rank's share of the heads
        q, k, v = qkv.split(C, dim=2)
        q, k, v = (t.view(B, T, C // self.head_dim, self.head_dim).transpose(1, 2) for t in (q, k, v))
        if cache is not None:
            if cache:  # one new position attends to every cached one: no mask
                assert T == 1, "after the prompt, decode one position at a time"
                k, v = torch.cat([cache["k"], k], dim=2), torch.cat([cache["v"], v], dim=2)
            cache["k"], cache["v"] = k, v
        causal = T > 1
        y = F.scaled_dot_product_attention(q, k, v, is_causal=causal, dropout_p=self.dropout if self.training else 0.0)
        return self.resid_drop(self.proj(y.transpose(1, 2).reshape(B, T, C)))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, 4 * cfg.d_model, bias=cfg.bias)
        self.proj = nn.Linear(4 * cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(F.gelu(self.fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cache: dict | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), cache)
        return x + self.mlp(self.ln2(x))


class Head(nn.Module):
    """Final LayerNorm; the projection to the vocabulary is the tied embedding."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_f = nn.LayerNorm(cfg.d_model, bias=cfg.bias)

    def forward(self, x: torch.Tensor, embedding: Embedding) -> torch.Tensor:
        return embedding.unembed(self.ln_f(x))


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy, computed in fp32 whatever the training precision."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))


def _init_rule(name: str, cfg: GPTConfig) -> tuple[float | None, float, int]:
    """GPT-2 initialisation of one parameter, by its name in GPT: (fill value, or None for
    a normal draw; its std; its generator's seed). Biases 0, LayerNorm scales 1, residual
    projections (attn.proj, mlp.proj) N(0, 0.02/sqrt(2 n_layer)), every other weight
    N(0, 0.02). Each parameter draws from its own generator, seeded by init_seed and its
    name, so any layout of the same model (one process, a pipeline cut anywhere, ZeRO-3
    partitions) starts from the same numbers."""
    if name.endswith(".bias"):
        return 0.0, 0.0, 0
    if ".ln" in name or name.startswith("ln"):
        return 1.0, 0.0, 0
    residual = name.endswith("attn.proj.weight") or name.endswith("mlp.proj.weight")
    std = cfg.init_std / math.sqrt(2 * cfg.n_layer) if residual else cfg.init_std
    return None, std, cfg.init_seed * 1_000_003 + zlib.crc32(name.encode())


def initial_value(name: str, shape, cfg: GPTConfig) -> torch.Tensor:
    """One parameter's initial value as an fp32 host tensor (see _init_rule)."""
    fill, std, seed = _init_rule(name, cfg)
    if fill is not None:
        return torch.full(shape, fill)
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32).mul_(std)


def initial_value_pieces(name: str, shape, cfg: GPTConfig, piece: int = 1 << 22):
    """initial_value(name, shape, cfg), flattened, as (offset, values) pieces of about
    `piece` elements, so a large parameter is never whole in memory. The same numbers:
    torch's CPU normal sampler works in blocks of 16, so pieces that are multiples of 16,
    the last one at least 16 long, draw exactly what one call draws (tested)."""
    fill, std, seed = _init_rule(name, cfg)
    gen = torch.Generator().manual_seed(seed)
    numel, offset, piece = math.prod(shape), 0, max(16, piece // 16 * 16)
    while offset < numel:
        n = piece if numel - offset > piece + 15 else numel - offset
        if fill is not None:
            yield offset, torch.full((n,), fill)
        else:
            yield offset, torch.randn(n, generator=gen, dtype=torch.float32).mul_(std)
        offset += n


def init_parameter(name: str, param: torch.Tensor, cfg: GPTConfig) -> None:
    """`param` (on any device, in any dtype) set to its initial value."""
    with torch.no_grad():
        param.copy_(initial_value(name, param.shape, cfg))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig, init_weights: bool = True):
        """`init_weights=False` leaves the parameters as built (on the meta device, or
        partitioned by ZeRO-3): megatrain/train/build.py draws them where they are kept."""
        super().__init__()
        if cfg.d_model % cfg.n_head:
            raise ValueError(f"d_model {cfg.d_model} is not divisible by n_head {cfg.n_head}")
        self.cfg = cfg
        self.embed = Embedding(cfg)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.head = Head(cfg)
        if init_weights:
            for name, param in self.named_parameters():
                init_parameter(name, param, cfg)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, caches: list[dict] | None = None,
                start: int = 0) -> torch.Tensor:
        """Logits [B, T, vocab], or the mean loss when targets are given. `caches` (one dict
        per block) and `start` (the position of idx[:, 0]) are for generation."""
        x = self.embed(idx, start)
        for i, block in enumerate(self.blocks):
            if self.cfg.activation_checkpointing and self.training:
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x, caches[i] if caches is not None else None)
        logits = self.head(x, self.embed)
        return logits if targets is None else lm_loss(logits, targets)

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, eos_id: int | None = None, generator: torch.Generator | None = None,
                 use_cache: bool = True, on_token=None) -> torch.Tensor:
        """Continue the prompts idx [B, T] by up to max_new_tokens, within the context
        (seq_len); temperature 0 is greedy. With the KV cache each new token costs one
        position's forward pass. A row that produced eos_id continues with eos_id.
        `on_token(tokens [B])` sees each step's tokens as they come (streaming)."""
        caches = [{} for _ in self.blocks] if use_cache else None
        out, done = idx, torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
        logits = self(idx, caches=caches)[:, -1]
        for _ in range(min(max_new_tokens, self.cfg.seq_len - idx.shape[1])):
            token = sample(logits, temperature, top_k, top_p, generator)
            if eos_id is not None:
                token = torch.where(done, torch.full_like(token, eos_id), token)
                done |= token == eos_id
            out = torch.cat([out, token[:, None]], dim=1)
            if on_token is not None:
                on_token(token)
            if bool(done.all()) or out.shape[1] == self.cfg.seq_len:
                break
            logits = (self(token[:, None], caches=caches, start=out.shape[1] - 1) if use_cache else self(out))[:, -1]
        return out


def sample(logits: torch.Tensor, temperature: float, top_k: int | None = None, top_p: float | None = None,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Next tokens [B] from logits [B, vocab]: argmax at temperature 0, else a draw from
    the softmax at `temperature`, kept to the top_k tokens and to the smallest set whose
    probability reaches top_p."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        outside = probs.cumsum(-1) - probs >= top_p  # tokens after the nucleus is full
        logits = logits.masked_fill(torch.zeros_like(outside).scatter(1, order, outside), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]


def matmul_params(cfg: GPTConfig) -> int:
    """Parameters that take part in matmuls for every token: the blocks, the final norm,
    and the output projection (the tied token table, used as a matmul by the head).
    The embedding lookups are not matmuls."""
    per_block = 12 * cfg.d_model**2 + (13 if cfg.bias else 2) * cfg.d_model
    final_norm = (2 if cfg.bias else 1) * cfg.d_model
    return cfg.n_layer * per_block + final_norm + cfg.vocab_size * cfg.d_model


def param_count(cfg: GPTConfig) -> int:
    """Parameters of the model (the tied table counted once)."""
    return matmul_params(cfg) + cfg.seq_len * cfg.d_model


def flops_per_token(cfg: GPTConfig) -> float:
    """Training FLOPs per token as in PaLM's appendix B: 6N + 12 * L * H * Q * T, with
    N = matmul_params and H * Q = d_model (the attention score and value matmuls)."""
    return 6.0 * matmul_params(cfg) + 12.0 * cfg.n_layer * cfg.d_model * cfg.seq_len


def recompute_flops_per_token(cfg: GPTConfig) -> float:
    """FLOPs per token that activation checkpointing adds: the blocks' forward pass again
    (a third of their training FLOPs: 2 x 12 d^2 per layer, and 4 L d T for attention)."""
    return 24.0 * cfg.n_layer * cfg.d_model**2 + 4.0 * cfg.n_layer * cfg.d_model * cfg.seq_len
