"""Plan before you launch: what one rank holds for a config on a layout, whether it fits a
device, how long the token budget takes; and a search over layouts (docs/planning.md).

    p = plan(cfg, model_cfg, Layout.from_config(cfg, gpus=64), device_memory=80e9, peak_flops=989e12)
    p["fits"], p["per_rank_bytes"]["total"], p["train_days"]
    best = search(cfg, model_cfg, gpus=64, gpus_per_node=8, device_memory=80e9, peak_flops=989e12)[0]

Per rank, for the rank that holds the embeddings (the first pipeline stage, or any rank):
  params      the weights in the training dtype (ZeRO-3: a 1/D share)
  grads       the larger of the two moments of a step, as DeepSpeed 0.19 allocates them (each
              checked against a live engine by tests/e2e/test_plan_memory.py): ZeRO-0 the
              gradients, plus an fp32 copy with bf16/fp16; ZeRO-1/2 the 16-bit gradients
              (ZeRO-2: a 1/D share) during the backward pass, or at the step the fp32
              gradients of the partition that replace them (ZeRO-2 in bf16 sums them in an
              fp32 partition of that size); ZeRO-1 in bf16 with fp32 accumulation
              (DeepSpeed's BF16_Optimizer) whole fp32 gradients beside the bf16 ones; ZeRO-3
              the 16-bit share plus the fp32 one, made one sub-group (sub_group_size, 1e9
              elements) at a time
  optimizer   AdamW's two fp32 moments and the fp32 master weights where they are a copy
              (bf16, or any ZeRO stage), a 1/D share under ZeRO 1-3
  activations per micro-batch and layer s*b*h*(10 + 24/T) in 2-byte units, with sequence
              parallelism s*b*h*34/T (Korthikanti et al. 2022, without the s^2
              attention scores, which SDPA does not keep; the
              MLP's 16 of the 24 scale with its width, and SwiGLU's gate|up and product
              keep twice a GELU MLP's per hidden unit: 8 + 8f/h for width f), twice
              that in fp32; with activation checkpointing only each block's input plus one
              block's working set; P micro-batches in flight on a pipeline's first stage
              (1F1B); the logits in the training dtype and in fp32 for the cross-entropy and
              its gradient, s*b*V/T*(w + 8) bytes (the tensor ranks split the vocabulary)
  buffers     DeepSpeed's gradient reduce bucket (reduce_bucket_size, 5e8 elements, in the dtype
              gradients are reduced in: fp32 with bf16's fp32 accumulation; ZeRO 1-3
              allocate it whole, which on a GPU counts whatever the model's size, while
              on a CPU only the pages written do; ZeRO-0 flattens at most the model's
              gradients); ZeRO-3's prefetch bucket and the parameters it may keep
              gathered (stage3_max_live_parameters, 1e9). ZeRO-1/2's all-gather writes
              into the 16-bit weights themselves: no buffer.
  allowance   10% of the above for the allocator's fragmentation, plus 1 GiB for the CUDA
              context on GPUs (on DeepSpeed's CPU accelerator 160 MiB of process overhead
              instead, measured by bench/plan.py)
Time: the model FLOPs per token (6N + attention; recomputation added with activation
checkpointing) at an assumed MFU of the device's peak, stretched by the 1F1B bubble
(P-1)/(m+P-1) for m micro-batches per pipeline, plus communication as ring collectives
(2(n-1)/n x bytes / bandwidth), not overlapped with compute (an upper bound): tensor
parallelism's four all-reduces of s*b*h activations per block and micro-batch and the split
vocabulary's two (within a node; sequence parallelism's all-gathers and reduce-scatters move
the same bytes), the data-parallel gradient reduction once per step
(ZeRO-3: the parameters gathered twice and the gradients reduced per micro-batch), over the
node's links when the group fits in a node, else the network; over the batch ramp and then
the full batch up to the config's token budget. These are estimates: what they leave out is
listed in docs/planning.md, and nothing here has been compared with a GPU's measured memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from megatrain.config import Config
from megatrain.config.deepspeed import bf16_optimizer, fp32_accumulation
from megatrain.layout import Layout
from megatrain.model import GPTConfig, flops_per_token, param_count, recompute_flops_per_token
from megatrain.model.gpt import blocks_params, expert_weights

ALLOCATOR_SHARE = 0.10
CUDA_CONTEXT_BYTES = 1 << 30
# On DeepSpeed's CPU accelerator, what a training process holds besides its training state:
# DeepSpeed's shared-memory collective buffer (69 MB) and engine, torch's CPU allocator
# cache, pages of the memory-mapped shards. Measured by bench/plan.py (docs/results.md).
CPU_PROCESS_BYTES = 160 << 20
DEFAULT_BUCKET = 5e8  # DeepSpeed's reduce_bucket_size (elements)
DEFAULT_PREFETCH = 5e7  # DeepSpeed's stage3_prefetch_bucket_size (elements)
DEFAULT_LIVE = 1e9  # DeepSpeed's stage3_max_live_parameters (elements)
DEFAULT_SUB_GROUP = 1e9  # DeepSpeed's sub_group_size (elements)
RAMP_SEGMENTS = 4


def per_rank_bytes(cfg: Config, m: GPTConfig, lay: Layout, on_gpu: bool = True) -> dict[str, float]:
    """The memory breakdown of the rank holding the embeddings (module docstring)."""
    h, L, V, s, b = m.d_model, m.n_layer, m.vocab_size, m.seq_len, lay.micro_batch
    T, P, D, Z = lay.tensor_parallel, lay.pipeline_stages, lay.data_parallel, lay.zero_stage
    w = 2 if cfg.train.precision in ("bf16", "fp16") else 4
    # Experts split over E ranks (ZeRO 0-2) are megatrain's, not DeepSpeed's: 1/E of them in
    # the training dtype with fp32 gradients, and a 1/R share of their fp32 masters (16-bit
    # weights), moments and reduced gradients among the R = D/E ranks keeping the same ones
    # (train/expert_shards.py); the rest is the dense model's, as DeepSpeed keeps it.
    experts = _expert_params(m) if lay.experts_split else 0
    params = _params_per_rank(m, T, P) - experts
    mine, replicas = experts / lay.expert_parallel, D // lay.expert_parallel
    mixed = w == 2
    weights = params * w / (D if Z == 3 else 1)
    zero = cfg.deepspeed.get("zero_optimization", {})
    if Z == 0:  # DeepSpeed's bf16/fp16 optimizer keeps an fp32 copy of every gradient
        grads = params * w + (params * 4 if mixed else 0)
    elif bf16_optimizer(
        cfg.train, Z
    ):  # DeepSpeed's BF16_Optimizer: whole fp32 gradients beside the bf16 ones
        grads = params * (w + 4)
    elif Z < 3:  # the 16-bit gradients (ZeRO-2: a share) until the step turns them into fp32 ones
        grads = max(params * w / (D if Z == 2 else 1), params * 4 / D)
    else:  # the 16-bit share stays; the fp32 one exists one sub-group at a time
        grads = params * w / D + 4 * min(params / D, zero.get("sub_group_size", DEFAULT_SUB_GROUP))
    optimizer = params * (8 + (4 if mixed or Z >= 1 else 0)) / (D if Z >= 1 else 1)

    act_w = 2 if mixed else 4
    # Split by tensor parallelism: q, k, v and attention's output (8), the MLP's hidden
    # activations (4 x width/h: GELU's input and output, or SwiGLU's gate|up, product); an
    # MoE block's are those of the experts a token uses, plus its dispatched rows (2 per
    # expert it goes to: sent and returned), averaged over the blocks.
    # The rest (norms' inputs, residuals, dropout masks) is split too with sequence parallelism.
    width, dispatch = _mlp_width(m)
    rest = (10 + dispatch) / (T if lay.sequence_parallel else 1)
    per_layer = s * b * h * (rest + (8 + 4 * (2 if m.gated else 1) * width / h) / T) * act_w / 2
    block_input = s * b * h * act_w / (T if lay.sequence_parallel else 1)
    stored = block_input if lay.activation_checkpointing else per_layer
    layers = math.ceil(L / P)
    micro_batches = _micro_batches(cfg, lay, cfg.schedule.batch_final_tokens)
    in_flight = min(P, micro_batches)
    logits = s * b * V / T * (w + 8)  # this rank's slice of the vocabulary
    working = per_layer if lay.activation_checkpointing else 0
    first_stage = in_flight * layers * stored + working + (logits if P == 1 else 0)
    last_stage = layers * stored + working + logits
    activations = max(first_stage, last_stage)

    bucket = zero.get("reduce_bucket_size", DEFAULT_BUCKET)
    reduced_w = 4 if fp32_accumulation(cfg.train, Z) else w  # the bucket holds what is reduced
    buffers = (bucket if on_gpu and Z >= 1 else min(bucket, params)) * reduced_w
    if Z == 3:  # the prefetch bucket and the parameters gathered at once
        prefetch = min(zero.get("stage3_prefetch_bucket_size", DEFAULT_PREFETCH), params)
        live = min(zero.get("stage3_max_live_parameters", DEFAULT_LIVE), params)
        buffers += (prefetch + live) * w
    out = {
        "params": weights + mine * w,
        "grads": grads + mine * 4 * (1 + (1 / replicas if replicas > 1 else 0)),
        "optimizer": optimizer + mine * (8 + (4 if mixed else 0)) / replicas,
        "activations": activations,
        "buffers": buffers,
    }
    out["allowance"] = ALLOCATOR_SHARE * sum(out.values())
    out["total"] = sum(out.values())
    return out


def _params_per_rank(m: GPTConfig, T: int, P: int) -> float:
    """The parameters of the rank holding the embeddings: its share of the blocks (split by
    tensor parallelism and pipeline stages), of the token embedding and untied output head
    (split by vocabulary rows over the tensor ranks), and the rest (positions, final norm) whole."""
    blocks = blocks_params(m)
    vocab = m.vocab_size * m.d_model * (1 if m.tie_embeddings else 2)
    return blocks / (T * P) + vocab / T + param_count(m) - blocks - vocab


def _expert_params(m: GPTConfig) -> float:
    """The routed experts' weights, every MoE block's."""
    return len(m.moe_blocks) * m.moe_experts * expert_weights(m)


def _mlp_width(m: GPTConfig) -> tuple[float, float]:
    """The MLP hidden width a token's activations have, and the MoE rows dispatched (in units
    of h), both averaged over the blocks."""
    moe = len(m.moe_blocks)
    routed = m.moe_top_k + m.moe_shared_experts
    width = ((m.n_layer - moe) * m.ffn_hidden + moe * routed * m.moe_ffn_hidden) / m.n_layer
    return width, 2 * m.moe_top_k * moe / m.n_layer


def _micro_batches(cfg: Config, lay: Layout, batch_tokens: float) -> int:
    """Micro-batches per data-parallel rank in a step of this batch (at least one)."""
    return max(1, int(batch_tokens) // (lay.micro_batch * cfg.train.seq_len * lay.data_parallel))


def token_budget(cfg: Config) -> float:
    t = cfg.train
    if t.max_tokens is not None:
        return float(t.max_tokens)
    return float(t.max_steps) * cfg.schedule.batch_final_tokens


@dataclass(frozen=True)
class Links:
    """All-reduce bandwidth per GPU in bytes/s: within a node (NVLink) and between nodes."""

    intra_node: float = 300e9
    inter_node: float = 25e9


def comm_time(
    cfg: Config, m: GPTConfig, lay: Layout, batch_tokens: float, gpus_per_node: int, links: Links
) -> float:
    """Seconds of communication in one step (module docstring)."""
    w = 2 if cfg.train.precision in ("bf16", "fp16") else 4
    T, P, D = lay.tensor_parallel, lay.pipeline_stages, lay.data_parallel
    micro_batches = _micro_batches(cfg, lay, batch_tokens)

    def ring(n: int, nbytes: float, bandwidth: float) -> float:
        return 2 * (n - 1) / n * nbytes / bandwidth if n > 1 else 0.0

    activation = m.seq_len * lay.micro_batch * m.d_model * w
    # Two all-reduces per block forward and two backward, and the vocabulary's two: the
    # embedding's lookups forward, the output layer's input gradient backward.
    tp = (4 * math.ceil(m.n_layer / P) + 2) * micro_batches * ring(T, activation, links.intra_node)
    dp_link = links.intra_node if lay.world <= gpus_per_node else links.inter_node
    experts = _expert_params(m) if lay.experts_split else 0
    shard = (_params_per_rank(m, T, P) - experts) * w
    dp = 1.5 * micro_batches * ring(D, shard, dp_link) if lay.zero_stage == 3 else ring(D, shard, dp_link)
    # Split experts: fp32 gradients reduce-scattered and weights all-gathered over the D/E ranks
    # keeping the same ones (together an all-reduce's bytes).
    dp += ring(D // lay.expert_parallel, experts / lay.expert_parallel * 4, dp_link)
    # Between stages each micro-batch's activation forward and its gradient backward; the T
    # ranks of a stage each send 1/T of it (DeepSpeed's pipe_partitioned) and all-gather it
    # on arrival, within the node (with sequence parallelism 1/T is all a rank has).
    gather = 0.0 if lay.sequence_parallel else ring(T, activation, links.intra_node) / 2
    pipe = 2 * (P - 1) * micro_batches * (activation / T / links.inter_node + gather) if P > 1 else 0.0
    # MoE: per block and micro-batch four all-to-alls (out and back, forward and backward) of
    # each token's top_k rows, of which (E-1)/E leave the rank.
    E = lay.expert_parallel
    ep_link = links.intra_node if E <= gpus_per_node else links.inter_node
    a2a = 4 * len(m.moe_blocks) * micro_batches * m.moe_top_k * activation * (E - 1) / E / ep_link
    return tp + dp + pipe + a2a


def plan(
    cfg: Config,
    m: GPTConfig,
    lay: Layout,
    device_memory: float,
    peak_flops: float,
    mfu: float = 0.4,
    gpus_per_node: int = 8,
    on_gpu: bool = True,
    links: Links = Links(),
) -> dict:
    """The planner's answer for one layout, as launch/plan.py --json writes it."""
    memory = per_rank_bytes(cfg, m, lay, on_gpu)
    fixed = CUDA_CONTEXT_BYTES if on_gpu else CPU_PROCESS_BYTES
    memory["allowance"] += fixed
    memory["total"] += fixed
    flops = flops_per_token(m) + (recompute_flops_per_token(m) if lay.activation_checkpointing else 0)
    world = lay.world

    def step_time(batch_tokens: float) -> float:
        P = lay.pipeline_stages
        bubble = (P - 1) / (_micro_batches(cfg, lay, batch_tokens) + P - 1)
        compute = batch_tokens * flops / (world * peak_flops * mfu) / (1 - bubble)
        return compute + comm_time(cfg, m, lay, batch_tokens, gpus_per_node, links)

    stages, budget, s = [], token_budget(cfg), cfg.schedule
    ramp = min(s.batch_ramp_tokens or 0, budget) if s.batch_start_tokens and s.batch_steps is None else 0
    edges = [ramp * i / RAMP_SEGMENTS for i in range(RAMP_SEGMENTS + 1)] if ramp else [0.0]
    for start, end in [*zip(edges, edges[1:], strict=False), (edges[-1], budget)]:
        if end <= start:
            continue
        batch = _batch_at(cfg, (start + end) / 2 if end <= ramp else end)
        seconds = (end - start) / batch * step_time(batch)
        stages.append(
            {
                "from_tokens": start,
                "to_tokens": end,
                "batch_tokens": batch,
                "step_time_s": step_time(batch),
                "days": seconds / 86400,
                "gpu_hours": seconds * world / 3600,
            }
        )
    final = cfg.schedule.batch_final_tokens
    snapshot = memory["params"] * (lay.data_parallel if lay.zero_stage == 3 else 1) + memory["optimizer"]
    rollback = cfg.spike.snapshots * snapshot if cfg.spike.enabled and lay.zero_stage != 3 else 0
    n = param_count(m)
    w = 2 if cfg.train.precision in ("bf16", "fp16") else 4
    masters = 4 if w == 2 or lay.zero_stage >= 1 else 0
    return {
        "fits": bool(memory["total"] <= device_memory),
        "layout": lay.as_dict(),
        "world": world,
        "per_rank_bytes": memory,
        "device_bytes": device_memory,
        "host_bytes_per_node": rollback * min(gpus_per_node, world),
        "checkpoint_bytes": n * (w + 8 + masters),
        "params": n,
        "active_params": param_count(m, active=True),
        "expert_params": _expert_params(m),
        "step_time_s": step_time(final),
        "tokens_per_s": final / step_time(final),
        "comm_time_s": comm_time(cfg, m, lay, final, gpus_per_node, links),
        "train_days": sum(x["days"] for x in stages),
        "gpu_hours": sum(x["gpu_hours"] for x in stages),
        "ramp_stages": stages,
        "assumed_mfu": mfu,
        "sets": lay.sets(),
    }


