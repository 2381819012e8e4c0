"""The run configuration's schema: one dataclass per section, every field documented
where it is defined, and each section's own checks (`problems`).

Types are checked while loading (megatrain/config/loading.py); `problems` checks what a
type cannot say (ranges, relations between fields) and yields (dotted key, message).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

Problems = Iterator[tuple[str, str]]


def _at_least(section, name: str, **least) -> Problems:
    """`section.key >= least[key]` for each key."""
    for key, low in least.items():
        if getattr(section, key) < low:
            yield f"{name}.{key}", f"must be >= {low}, got {getattr(section, key)}"


@dataclass
class RunConfig:
    dir: str = "runs/default"
    """Run directory: config.yaml, metrics.jsonl, events.jsonl, checkpoints/, latest, curves.png."""
    name: str | None = None
    """Run name for wandb and the console; defaults to the run directory's name."""
    seed: int = 1234
    """Seeds the model initialisation, the data order and dropout."""
    branch_from: str | None = None
    """A checkpoint directory of another run (a WSD run's stable phase: a cooldown branch):
    while this run has no checkpoint of its own it starts from that one, as a resume would
    (model, optimizer state, data position, schedule position); then from its own."""

    def problems(self, cfg: Config) -> Problems:
        if self.branch_from and cfg.model.init_from:
            yield "run.branch_from", "and model.init_from exclude each other: a branch takes all its state"


@dataclass
class MoEConfig:
    """Mixture of experts (megatrain/model/moe.py, docs/moe.md): the MLP of some blocks
    replaced by `experts` MLPs of which each token uses `top_k`."""

    experts: int = 0
    """Routed experts per MoE block (Mixtral 8, OLMoE 64, DeepSeek-V3 256). 0: a dense model."""
    top_k: int = 2
    """Experts each token is sent to (Mixtral 2, OLMoE 8)."""
    every: int = 1
    """Block i (from 0) has experts when (i + 1) % every == 0: 1 every block (Mixtral), 2 every
    other (GShard, Switch)."""
    ffn_hidden: int | None = None
    """Each expert's MLP width; narrower than the dense MLP for fine-grained experts
    (DeepSeekMoE, OLMoE). None: model.ffn_hidden's."""
    shared_experts: int = 0
    """Always-on experts every token also goes through (DeepSeek's shared experts)."""
    renormalize: bool = True
    """The top_k routing weights rescaled to sum to 1 (Mixtral, OLMoE-style norm_topk_prob)."""
    aux_loss: float = 0.01
    """Coefficient of the load-balancing loss experts * sum_e f_e P_e (Switch; 1 when balanced;
    Switch 0.01); logged as moe_balance."""
    z_loss: float = 0.001
    """Coefficient of the router z-loss mean(logsumexp(router logits)^2) (ST-MoE: 0.001);
    logged as moe_z."""
    capacity_factor: float | None = None
    """None: dropless, every routed token computed. Else each expert takes at most
    ceil(capacity_factor x tokens x top_k / experts) assignments per micro-batch while
    training, the rest dropped and counted (moe_dropped)."""

    def problems(self, cfg: Config) -> Problems:
        if not self.experts:
            return
        yield from _at_least(self, "model.moe", experts=1, every=1, shared_experts=0, aux_loss=0, z_loss=0)
        if not 1 <= self.top_k <= self.experts:
            yield "model.moe.top_k", f"must be in [1, model.moe.experts ({self.experts})], got {self.top_k}"
        if self.every > cfg.model.n_layer:
            yield "model.moe.every", f"({self.every}) leaves no block of {cfg.model.n_layer} with experts"
        if self.ffn_hidden is not None and self.ffn_hidden < 1:
            yield "model.moe.ffn_hidden", "must be positive"
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            yield "model.moe.capacity_factor", f"must be > 0 (or null: dropless), got {self.capacity_factor}"
        for key, size, why in (
            ("pipeline_stages", cfg.parallel.pipeline_stages, "earlier stages' router losses would be lost"),
            ("tensor_parallel", cfg.parallel.tensor_parallel, "AutoTP does not split experts"),
        ):
            if size > 1:
                yield "model.moe", f"cannot be combined with parallel.{key}={size} yet ({why})"


