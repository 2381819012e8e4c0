"""Building the model at scale: parameters exist only where they are kept.

ZeRO-3 builds under `deepspeed.zero.Init`, so each parameter is partitioned as it is
created; ZeRO 0-2 and pipeline stages build on the meta device, then allocate their
parameters on the rank's device in the training dtype; with tensor parallelism the meta
model is first cut by AutoTP, and its vocabulary tables by rows (model/vocab_parallel.py),
so a rank allocates only its shards. No rank builds the
whole fp32 model on the host. Every parameter is then drawn from its own (seed, name)
generators, one per piece of gpt.INIT_PIECE elements (gpt.initial_value), so the initial
weights are the same numbers in every layout. Who draws what: under ZeRO-3 each rank the
pieces of its slice; under ZeRO 0-2 (tensor parallel or not) the ranks draw a parameter's
pieces in turn and sum them on the device (each element drawn by one rank, zeros
elsewhere: exact), and each keeps its shard, so a rank draws 1/world of the model (drawn
whole on every rank, 175B took about 20 minutes of one core per launch); a pipeline
stage draws its own parameters.
"""

from __future__ import annotations

import math
import zlib

import torch

from megatrain.config import Config
from megatrain.layout import Layout
from megatrain.model import GPT, GPTConfig, build_pipeline, canonical_name, sequence_parallel, tensor_parallel
from megatrain.model.gpt import INIT_PIECE, initial_value, initial_value_pieces, is_drawn
from megatrain.model.moe import MoE
from megatrain.model.vocab_parallel import VocabParallel
from megatrain.train import distributed as dist
from megatrain.train.ds_internals import (
    cut_for_tensor_parallel,
    finish_tensor_parallel,
    sequence_parallel_linears,
    tensor_parallel_group,
)
from megatrain.train.expert_shards import WEIGHTS
from megatrain.train.optimizer import is_tensor_parallel

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}  # otherwise fp32 (fp32, bf16-autocast)


def build_model(
    cfg: Config, model_cfg: GPTConfig, layout: Layout, ds_config: dict, device: torch.device
) -> torch.nn.Module:
    """Collective (every rank calls it); needs torch.distributed initialised. Under tensor
    parallelism the model is cut by AutoTP (tensor_parallel.autotp_config) and by rows; with
    sequence parallelism its split linears enter and leave on sequence slices, and the
    gradients of the parameters every tensor rank keeps whole are summed over the group
    (model/sequence_parallel.py)."""
    import deepspeed

    par = cfg.parallel
    if layout.partitioned_parameters:
        with deepspeed.zero.Init(config_dict_or_path=ds_config):
            model = GPT(model_cfg, init_weights=False)
        with torch.no_grad():
            for (
                name,
                param,
            ) in model.named_parameters():  # each rank draws and writes its own slice: no gather
                part = param.ds_tensor.view(-1)
                lo = layout.dp_rank * part.numel()  # this rank's elements of the flattened parameter
                for offset, values in initial_value_pieces(
                    name, param.ds_shape, model_cfg, lo, lo + part.numel()
                ):
                    a, b = max(lo, offset), min(lo + part.numel(), offset + values.numel())
                    if a < b:
                        part[a - lo : b - lo].copy_(values[a - offset : b - offset])
        return model
    with torch.device("meta"):
        if layout.pipeline:
            interval = par.activation_checkpoint_interval or int(model_cfg.activation_checkpointing)
            model = build_pipeline(
                model_cfg,
                par.pipeline_stages,
                par.partition_method,
                interval,
                init_weights=False,
                tensor_parallel=layout.tensor_parallel,
            )
        else:
            model = GPT(model_cfg, init_weights=False)
    whole_shapes = {name: p.shape for name, p in model.named_parameters()}
    # Expert parallelism under ZeRO 0-2: the routed experts leave the parameters, each rank
    # keeping its own (train/expert_shards.py).
    experts = _take_experts(model) if layout.experts_split else []
    autotp = None
    if layout.tensor_parallel > 1:
        autotp = cut_for_tensor_parallel(
            model, tensor_parallel.autotp_config(layout.tensor_parallel, model_cfg, layout.sequence_parallel)
        )
        rows = VocabParallel(
            tensor_parallel_group(),
            layout.tp_rank,
            layout.tensor_parallel,
            model_cfg.vocab_size,
            layout.sequence_parallel,
        )
        tensor_parallel.cut_vocabulary(model, rows)
    # to_empty makes new Parameter objects: keep the attributes DeepSpeed set on the old ones
    # (ds_pipe_replicated marks the later stage's copy of the tied embeddings; AutoTP's
    # shard records).
    attributes = {name: dict(vars(p)) for name, p in model.named_parameters()}
    model.to(DTYPES.get(cfg.train.precision, torch.float32)).to_empty(device=device)
    with torch.no_grad():
        for name, param in model.named_parameters():
            vars(param).update(attributes[name])
            shape = whole_shapes[name]
            if layout.pipeline:  # the stages hold different parameters: each draws its own
                name = canonical_name(name, model_cfg.n_layer)
                whole = initial_value(name, shape, model_cfg)
            else:
                whole = initial_value_drawn_in_turn(name, shape, model_cfg, device)
            param.copy_(tensor_parallel.shard(name, whole, layout.tp_rank, layout.tensor_parallel, model_cfg))
    for layer, key, name in experts:  # drawn whole in turn, as every parameter; each keeps its rows
        whole = initial_value_drawn_in_turn(name, whole_shapes[name], model_cfg, device)
        local = whole.shape[0] // layout.expert_parallel
        lo = layout.ep_rank * local
        setattr(layer.experts, key, whole[lo : lo + local].clone())  # ExpertShards takes them in
        layer.experts.offset = lo
    if autotp is not None:
        finish_tensor_parallel(model, autotp)
    if layout.sequence_parallel:
        sequence_parallel_linears(model, tensor_parallel_group())
        replicated = [p for p in model.parameters() if not is_tensor_parallel(p)]
        sequence_parallel.sum_gradients(replicated, tensor_parallel_group())
    return model


def _take_experts(model) -> list[tuple[MoE, str, str]]:
    """(layer, "fc" or "proj", parameter name) of every routed expert tensor, each removed from
    the module's parameters (the meta model's: nothing is allocated for them)."""
    taken = []
    for prefix, layer in model.named_modules():
        if isinstance(layer, MoE):
            for key in WEIGHTS:
                delattr(layer.experts, key)
                taken.append((layer, key, f"{prefix}.experts.{key}"))
    return taken


def initial_value_drawn_in_turn(
    name: str, shape, model_cfg: GPTConfig, device: torch.device, piece: int = INIT_PIECE
) -> torch.Tensor:
    """Collective (every rank, the same parameters in the same order): initial_value on
    `device`, its pieces drawn by the ranks in turn (starting from a rank the name picks, so
    that one-piece parameters spread too) and summed in one all-reduce."""
    world = dist.world_size()
    if world == 1 or not is_drawn(name, model_cfg):
        return initial_value(name, shape, model_cfg, piece=piece).to(device)
    first = zlib.crc32(name.encode()) % world
    mine = (dist.rank() - first) % world
    out = torch.zeros(math.prod(shape), dtype=torch.float32, device=device)
    for offset, values in initial_value_pieces(
        name, shape, model_cfg, piece=piece, wanted=lambda k: k % world == mine
    ):
        out[offset : offset + values.numel()].copy_(values)
    torch.distributed.all_reduce(out)
    return out.view(shape)