def _batch_at(cfg: Config, tokens: float) -> float:
    s = cfg.schedule
    if s.batch_steps is not None:
        return float(next(size for start, size in reversed(s.batch_steps) if tokens >= start))
    if not s.batch_ramp_tokens or s.batch_start_tokens is None or tokens >= s.batch_ramp_tokens:
        return float(s.batch_final_tokens)
    return s.batch_start_tokens + (s.batch_final_tokens - s.batch_start_tokens) * tokens / s.batch_ramp_tokens


def layouts(cfg: Config, m: GPTConfig, gpus: int, gpus_per_node: int):
    """Every layout megatrain can run: ZeRO 0-3, tensor parallel within a node (dividing the
    heads and the vocabulary; ZeRO 0-2) with and without sequence parallelism, pipeline stages
    dividing the layers (ZeRO 0-1), both, micro-batches 1-16, activation checkpointing on and
    off; the final batch must split. An
    MoE model: data parallel only, its experts split over every E dividing both the experts and
    the data-parallel ranks (1: every rank computes and keeps every expert)."""
    splits = [
        t for t in range(1, gpus_per_node + 1) if not (gpus_per_node % t or m.n_head % t or m.vocab_size % t)
    ]
    for T in splits:
        for P in (p for p in range(1, m.n_layer + 1) if m.n_layer % p == 0 and gpus % (T * p) == 0):
            if m.moe_experts and T * P > 1:
                continue
            D = gpus // (T * P)
            for Z in range(4):
                if (P > 1 and Z > 1) or (T > 1 and Z == 3):
                    continue
                for b in (1, 2, 4, 8, 16):
                    if cfg.schedule.batch_final_tokens % (b * m.seq_len * D):
                        continue
                    for ckpt in (False, True):
                        for sp in (
                            (False, True) if T > 1 and m.seq_len % T == 0 and not m.dropout else (False,)
                        ):
                            for E in _expert_parallel_sizes(m, D):
                                yield Layout(Z, T, P, D, b, ckpt, expert_parallel=E, sequence_parallel=sp)