@dataclass
class ModelConfig:
    arch: Literal["gpt3", "llama"] = "gpt3"
    """gpt3: learned positions, LayerNorm, a 4x GELU MLP, biases, tied embeddings. llama:
    rotary positions, RMSNorm, a SwiGLU MLP, no biases, grouped-query attention
    (megatrain/model/gpt.py)."""
    n_layer: int = 12
    """Transformer blocks."""
    n_head: int = 12
    """Attention heads; must divide d_model."""
    d_model: int = 768
    """Width of the residual stream (GPT-3's d_model)."""
    vocab_size: int | None = None
    """Vocabulary size; None takes the tokenizer's from the data manifest."""
    dropout: float = 0.0
    """Dropout on embeddings, attention and residuals. GPT-3-scale pretraining uses none."""
    n_kv_head: int | None = None
    """Key/value heads (grouped-query attention; 1 = multi-query); must divide n_head.
    None: n_head (every query head its own)."""
    ffn_hidden: int | None = None
    """The MLP's hidden width. None: 4 d_model (gpt3); Llama's rule for llama, 2/3 of
    4 d_model rounded up to a multiple of ffn_multiple_of."""
    ffn_multiple_of: int = 256
    """llama: the multiple its default ffn_hidden is rounded up to."""
    rope_theta: float = 10000.0
    """llama: the rotary embedding's base (Llama 2: 10000; Llama 3: 500000)."""
    norm_eps: float = 1.0e-5
    """Epsilon of the LayerNorms (gpt3) or RMSNorms (llama)."""
    bias: bool | None = None
    """Biases in linear layers and LayerNorms. None: the architecture's (gpt3 yes, llama no)."""
    tie_embeddings: bool = True
    """The output projection is the token embedding table (GPT-3); false gives the head its
    own matrix (Llama 2/3)."""
    qk_norm: bool = False
    """RMSNorm on the queries and keys of each head before attention (OLMo 2, Qwen3): keeps
    attention logits from growing, a common source of loss spikes."""
    init_std: float = 0.02
    """Standard deviation of the GPT-2 initialisation."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in the backward pass (saves memory, costs ~1/3 more compute)."""
    init_from: str | None = None
    """Start from trained weights instead of random ones (continued pretraining): a megatrain
    run or checkpoint directory (any layout), a consolidated .safetensors file, or a Hugging
    Face directory (GPT2LMHeadModel, LlamaForCausalLM, Qwen3ForCausalLM). The source sets the
    model's shape; used when the run has no checkpoint of its own (docs/continued-pretraining.md)."""
    init_from_vocab: Literal["match", "resize"] = "match"
    """match: the source's vocabulary must be the data's tokenizer's; resize: take it anyway,
    shared rows kept, new rows the mean embedding."""
    moe: MoEConfig = field(default_factory=MoEConfig)
    """Mixture of experts (model.moe.experts > 0)."""

    def problems(self, cfg: Config) -> Problems:
        yield from _at_least(self, "model", n_layer=1, n_head=1, d_model=1)
        if self.n_head > 0 and self.d_model % self.n_head:
            yield "model.d_model", f"({self.d_model}) must be divisible by model.n_head ({self.n_head})"
        if not 0.0 <= self.dropout < 1.0:
            yield "model.dropout", f"must be in [0, 1), got {self.dropout}"
        if self.vocab_size is not None and self.vocab_size <= 0:
            yield "model.vocab_size", "must be positive"
        if self.n_kv_head is not None and (self.n_kv_head < 1 or self.n_head % self.n_kv_head):
            yield (
                "model.n_kv_head",
                f"({self.n_kv_head}) must be a positive divisor of model.n_head ({self.n_head})",
            )
        if self.ffn_hidden is not None and self.ffn_hidden < 1:
            yield "model.ffn_hidden", "must be positive"
        yield from _at_least(self, "model", ffn_multiple_of=1)
        if self.rope_theta <= 0 or self.norm_eps <= 0:
            yield "model.rope_theta" if self.rope_theta <= 0 else "model.norm_eps", "must be positive"
        if self.arch == "gpt3" and not self.tie_embeddings:
            yield "model.tie_embeddings", "GPT-3 ties its embeddings (untied heads are for arch: llama)"
        yield from self.moe.problems(cfg)


