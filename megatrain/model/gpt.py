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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(x + self.wpe(torch.arange(x.shape[1], device=x.device)))


class Embedding(nn.Module):
    """Token plus learned position embeddings; `unembed` reuses the token table (tied)."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.positions = Positions(cfg)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.positions(self.wte(idx))

    def unembed(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.wte.weight)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=cfg.bias)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.dropout = cfg.dropout
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
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

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, T, vocab], or the mean loss when targets are given."""
        x = self.embed(idx)
        for block in self.blocks:
            if self.cfg.activation_checkpointing and self.training:
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        logits = self.head(x, self.embed)
        return logits if targets is None else lm_loss(logits, targets)


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
