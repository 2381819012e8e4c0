"""GPT-3 (Brown et al. 2020) and a Llama-style decoder, as one plain PyTorch module.

`arch: gpt3` (the default): pre-LayerNorm transformer decoder with learned positions, a
4x GELU MLP, biases, input and output embeddings tied, GPT-2 initialisation (normal
0.02, residual projections scaled by 1/sqrt(2 n_layer)) and causal attention through
torch.nn.functional.scaled_dot_product_attention. GPT-3's alternating sparse attention
is left out, as in every open reproduction.

`arch: llama` (Touvron et al. 2023): the same skeleton with RMSNorm, rotary position
embeddings in attention (Su et al. 2021, in Hugging Face's layout: dimension i turns with
i + d_head/2), a SwiGLU MLP (Shazeer 2020; gate and up projections packed in one matrix),
no biases, grouped-query attention (`n_kv_head` key/value heads, each shared by
n_head / n_kv_head query heads; 1 is multi-query), the output head optionally untied.

Either can normalise queries and keys per head (`qk_norm`, RMSNorm; OLMo 2, Qwen3), and
replace the MLP of every n-th block by a mixture of experts (`moe_*`: megatrain/model/moe.py).
The pieces (`Embedding`, `Block`, `Head`) are separate modules so the pipeline
version (megatrain/model/pipeline.py) can lay the same model out over stages.
"""

from __future__ import annotations

import hashlib
import math
import zlib
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from megatrain.model.moe import MoE
from megatrain.model.vocab_parallel import lookup, project

# What rebuilding the model needs, stored in checkpoints; keys a checkpoint lacks (written
# before they existed) take their defaults.
SHAPE = (
    "arch",
    "vocab_size",
    "seq_len",
    "n_layer",
    "n_head",
    "n_kv_head",
    "d_model",
    "ffn_hidden",
    "bias",
    "tie_embeddings",
    "qk_norm",
    "rope_theta",
    "norm_eps",
    "moe_experts",
    "moe_top_k",
    "moe_every",
    "moe_ffn_hidden",
    "moe_shared_experts",
    "moe_renormalize",
)
ARCHS = ("gpt3", "llama")


def llama_ffn_hidden(d_model: int, multiple_of: int = 256) -> int:
    """Llama's SwiGLU width: 2/3 of 4 d_model (the same parameters as a 4x MLP with two
    matrices), rounded up to a multiple of `multiple_of`."""
    return multiple_of * math.ceil(int(2 * 4 * d_model / 3) / multiple_of)