@dataclass
class DataConfig:
    path: str | list[dict] = ""
    """A directory made by launch/prepare_data.py, or a blend: a list of {path: DIR, weight: W}
    (optionally name: N; default the directory's name), W >= 0 summing to more than 0."""
    stages: list[dict] = field(default_factory=list)
    """A curriculum over a blend: [{tokens: T, weights: {name: W, ...}}, ...], T increasing;
    from T tokens on, these weights (sources left out: 0). data.path's weights hold from 0
    (megatrain/schedule/mixture.py)."""
    stage_shape: Literal["stepwise", "linear"] = "stepwise"
    """stepwise: each stage's weights hold until the next stage; linear: the weights move
    linearly from one stage's start to the next's."""
    valid: dict[str, str] = field(default_factory=dict)
    """Named validation sets, {name: a prepared data directory (its valid/ split)}, each
    logged as its own loss, perplexity and bits per byte. Empty: the valid/ split of every
    data.path source, under the source's name."""
    seed: int | None = None
    """Seeds the sample order and the blend; None uses run.seed."""
    skip: list[list[int]] = field(default_factory=list)
    """[[position, samples], ...]: when the global sample position reaches `position` (at a
    step boundary), jump `samples` ahead: batches to leave out, e.g. those around a loss
    spike (the spike guard does this by itself; this is the manual form)."""

    def valid_sets(self) -> dict[str, str]:
        """data.valid, or one set per data.path source, under its name."""
        if self.valid:
            return dict(self.valid)
        return {name: path for name, path, _ in self.named_sources()}

    def sources(self) -> list[tuple[str, float]]:
        """data.path as a list of (directory, weight)."""
        return [(path, weight) for _, path, weight in self.named_sources()]

    def named_sources(self) -> list[tuple[str, str, float]]:
        """data.path as a list of (name, directory, weight); a name defaults to the
        directory's, made unique with the source's number."""
        items = [{"path": self.path}] if isinstance(self.path, str) else self.path
        out, names = [], set()
        for i, item in enumerate(items):
            name = item.get("name") or Path(item["path"]).name or item["path"]
            name = f"{name}-{i}" if name in names else name
            names.add(name)
            out.append((name, item["path"], float(item.get("weight", 1.0))))
        return out

    def problems(self, cfg: Config) -> Problems:
        if not self.path:
            yield "data.path", "must name a prepared data directory (launch/prepare_data.py)"
            return
        for i, item in enumerate(self.path if isinstance(self.path, list) else []):
            if set(item) - {"path", "weight", "name"} or "path" not in item:
                yield f"data.path[{i}]", f"must be {{path: DIR, weight: W, name: N (optional)}}, got {item!r}"
                return
        names = [name for name, _, _ in self.named_sources()]
        if len(set(names)) != len(names):
            yield "data.path", f"source names must differ, got {names}"
        if self.stages and len(names) < 2:
            yield "data.stages", "need a blend of two or more sources in data.path"
            return
        for i, stage in enumerate(self.stages):
            if set(stage) != {"tokens", "weights"} or not isinstance(stage["weights"], dict):
                yield f"data.stages[{i}]", f"must be {{tokens: T, weights: {{name: W, ...}}}}, got {stage!r}"
                return
            unknown = set(stage["weights"]) - set(names)
            if unknown:
                yield (
                    f"data.stages[{i}].weights",
                    (f"names unknown source(s) {sorted(unknown)}; the sources are {names} (data.path)"),
                )
                return
        from megatrain.schedule.mixture import MixtureSchedule  # the schedule checks its own keyframes

        try:
            MixtureSchedule.from_config(cfg)
        except (ValueError, TypeError) as e:
            yield "data.stages" if self.stages else "data.path", f"is not a valid mixture: {e}"
        if not all(len(x) == 2 and min(x) >= 0 for x in self.skip):
            yield (
                "data.skip",
                f"must be [[position, samples], ...] with non-negative numbers, got {self.skip!r}",
            )