def _expert_parallel_sizes(m: GPTConfig, data_parallel: int) -> list[int]:
    """Expert-parallel sizes a layout can take: dividing the experts and the data-parallel ranks."""
    sizes = range(1, (m.moe_experts or 1) + 1)
    return [e for e in sizes if m.moe_experts % e == 0 and data_parallel % e == 0] or [1]


def search(
    cfg: Config,
    m: GPTConfig,
    gpus: int,
    gpus_per_node: int,
    device_memory: float,
    peak_flops: float,
    mfu: float = 0.4,
    on_gpu: bool = True,
    links: Links = Links(),
) -> list[dict]:
    """Every layout that fits, fastest first (ties: less memory)."""
    plans = [
        plan(cfg, m, lay, device_memory, peak_flops, mfu, gpus_per_node, on_gpu, links)
        for lay in layouts(cfg, m, gpus, gpus_per_node)
    ]
    return sorted(
        (p for p in plans if p["fits"]), key=lambda p: (p["step_time_s"], p["per_rank_bytes"]["total"])
    )


def smallest_fitting_gpus(
    cfg: Config,
    m: GPTConfig,
    gpus_per_node: int,
    device_memory: float,
    peak_flops: float,
    limit: int = 1 << 16,
    **kw,
) -> int | None:
    """The fewest GPUs (whole nodes, doubling) on which some layout fits, or None up to `limit`."""
    gpus = gpus_per_node
    while gpus <= limit:
        if search(cfg, m, gpus, gpus_per_node, device_memory, peak_flops, **kw):
            return gpus
        gpus *= 2
    return None


def human(nbytes: float) -> str:
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**27 else f"{nbytes / 2**20:.1f} MiB"