@dataclass
class GPTConfig:
    """The model: its shape (SHAPE, stored in checkpoints) and how it trains and starts."""

    vocab_size: int
    seq_len: int
    n_layer: int
    n_head: int
    d_model: int
    arch: str = "gpt3"
    n_kv_head: int | None = None  # None: n_head (no grouping)
    ffn_hidden: int | None = None  # None: 4 d_model (gpt3), llama_ffn_hidden (llama)
    bias: bool | None = None  # None: the architecture's (gpt3 yes, llama no)
    tie_embeddings: bool = True
    qk_norm: bool = False
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    dropout: float = 0.0
    z_loss: float = 0.0
    init_std: float = 0.02
    activation_checkpointing: bool = False
    init_seed: int = 0
    # Mixture of experts (megatrain/model/moe.py); 0 experts: every block dense.
    moe_experts: int = 0
    moe_top_k: int = 2
    moe_every: int = 1  # block i (from 0) is MoE when (i + 1) % moe_every == 0 (Qwen3's rule)
    moe_ffn_hidden: int | None = None  # None: ffn_hidden
    moe_shared_experts: int = 0
    moe_renormalize: bool = True
    moe_aux_loss: float = 0.0
    moe_z_loss: float = 0.0
    moe_capacity_factor: float | None = None  # None: dropless

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {ARCHS}, not {self.arch!r}")
        if self.bias is None:
            self.bias = self.arch == "gpt3"
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.ffn_hidden is None:
            self.ffn_hidden = 4 * self.d_model if self.arch == "gpt3" else llama_ffn_hidden(self.d_model)
        if self.moe_ffn_hidden is None:
            self.moe_ffn_hidden = self.ffn_hidden

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    def is_moe(self, block: int) -> bool:
        """Whether block `block` (from 0) has experts instead of the dense MLP."""
        return self.moe_experts > 0 and (block + 1) % self.moe_every == 0

    @property
    def moe_blocks(self) -> list[int]:
        return [i for i in range(self.n_layer) if self.is_moe(i)]

    @property
    def rotary(self) -> bool:
        return self.arch == "llama"

    @property
    def gated(self) -> bool:
        """SwiGLU: the MLP's first matrix holds the gate and up projections."""
        return self.arch == "llama"

    @classmethod
    def from_config(cls, cfg, vocab_size: int) -> GPTConfig:
        """From a run config (megatrain.config.Config) and the vocabulary it trains with."""
        m = cfg.model
        ffn_hidden = m.ffn_hidden or (
            llama_ffn_hidden(m.d_model, m.ffn_multiple_of) if m.arch == "llama" else None
        )
        return cls(
            vocab_size=vocab_size,
            seq_len=cfg.train.seq_len,
            n_layer=m.n_layer,
            n_head=m.n_head,
            d_model=m.d_model,
            arch=m.arch,
            n_kv_head=m.n_kv_head,
            ffn_hidden=ffn_hidden,
            bias=m.bias,
            tie_embeddings=m.tie_embeddings,
            qk_norm=m.qk_norm,
            rope_theta=m.rope_theta,
            norm_eps=m.norm_eps,
            dropout=m.dropout,
            z_loss=cfg.optim.z_loss,
            init_std=m.init_std,
            activation_checkpointing=m.activation_checkpointing,
            init_seed=cfg.run.seed,
            **(moe_fields(m.moe) if m.moe.experts else {}),
        )

    @classmethod
    def from_shape(cls, shape: dict) -> GPTConfig:
        return cls(**{k: shape[k] for k in SHAPE if k in shape})

    def shape(self) -> dict:
        return {k: getattr(self, k) for k in SHAPE}