@dataclass
class TrainConfig:
    seq_len: int = 2048
    """Tokens per sample (the model's context length)."""
    micro_batch: int = 1
    """Samples per rank per forward/backward."""
    max_steps: int | None = None
    """Stop after this many optimizer steps (None: no limit). At least one of max_steps and
    max_tokens is needed."""
    max_tokens: int | None = None
    """Stop once this many tokens were consumed (None: no limit)."""
    precision: Literal["bf16", "bf16-autocast", "fp16", "fp32"] = "bf16"
    """bf16: the model in bf16, fp32 master weights in the optimizer (DeepSpeed's bf16 mode,
    as Megatron-LM); bf16-autocast: fp32 weights, matmuls in bf16 through torch.autocast
    (DeepSpeed's torch_autocast); fp16: with dynamic loss scaling, GPU only; fp32."""
    eval_every: int = 100
    """Optimizer steps between validation passes (0: only at the end)."""
    eval_samples: int = 64
    """Validation samples per pass (the same samples every time), split across ranks."""
    log_every: int = 1
    """Optimizer steps between console updates (metrics.jsonl gets every step)."""
    peak_flops: float | None = None
    """Peak FLOP/s of one device for MFU; None: the GPU's data sheet (a CPU: a matmul timed at start)."""
    grad_accum_dtype: Literal["fp32", "bf16"] = "fp32"
    """bf16: the dtype micro-batch gradients are summed in and reduced across ranks (as
    Megatron-LM, fp32). Under ZeRO-1 and ZeRO-2 (DeepSpeed's BF16_Optimizer under ZeRO-1);
    DeepSpeed 0.19.8 has no fp32 path without ZeRO, so ZeRO-0 sums in bf16 (the start line
    says so). At 16 micro-batches bf16 sums add ~0.5% relative error to the gradient
    (bench/grad_accum.py); fp32 doubles the bytes of the gradient reduction."""
    tf32: bool = False
    """On GPUs, run fp32 matmuls (train.precision fp32, and what bf16-autocast leaves in fp32)
    on the tensor cores in TF32 (a 10-bit mantissa; 7x the fp32 peak on an H100); the MFU
    peak is then the TF32 one. Off: full fp32, PyTorch's default."""

    def problems(self, cfg: Config) -> Problems:
        yield from _at_least(self, "train", seq_len=1, micro_batch=1, eval_every=0, eval_samples=0)
        if self.max_steps is None and self.max_tokens is None:
            yield "train.max_steps", "or train.max_tokens must be set (otherwise the run never ends)"


@dataclass
class OptimConfig:
    name: Literal["fused_adamw", "torch_adamw", "adamw"] = "fused_adamw"
    """fused_adamw: megatrain's fused AdamW + global-norm clip kernel (csrc/); torch_adamw:
    torch.optim.AdamW(fused=True); adamw: DeepSpeed's stock FusedAdam (its CPU kernel recomputes beta^t
    differently after a resume, so resumed losses can differ in the last bits). The last
    two clip through DeepSpeed."""
    lr: float = 6.0e-4
    """Peak learning rate."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    """AdamW betas (GPT-3: 0.9, 0.95)."""
    eps: float = 1.0e-8
    """AdamW epsilon."""
    weight_decay: float = 0.1
    """Decoupled weight decay; not applied to biases, norms or embeddings."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0: no clipping)."""
    init_from_state: bool = False
    """With model.init_from a megatrain checkpoint: also take its AdamW moments and step count."""
    z_loss: float = 0.0
    """Coefficient of the auxiliary loss z_loss * mean(log(Z)^2), Z the output softmax's
    normaliser (PaLM: 1e-4; OLMo 2 uses it against spikes); logged as `z_loss`. 0: off."""

    def problems(self, cfg: Config) -> Problems:
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            yield "optim.betas", f"must be two numbers in [0, 1), got {self.betas}"
        yield from _at_least(self, "optim", lr=0, grad_clip=0, z_loss=0)


