"""Building the model at scale: parameters exist only where they are kept.

ZeRO-3 builds under `deepspeed.zero.Init`, so each parameter is partitioned as it is
created; ZeRO 0-2 and pipeline stages build on the meta device, then allocate their
parameters on the rank's device in the training dtype. No rank builds the whole fp32
model on the host. Every parameter is then drawn from its own (seed, name) generator
(gpt.initial_value), one at a time on the host, so the initial weights are the same
numbers in every layout; under ZeRO-3 each rank draws a parameter in pieces and keeps
only its slice.
"""

from __future__ import annotations

import torch

from megatrain.config import Config
from megatrain.model import GPT, GPTConfig, build_pipeline, canonical_name
from megatrain.model.gpt import init_parameter, initial_value_pieces
from megatrain.train import distributed as dist

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}  # otherwise fp32 (fp32, bf16-autocast)


def build_model(cfg: Config, model_cfg: GPTConfig, ds_config: dict, device: torch.device) -> torch.nn.Module:
    """Collective under ZeRO-3 and with a pipeline; needs torch.distributed initialised."""
    import deepspeed

    par = cfg.parallel
    if par.zero_stage == 3:
        with deepspeed.zero.Init(config_dict_or_path=ds_config):
            model = GPT(model_cfg, init_weights=False)
        with torch.no_grad():
            for name, param in model.named_parameters():  # each rank writes its own slice: no gather
                part = param.ds_tensor.view(-1)
                lo = dist.rank() * part.numel()  # this rank's elements of the flattened parameter
                for offset, values in initial_value_pieces(name, param.ds_shape, model_cfg):
                    a, b = max(lo, offset), min(lo + part.numel(), offset + values.numel())
                    if a < b:
                        part[a - lo:b - lo].copy_(values[a - offset:b - offset])
        return model
    with torch.device("meta"):
        if par.pipeline_stages > 1:
            interval = par.activation_checkpoint_interval or int(model_cfg.activation_checkpointing)
            model = build_pipeline(model_cfg, par.pipeline_stages, par.partition_method, interval, init_weights=False)
        else:
            model = GPT(model_cfg, init_weights=False)
    # to_empty makes new Parameter objects: keep the attributes DeepSpeed set on the old ones
    # (ds_pipe_replicated marks the later stage's copy of the tied embeddings).
    attributes = {name: dict(vars(p)) for name, p in model.named_parameters()}
    model.to(DTYPES.get(cfg.train.precision, torch.float32)).to_empty(device=device)
    with torch.no_grad():
        for name, param in model.named_parameters():
            vars(param).update(attributes[name])
            init_parameter(canonical_name(name, model_cfg.n_layer) if par.pipeline_stages > 1 else name, param,
                           model_cfg)
    return model