def moe_fields(moe) -> dict:
    """GPTConfig's moe_* fields from the config's model.moe section."""
    return {
        "moe_experts": moe.experts,
        "moe_top_k": moe.top_k,
        "moe_every": moe.every,
        "moe_ffn_hidden": moe.ffn_hidden,
        "moe_shared_experts": moe.shared_experts,
        "moe_renormalize": moe.renormalize,
        "moe_aux_loss": moe.aux_loss,
        "moe_z_loss": moe.z_loss,
        "moe_capacity_factor": moe.capacity_factor,
    }


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in fp32 at least (as Hugging Face's Llama and Qwen3 do)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.to(torch.promote_types(x.dtype, torch.float32))
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def norm_spec(cfg: GPTConfig, dim: int) -> tuple[type[nn.Module], tuple, dict]:
    """(class, args, kwargs) of the architecture's normalisation over the last `dim`
    features (the pipeline's layer specs take them apart)."""
    if cfg.arch == "llama":
        return RMSNorm, (dim, cfg.norm_eps), {}
    return nn.LayerNorm, (dim,), {"eps": cfg.norm_eps, "bias": cfg.bias}


def norm(cfg: GPTConfig, dim: int) -> nn.Module:
    cls, args, kwargs = norm_spec(cfg, dim)
    return cls(*args, **kwargs)


def rotate(x: torch.Tensor, start: int, theta: float) -> torch.Tensor:
    """Rotary position embedding of x [B, heads, T, d_head] for positions start..start+T:
    dimension i and i + d_head/2 turn together by angle position * theta^(-2i/d_head)."""
    d, dtype = x.shape[-1], torch.promote_types(x.dtype, torch.float32)  # angles in fp32 at least
    inv_freq = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.int64, device=x.device).to(dtype) / d))
    positions = torch.arange(start, start + x.shape[2], device=x.device, dtype=dtype)
    angles = torch.outer(positions, inv_freq)
    angles = torch.cat((angles, angles), dim=-1)
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Positions(nn.Module):
    """Learned position embeddings added to the token embeddings (gpt3; a rotary model
    turns queries and keys in attention instead), then dropout."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.wpe = None if cfg.rotary else nn.Embedding(cfg.seq_len, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        # Under tensor parallelism (a VocabParallel, set by the trainer's build): with sequence
        # parallelism x is this rank's slice of the sequence, which this says where starts.
        self.sequence_slice = None

    def forward(self, x: torch.Tensor, start: int = 0) -> torch.Tensor:
        if self.wpe is not None:
            if self.sequence_slice is not None:
                start += self.sequence_slice.first_position(x.shape[1])
            x = x + self.wpe(torch.arange(start, start + x.shape[1], device=x.device))
        return self.drop(x)


class Embedding(nn.Module):
    """Token plus learned position embeddings; `unembed` reuses the token table (tied). Under
    tensor parallelism `vocab_parallel` (a VocabParallel, set by the trainer's build) says
    which rows of the vocabulary this rank's table holds: lookups are summed over the group,
    logits are this rank's slice."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.positions = Positions(cfg)
        self.vocab_parallel = None

    def forward(self, idx: torch.Tensor, start: int = 0) -> torch.Tensor:
        return self.positions(lookup(self.vocab_parallel, idx, self.wte.weight), start)

    def unembed(self, x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """Logits from the token table (or `weight`, an untied head's)."""
        return project(self.vocab_parallel, x, self.wte.weight if weight is None else weight)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        if cfg.n_head % cfg.n_kv_head:
            raise ValueError(f"n_head {cfg.n_head} is not a multiple of n_kv_head {cfg.n_kv_head}")
        self.head_dim = cfg.head_dim
        self.group = cfg.n_head // cfg.n_kv_head  # query heads per key/value head
        self.qkv = nn.Linear(cfg.d_model, (cfg.n_head + 2 * cfg.n_kv_head) * self.head_dim, bias=cfg.bias)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.rope_theta = cfg.rope_theta if cfg.rotary else None
        if cfg.qk_norm:
            self.q_norm, self.k_norm = (
                RMSNorm(self.head_dim, cfg.norm_eps),
                RMSNorm(self.head_dim, cfg.norm_eps),
            )
        self.qk_norm = cfg.qk_norm
        self.dropout = cfg.dropout
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, cache: dict | None = None) -> torch.Tensor:
        """`cache` (generation): keys and values of the positions before x, extended in place."""
        qkv = self.qkv(x)  # with sequence parallelism x is a slice of the sequence, qkv all of it
        B, T, _ = qkv.shape
        # All heads, or under tensor parallelism this rank's share (whole heads, q|k|v each cut).
        kv = qkv.shape[-1] // (self.head_dim * (self.group + 2)) * self.head_dim
        q, k, v = qkv.split([self.group * kv, kv, kv], dim=2)
        q, k, v = (t.view(B, T, t.shape[-1] // self.head_dim, self.head_dim) for t in (q, k, v))
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        start = cache["k"].shape[2] if cache else 0
        if self.rope_theta is not None:
            q, k = rotate(q, start, self.rope_theta), rotate(k, start, self.rope_theta)
        if cache is not None:
            if cache:  # one new position attends to every cached one: no mask
                assert T == 1, "after the prompt, decode one position at a time"
                k, v = torch.cat([cache["k"], k], dim=2), torch.cat([cache["v"], v], dim=2)
            cache["k"], cache["v"] = k, v
        if self.group > 1:  # each key/value head serves `group` query heads
            k, v = k.repeat_interleave(self.group, dim=1), v.repeat_interleave(self.group, dim=1)
        causal = T > 1
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=causal, dropout_p=self.dropout if self.training else 0.0
        )
        return self.resid_drop(self.proj(y.transpose(1, 2).reshape(B, T, q.shape[1] * self.head_dim)))


class MLP(nn.Module):
    """gpt3: proj(gelu(fc x)); llama (SwiGLU): proj(silu(gate x) * up x), gate|up packed in fc."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.gated = cfg.gated
        self.fc = nn.Linear(cfg.d_model, (2 if self.gated else 1) * cfg.ffn_hidden, bias=cfg.bias)
        self.proj = nn.Linear(cfg.ffn_hidden, cfg.d_model, bias=cfg.bias)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            gate, up = self.fc(x).chunk(2, dim=-1)  # under tensor parallelism, this rank's share of each
            return self.drop(self.proj(F.silu(gate) * up))
        return self.drop(self.proj(F.gelu(self.fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig, index: int = 0):
        """Block `index` (from 0): its MLP has experts when cfg.is_moe(index)."""
        super().__init__()
        self.ln1 = norm(cfg, cfg.d_model)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = norm(cfg, cfg.d_model)
        self.mlp = MoE(cfg) if cfg.is_moe(index) else MLP(cfg)

    def forward(self, x: torch.Tensor, cache: dict | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), cache)
        return x + self.mlp(self.ln2(x))


class Head(nn.Module):
    """Final norm, then the projection to the vocabulary: the tied embedding, or its own."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_f = norm(cfg, cfg.d_model)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)

    def forward(self, x: torch.Tensor, embedding: Embedding) -> torch.Tensor:
        return embedding.unembed(self.ln_f(x), None if self.lm_head is None else self.lm_head.weight)


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy, computed in fp32 whatever the training precision."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))


class LMLoss:
    """The training loss: lm_loss, plus z_loss * mean(log(Z)^2) when z_loss > 0 (PaLM's
    auxiliary loss; Z is the output softmax's normaliser, log Z = logsumexp of the logits),
    which keeps the logits from drifting; only where gradients are computed (training), so
    evaluation scores the cross-entropy alone. The z terms (without the coefficient) of
    the micro-batches since the last `take_z()` are kept, detached, for the metrics."""

    def __init__(self, z_loss: float = 0.0):
        self.z_loss = z_loss
        self.z_sum, self.z_count = None, 0
        self.vocab_parallel = None  # with the embedding's: the logits are this rank's slice

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.vocab_parallel is None:
            loss, z = lm_loss(logits, targets), None
        else:
            loss, z = self.vocab_parallel.loss(logits, targets)
        if not self.z_loss or not torch.is_grad_enabled():  # evaluation scores the cross-entropy alone
            return loss
        if z is None:
            z = logits.float().logsumexp(dim=-1).pow(2).mean()
        self.z_sum = z.detach() if self.z_sum is None else self.z_sum + z.detach()
        self.z_count += 1
        return loss + self.z_loss * z

    def take_z(self) -> tuple[torch.Tensor | None, int]:
        """(sum of the kept z terms, on the logits' device, or None; how many), then forgets them."""
        out = (self.z_sum, self.z_count)
        self.z_sum, self.z_count = None, 0
        return out


class RouterLosses:
    """The MoE layers' router losses of each training forward, read right after it (an
    activation-checkpointing recompute in the backward pass overwrites the layers' `last`
    without being counted again), and their statistics summed since the last `take()`."""

    def __init__(self):
        self.stats: torch.Tensor | None = None  # [layers, moe.STATS_HEAD + experts], on the device

    def collect(self, layers: list[MoE]) -> torch.Tensor:
        losses, stats = zip(*(layer.last for layer in layers), strict=True)
        stats = torch.stack(stats)
        self.stats = stats if self.stats is None else self.stats + stats
        return torch.stack(losses).sum()

    def take(self) -> torch.Tensor | None:
        out, self.stats = self.stats, None
        return out


def _init_rule(name: str, cfg: GPTConfig) -> tuple[float | None, float, int]:
    """GPT-2 initialisation of one parameter, by its name in GPT: (fill value, or None for
    a normal draw; its std; its generator's seed). Biases 0, norm scales 1, residual
    projections (attn.proj, mlp.proj) N(0, 0.02/sqrt(2 n_layer)), every other weight
    N(0, 0.02). Each parameter draws from its own generators (one per INIT_PIECE
    elements), seeded by init_seed and its name, so any layout of the same model (one
    process, a pipeline cut anywhere, ZeRO-3 partitions) starts from the same numbers."""
    if name.endswith(".bias"):
        return 0.0, 0.0, 0
    if ".ln" in name or name.startswith("ln") or "_norm." in name:
        return 1.0, 0.0, 0
    residual = name.endswith(("attn.proj.weight", "mlp.proj.weight", "experts.proj", "shared.proj"))
    std = cfg.init_std / math.sqrt(2 * cfg.n_layer) if residual else cfg.init_std
    return None, std, cfg.init_seed * 1_000_003 + zlib.crc32(name.encode())


# Elements of a parameter drawn from one generator: piece k of a parameter (its flattened
# elements [k * INIT_PIECE, (k + 1) * INIT_PIECE)) has a generator of its own, so that a
# ZeRO-3 rank draws only the pieces of its slice (a rank drawing all of a 175B model's
# parameters on the host would take many minutes of one core), and the numbers stay the
# same in every layout.
INIT_PIECE = 1 << 22


def initial_value(name: str, shape, cfg: GPTConfig, piece: int = INIT_PIECE) -> torch.Tensor:
    """One parameter's initial value as an fp32 host tensor (see _init_rule and INIT_PIECE)."""
    pieces = [values for _, values in initial_value_pieces(name, shape, cfg, piece=piece)]
    return (pieces[0] if len(pieces) == 1 else torch.cat(pieces)).view(shape)


def is_drawn(name: str, cfg: GPTConfig) -> bool:
    """The parameter's initial value is a random draw (not a constant fill)."""
    return _init_rule(name, cfg)[0] is None


def initial_value_pieces(
    name: str,
    shape,
    cfg: GPTConfig,
    start: int = 0,
    stop: int | None = None,
    piece: int = INIT_PIECE,
    wanted=None,
):
    """The pieces of initial_value(name, shape, cfg), flattened, that overlap its elements
    [start, stop), as (offset, values), each drawn from its own generator: a large parameter
    is never whole in memory, and only the pieces asked for are drawn (`wanted(k)`: only
    pieces k it accepts)."""
    fill, std, seed = _init_rule(name, cfg)
    numel = math.prod(shape)
    stop = numel if stop is None else min(stop, numel)
    for k in range(start // piece, -(-stop // piece) if stop > start else 0):
        if wanted is not None and not wanted(k):
            continue
        offset = k * piece
        n = min(piece, numel - offset)
        if fill is not None:
            yield offset, torch.full((n,), fill)
        else:
            # piece 0 from the parameter's own seed: a parameter of one piece draws as one randn call
            gen = torch.Generator().manual_seed(seed if k == 0 else _piece_seed(seed, k))
            yield offset, torch.randn(n, generator=gen, dtype=torch.float32).mul_(std)


def _piece_seed(seed: int, k: int) -> int:
    """A seed for piece k > 0 that no parameter's own seed is likely to equal."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{k}".encode()).digest()[:8], "little") >> 1


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
        self.loss_fn = LMLoss(cfg.z_loss)
        self.router = RouterLosses()
        self.embed = Embedding(cfg)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.head = Head(cfg)
        if init_weights:
            for name, param in self.named_parameters():
                init_parameter(name, param, cfg)

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        caches: list[dict] | None = None,
        start: int = 0,
    ) -> torch.Tensor:
        """Logits [B, T, vocab], or the mean loss when targets are given. `caches` (one dict
        per block) and `start` (the position of idx[:, 0]) are for generation."""
        x = self.embed(idx, start)
        for i, block in enumerate(self.blocks):
            if self.cfg.activation_checkpointing and self.training:
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x, caches[i] if caches is not None else None)
        logits = self.head(x, self.embed)
        if targets is None:
            return logits
        loss = self.loss_fn(logits, targets)
        if self.training and torch.is_grad_enabled() and self.cfg.moe_experts:
            loss = loss + self.router.collect(self.moe_layers())
        return loss

    def moe_layers(self) -> list[MoE]:
        return [b.mlp for b in self.blocks if isinstance(b.mlp, MoE)]

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_id: int | None = None,
        generator: torch.Generator | None = None,
        use_cache: bool = True,
        on_token=None,
    ) -> torch.Tensor:
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
            logits = (
                self(token[:, None], caches=caches, start=out.shape[1] - 1) if use_cache else self(out)
            )[:, -1]
        return out


def sample(
    logits: torch.Tensor,
    temperature: float,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
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


def block_params(cfg: GPTConfig, block: int = 0, active: bool = False) -> tuple[int, int]:
    """(matmul weights, other parameters) of block `block`; of an MoE block all its experts,
    or with `active` those one token uses (top_k routed and the shared ones), and the router."""
    d, gate = cfg.d_model, 2 if cfg.gated else 1
    qkv = (cfg.n_head + 2 * cfg.n_kv_head) * cfg.head_dim
    weights, biases = d * qkv + d * d, qkv + d if cfg.bias else 0
    if cfg.is_moe(block):
        experts = (cfg.moe_top_k if active else cfg.moe_experts) + cfg.moe_shared_experts
        weights += experts * expert_weights(cfg) + d * cfg.moe_experts  # and the router
    else:
        weights += d * gate * cfg.ffn_hidden + cfg.ffn_hidden * d
        biases += gate * cfg.ffn_hidden + d if cfg.bias else 0
    return weights, biases + 2 * norm_params(cfg, d) + (2 * cfg.head_dim if cfg.qk_norm else 0)


def expert_weights(cfg: GPTConfig) -> int:
    """One expert's weights (fc, with gate|up for SwiGLU, and proj) in one MoE block."""
    return (3 if cfg.gated else 2) * cfg.d_model * cfg.moe_ffn_hidden


def blocks_params(cfg: GPTConfig, active: bool = False) -> int:
    """Parameters of all the blocks (see block_params)."""
    return sum(sum(block_params(cfg, i, active)) for i in range(cfg.n_layer))


def norm_params(cfg: GPTConfig, dim: int) -> int:
    return dim * (2 if cfg.arch == "gpt3" and cfg.bias else 1)


def matmul_params(cfg: GPTConfig, active: bool = False) -> int:
    """Parameters that take part in matmuls (every expert's, or with `active` those of one
    token): the blocks, the final norm, and the output projection (its own, or the tied token
    table used as a matmul by the head). The embedding lookups are not matmuls."""
    return blocks_params(cfg, active) + norm_params(cfg, cfg.d_model) + cfg.vocab_size * cfg.d_model


def param_count(cfg: GPTConfig, active: bool = False) -> int:
    """Parameters of the model (a tied table counted once); with `active`, of an MoE model
    only the experts one token uses."""
    positions = 0 if cfg.rotary else cfg.seq_len * cfg.d_model
    input_table = 0 if cfg.tie_embeddings else cfg.vocab_size * cfg.d_model
    return matmul_params(cfg, active) + positions + input_table


def flops_per_token(cfg: GPTConfig) -> float:
    """Training FLOPs per token as in PaLM's appendix B: 6N + 12 * L * H * Q * T, with
    N = matmul_params (of an MoE model the active ones: a token's experts and the router)
    and H * Q = d_model (the attention score and value matmuls, per query head: grouped keys
    and values do not change them)."""
    return 6.0 * matmul_params(cfg, active=True) + 12.0 * cfg.n_layer * cfg.d_model * cfg.seq_len


def recompute_flops_per_token(cfg: GPTConfig) -> float:
    """FLOPs per token that activation checkpointing adds: the blocks' forward pass again
    (a third of their training FLOPs: 2 x the blocks' active matmul weights, and 4 L d T
    for attention)."""
    weights = sum(block_params(cfg, i, active=True)[0] for i in range(cfg.n_layer))
    return 2.0 * weights + 4.0 * cfg.n_layer * cfg.d_model * cfg.seq_len