@dataclass
class ScheduleConfig:
    """Learning rate and global batch as functions of tokens consumed (GPT-3 appendix B)."""

    warmup_tokens: int = 375_000_000
    """Linear warmup from 0 to optim.lr over this many tokens (GPT-3: 375M)."""
    decay_tokens: int = 260_000_000_000
    """The learning rate reaches min_lr_ratio x optim.lr here and stays there (GPT-3: 260B)."""
    min_lr_ratio: float = 0.1
    """Floor of the decay, as a fraction of the peak (GPT-3: 10%)."""
    lr_shape: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay shape between warmup and decay_tokens; constant keeps the peak after warmup."""
    decay: Literal["cosine", "wsd"] = "cosine"
    """cosine: GPT-3's decay from the warmup's end to decay_tokens, in lr_shape's shape;
    wsd: warmup-stable-decay, the peak held until a cooldown that ends at decay_tokens."""
    cooldown_tokens: int | None = None
    """decay: wsd: the cooldown's length in tokens (default: cooldown_fraction x decay_tokens)."""
    cooldown_fraction: float = 0.2
    """decay: wsd: the cooldown's length as a fraction of decay_tokens, when cooldown_tokens
    is not given (Hagele et al. 2024: 20%)."""
    cooldown_shape: Literal["linear", "1-sqrt"] = "linear"
    """decay: wsd: the cooldown falls linearly, or as 1 - sqrt(progress) (Hagele et al.)."""
    batch_final_tokens: int = 524288
    """The global batch in tokens (GPT-3 Table 2.1), rounded down to a whole number of
    micro_batch x seq_len x data-parallel ranks, never below one micro batch per rank."""
    batch_start_tokens: int = 32768
    """Global batch at the start of the ramp (GPT-3: 32K tokens)."""
    batch_ramp_tokens: int = 0
    """The batch grows linearly from batch_start_tokens to batch_final_tokens over this many
    tokens (GPT-3: 4-12B by model size); 0: no ramp."""
    batch_steps: list[list[int]] | None = None
    """Instead of the ramp, [[tokens, batch_tokens], ...] starting at 0 tokens: from each token
    count on, that global batch (Megatron's step schedule)."""
    init_from: Literal["reset", "keep"] = "reset"
    """With model.init_from: reset counts steps and tokens from 0 (the LR warms up again over
    warmup_tokens and decays to decay_tokens counted from the new start; the batch ramps
    again); keep continues from a megatrain checkpoint's step and tokens."""

    def cooldown_length(self) -> int:
        """decay: wsd: the cooldown's tokens."""
        if self.cooldown_tokens is not None:
            return self.cooldown_tokens
        return round(self.cooldown_fraction * self.decay_tokens)

    def problems(self, cfg: Config) -> Problems:
        yield from _at_least(
            self, "schedule", batch_final_tokens=1, batch_start_tokens=1, batch_ramp_tokens=0
        )
        if self.batch_ramp_tokens and self.batch_start_tokens > self.batch_final_tokens:
            yield (
                "schedule.batch_start_tokens",
                (
                    f"({self.batch_start_tokens}) must not exceed "
                    f"schedule.batch_final_tokens ({self.batch_final_tokens})"
                ),
            )
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            yield "schedule.min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}"
        if not 0.0 < self.cooldown_fraction <= 1.0:
            yield "schedule.cooldown_fraction", f"must be in (0, 1], got {self.cooldown_fraction}"
        if self.decay == "wsd" and self.lr_shape != "cosine":
            yield (
                "schedule.lr_shape",
                "applies to decay: cosine; a wsd cooldown's shape is schedule.cooldown_shape",
            )
        from megatrain.schedule import BatchSchedule, LRSchedule  # the schedules check their own parameters

        for key, build in (
            ("schedule", lambda: LRSchedule.from_config(cfg)),
            ("schedule.batch_steps", lambda: BatchSchedule.from_config(cfg, dp_size=1)),
        ):
            try:
                build()
            except ValueError as e:
                yield f"{key}:", str(e)


