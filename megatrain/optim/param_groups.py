"""Parameter groups for AdamW: weight decay on matmul weights only.

Biases, normalisation weights and embeddings get no weight decay (GPT-3, Megatron,
nanoGPT). Decided by the parameter's role, not its name: 1-D tensors (biases, norm
scales) and the weights of nn.Embedding modules. A ZeRO-3 parameter built under
deepspeed.zero.Init is an empty placeholder: its shape is `ds_shape`.
"""

from __future__ import annotations

import torch.nn as nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    embedding_params = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay, seen = [], [], set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        ndim = len(getattr(p, "ds_shape", p.shape))
        (no_decay if ndim < 2 or id(p) in embedding_params else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