@dataclass
class ParallelConfig:
    zero_stage: int = 0
    """DeepSpeed ZeRO stage: 0 (plain data parallel), 1 (optimizer states sharded),
    2 (+ gradients), 3 (+ parameters). With a pipeline, 0 or 1."""
    pipeline_stages: int = 1
    """Pipeline stages P (1: no pipeline). The world is P stages x world/P data-parallel ranks."""
    tensor_parallel: int = 1
    """Tensor-parallel size T (1: none): each block's attention heads and MLP columns split over
    T consecutive ranks by DeepSpeed's AutoTP, the vocabulary by rows; the world is P pipeline
    stages x T x world/(P T) data-parallel ranks."""
    sequence_parallel: bool = False
    """With tensor parallelism: the norms, dropouts and residual adds between the tensor-parallel
    regions run on 1/T of the sequence per tensor rank (Megatron's sequence parallelism: an
    all-gather before each column-parallel linear, a reduce-scatter after each row-parallel
    one, in place of the all-reduces), cutting those activations by T (docs/parallelism.md)."""
    expert_parallel: int = 1
    """MoE (model.moe): ranks that compute each block's experts together, each a slice of
    them, tokens sent to their experts' ranks by all-to-all; under ZeRO 0-2 each rank keeps
    only its slice, its optimizer state shared with the ranks keeping the same one
    (docs/moe.md); must divide the data-parallel ranks and model.moe.experts. 1: every rank
    computes and keeps every expert."""
    partition_method: Literal["parameters", "uniform", "blocks"] = "parameters"
    """How layers are cut into stages: balanced by parameter count, by layer count, or by
    transformer blocks only."""
    activation_checkpoint_interval: int = 0
    """With a pipeline: recompute activations every this many layers in the backward pass
    (0: none; model.activation_checkpointing sets 1)."""

    def shape_problems(self, cfg: Config) -> Problems:
        """The tensor-parallel size against the model's heads and MLP width."""
        tp = self.tensor_parallel
        if tp > 1 and cfg.model.n_head % tp:
            yield (
                f"parallel.tensor_parallel={tp}",
                f"must divide model.n_head ({cfg.model.n_head}): heads are split",
            )
        elif tp > 1 and cfg.model.n_kv_head and cfg.model.n_kv_head % tp:
            yield (
                f"parallel.tensor_parallel={tp}",
                (f"must divide model.n_kv_head ({cfg.model.n_kv_head}): key/value heads are split too"),
            )
        if tp > 1 and cfg.model.ffn_hidden and cfg.model.ffn_hidden % tp:
            yield f"parallel.tensor_parallel={tp}", f"must divide model.ffn_hidden ({cfg.model.ffn_hidden})"
        if tp > 1 and cfg.model.vocab_size and cfg.model.vocab_size % tp:
            yield (
                f"parallel.tensor_parallel={tp}",
                f"must divide model.vocab_size ({cfg.model.vocab_size}): the vocabulary is split too",
            )

    def problems(self, cfg: Config) -> Problems:
        if self.zero_stage not in (0, 1, 2, 3):
            yield "parallel.zero_stage", f"must be 0, 1, 2 or 3, got {self.zero_stage}"
        yield from _at_least(
            self,
            "parallel",
            pipeline_stages=1,
            tensor_parallel=1,
            expert_parallel=1,
            activation_checkpoint_interval=0,
        )
        ep, experts = self.expert_parallel, cfg.model.moe.experts
        if ep > 1 and (not experts or experts % ep):
            yield (
                f"parallel.expert_parallel={ep}",
                f"must divide model.moe.experts ({experts}): each rank computes a whole share of them",
            )
        if ep > 1 and self.zero_stage < 3:  # each rank's experts: megatrain's own optimizer (docs/moe.md)
            if cfg.optim.name != "fused_adamw":
                yield (
                    f"parallel.expert_parallel={ep}",
                    f"needs optim.name=fused_adamw under ZeRO 0-2, not {cfg.optim.name}: each rank's experts "
                    "are stepped by megatrain's AdamW beside DeepSpeed's, clipped by one global norm "
                    "(ZeRO-3 takes any optimizer: it partitions the experts as every weight)",
                )
            if cfg.train.precision == "fp16":
                yield (
                    f"parallel.expert_parallel={ep}",
                    "cannot be combined with train.precision=fp16 under ZeRO 0-2: each rank's experts are "
                    "stepped outside DeepSpeed, whose loss scaler would not see their gradients; use bf16",
                )
        tp = self.tensor_parallel
        if self.sequence_parallel and tp == 1:
            yield (
                "parallel.sequence_parallel",
                "needs parallel.tensor_parallel > 1 (it splits the sequence over the tensor ranks)",
            )
        if self.sequence_parallel and tp > 1 and cfg.train.seq_len % tp:
            yield (
                "parallel.sequence_parallel",
                f"needs train.seq_len ({cfg.train.seq_len}) divisible by parallel.tensor_parallel={tp}",
            )
        if self.sequence_parallel and cfg.model.dropout > 0:
            yield (
                "parallel.sequence_parallel",
                f"cannot be combined with model.dropout={cfg.model.dropout} yet (the tensor ranks share "
                "their generators, so their slices of the sequence would draw the same masks)",
            )
        if tp > 1 and self.zero_stage == 3:
            yield (
                f"parallel.tensor_parallel={tp}",
                (
                    "cannot be combined with parallel.zero_stage=3: DeepSpeed's AutoTP training supports "
                    "ZeRO 0-2 (under "
                    "ZeRO-3 it partitions the whole model before AutoTP shards it, and its checkpoints' "
                    "parameter shapes "
                    "then do not match their partitions); use parallel.zero_stage=2 or 1"
                ),
            )
        if not cfg.model.init_from:  # else checked once the source has given the shape (init_from.py)
            yield from self.shape_problems(cfg)
        if self.pipeline_stages > 1 and self.zero_stage > 1:
            yield (
                f"parallel.zero_stage={self.zero_stage}",
                (
                    f"cannot be combined with parallel.pipeline_stages={self.pipeline_stages}: DeepSpeed's "
                    "pipeline "
                    "engine supports ZeRO-1 at most (it would partition gradients the pipeline schedule "
                    "still needs); "
                    "use parallel.zero_stage=1"
                ),
            )


@dataclass
class CheckpointConfig:
    every_steps: int = 1000
    """Optimizer steps between checkpoints (0: only at the end)."""
    keep: int = 3
    """Complete checkpoints kept; older ones are deleted once a newer one is published."""
    async_save: bool = False
    """Write the checkpoints of `every_steps` in the background: the step loop waits only while
    each rank copies its state into host memory (within spike.snapshot_memory_gb's budget, else
    written synchronously), and the checkpoint is published once every rank has written it."""
    stop_wait_s: float = 120.0
    """On SIGTERM/SIGINT, seconds to wait for a background write in flight before abandoning it
    (`latest` keeps naming the previous checkpoint) and writing the final one."""

    def problems(self, cfg: Config) -> Problems:
        yield from _at_least(self, "checkpoint", keep=1, every_steps=0, stop_wait_s=0)


@dataclass
class SpikeConfig:
    """The spike guard: rolls the run back and skips data when the loss spikes (PaLM 5.1)."""

    enabled: bool = True
    """Watch for spikes and recover from them."""
    watch: list[str] = field(default_factory=lambda: ["loss"])
    """Signals compared with their recent history: "loss" and/or "grad_norm". The gradient norm
    jumps early in training while the loss falls smoothly, so it is not watched by default. A
    non-finite loss or norm is always a spike, watched or not."""
    stats: Literal["median_mad", "mean_std"] = "median_mad"
    """Baseline and spread: median and MAD (robust to the spikes themselves), or mean and std."""
    window: int = 100
    """Steps of history the baseline is taken over."""
    min_history: int = 20
    """Steps of history needed before a value is judged (non-finite values always are)."""
    threshold: float = 6.0
    """A value is above the baseline when it exceeds it by this many spreads (MADs are scaled
    by 1.4826 to compare with standard deviations)."""
    patience: int = 1
    """Consecutive steps above the threshold that make a spike; the spike began at the first."""
    skip: int = 200
    """Data skipped after a rollback, counted from the rollback point, in `skip_unit`s; always
    at least up to the end of the spike (PaLM skipped 200-500 batches)."""
    skip_unit: Literal["batches", "tokens"] = "batches"
    """batches: global batches at the batch size of the spike; tokens: tokens."""
    max_rollbacks: int = 5
    """Rollbacks allowed in a run; one more spike stops it (with a checkpoint, exit code 3)."""
    snapshot_every: int = 50
    """Optimizer steps between in-memory rollback points (model, optimizer, schedule, sampler)."""
    snapshots: int = 3
    """Rollback points kept in host memory (0: roll back to disk checkpoints only)."""
    snapshot_memory_gb: float | None = None
    """Host memory per rank for rollback points, in GiB; None: a quarter of the node's RAM
    shared by its ranks. Fewer points are kept when fewer fit (none: rollbacks use disk
    checkpoints); the start line says how many and their size."""

    def problems(self, cfg: Config) -> Problems:
        if not self.watch or not set(self.watch) <= {"loss", "grad_norm"}:
            yield "spike.watch", f"must list 'loss' and/or 'grad_norm', got {self.watch}"
        yield from _at_least(
            self, "spike", window=2, patience=1, skip=0, max_rollbacks=0, snapshot_every=1, snapshots=0
        )
        if not 1 <= self.min_history <= self.window:
            yield (
                "spike.min_history",
                f"must be between 1 and spike.window ({self.window}), got {self.min_history}",
            )
        if self.threshold <= 0:
            yield "spike.threshold", f"must be > 0, got {self.threshold}"


@dataclass
class LoggingConfig:
    wandb: bool = False
    """Log to Weights & Biases (rank 0 only), offline unless WANDB_MODE says otherwise."""
    wandb_project: str = "megatrain"
    """wandb project name."""
    progress: bool = True
    """A progress bar on rank 0's console."""
    moe_load_every: int = 100
    """MoE: every this many steps, each expert's share of the routed tokens per MoE block
    (`moe_load` in metrics.jsonl, histograms in wandb); min and max are in every row."""

    straggler_every: int = 100
    """Steps between gathering every rank's time in data loading, forward, backward and the
    optimizer step (in the loop's one collective); 0: never."""
    straggler_factor: float = 1.5
    """A rank whose data loading and forward pass take longer than this times the ranks' median
    is named as a straggler (console and events.jsonl)."""

    def problems(self, cfg: Config) -> Problems:
        yield from _at_least(self, "logging", moe_load_every=1, straggler_every=0, straggler_factor=1.0)


@dataclass
class PlanConfig:
    check: bool = True
    """Refuse to start when the planner (megatrain/plan.py) predicts that this layout does not
    fit the device's memory (false: start anyway)."""


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    spike: SpikeConfig = field(default_factory=SpikeConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
    deepspeed: dict = field(default_factory=dict)
    """Raw DeepSpeed JSON merged on top of the generated config, for experts."""
    explicit_keys: ClassVar[frozenset[str]] = frozenset()
    """(Not a key.) The dotted keys the file or --set gave, as load_config read them."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def problems(self) -> Problems:
        """Every section's problems, in the order of the sections."""
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            if hasattr(section, "problems"):
                yield from section.problems(self)
