"""The GPT of gpt.py laid out as a DeepSpeed PipelineModule.

Layers, in order (the index is the layer number in checkpoints: layer_NN-model_states.pt):

    0          token embedding       TiedLayerSpec "wte" (VocabularyTable, an nn.Embedding)
    1          positions + dropout   gpt.Positions (a rotary model: dropout only)
    2..L+1     transformer blocks    gpt.Block
    L+2        final norm            gpt.norm_spec: nn.LayerNorm, or gpt.RMSNorm
    L+3        output projection     the same "wte" table, used as x @ wte.T (tied);
                                     untied, its own nn.Linear

Tied input and output embeddings are one TiedLayerSpec: the first and last stages each
hold a copy and DeepSpeed all-reduces its gradient between them (the copy on the
later stage is marked ds_pipe_replicated, so norms count it once). Parameters are
initialised through `canonical_name`, their name in the plain GPT, so a pipeline of
any partition starts from exactly the weights the one-process model starts from.

With tensor parallelism (`tensor_parallel` > 1) the pipeline is built on DeepSpeed's
3-axis topology (pipe, data, model: T consecutive ranks per tensor-parallel group, as
megatrain's Layout), the blocks are cut by AutoTP like the plain GPT's, and the vocabulary
tables by rows (`vocab_parallel` on the tables and the loss, set by the trainer's build):
each tensor rank of the first and last stage holds the same shard of the tied table, and
DeepSpeed's tied groups (one per tensor rank) sum its gradients between the two stages.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

from megatrain.model.gpt import Block, GPTConfig, LMLoss, Positions, init_parameter, norm_spec
from megatrain.model.vocab_parallel import lookup, project

PARTITION_METHODS = {"parameters": "parameters", "uniform": "uniform", "blocks": "type:Block"}


class VocabularyTable(nn.Embedding):
    """The token embedding, whose table also gives the logits when tied (`unembed`). Under
    tensor parallelism `vocab_parallel` (a VocabParallel) says which rows this rank holds, as
    gpt.Embedding's. An nn.Embedding, as the plain GPT's table: no weight decay."""

    vocab_parallel = None

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return lookup(self.vocab_parallel, idx, self.weight)

    def unembed(self, x: torch.Tensor) -> torch.Tensor:
        return project(self.vocab_parallel, x, self.weight)


class OutputHead(nn.Linear):
    """An untied output projection (an nn.Linear without bias, as the plain GPT's lm_head),
    its rows split like the table's under tensor parallelism."""

    vocab_parallel = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return project(self.vocab_parallel, x, self.weight)


def _unembed(table: VocabularyTable, x: torch.Tensor) -> torch.Tensor:
    return table.unembed(x)


def pipeline_layers(cfg: GPTConfig) -> list:
    from deepspeed.pipe import LayerSpec, TiedLayerSpec

    V, d = cfg.vocab_size, cfg.d_model
    if cfg.tie_embeddings:
        embedding = TiedLayerSpec("wte", VocabularyTable, V, d, tied_weight_attr="weight")
        output = TiedLayerSpec("wte", VocabularyTable, V, d, forward_fn=_unembed, tied_weight_attr="weight")
    else:
        embedding = LayerSpec(VocabularyTable, V, d)
        output = LayerSpec(OutputHead, d, V, bias=False)
    norm, args, kwargs = norm_spec(cfg, cfg.d_model)
    return [
        embedding,
        LayerSpec(Positions, cfg),
        *[LayerSpec(Block, cfg, i) for i in range(cfg.n_layer)],
        LayerSpec(norm, *args, **kwargs),
        output,
    ]


def canonical_name(name: str, n_layer: int) -> str:
    """A pipeline parameter's name in the plain GPT (gpt.py). `name` is as in
    PipelineModule.named_parameters() ("tied_modules.wte.weight", "5.attn.qkv.weight"),
    or "LAYER.param" for a layer_NN checkpoint file."""
    head, _, rest = name.partition(".")
    if head == "tied_modules":
        key, _, param = rest.partition(".")
        assert key == "wte", name
        return f"embed.wte.{param}"
    layer = int(head)
    if layer == 0:
        return f"embed.wte.{rest}"
    if layer == 1:
        return f"embed.positions.{rest}"
    if 2 <= layer < 2 + n_layer:
        return f"blocks.{layer - 2}.{rest}"
    if layer == 2 + n_layer:
        return f"head.ln_f.{rest}"
    if layer == 3 + n_layer:  # an untied output projection
        return f"head.lm_head.{rest}"
    raise ValueError(f"no GPT parameter for pipeline layer {layer} ({name})")


def build_pipeline(
    cfg: GPTConfig,
    num_stages: int,
    partition_method: str = "parameters",
    activation_checkpoint_interval: int = 0,
    init_weights: bool = True,
    tensor_parallel: int = 1,
):
    """The pipeline module (needs torch.distributed initialised: DeepSpeed builds only this
    rank's stage). It may be built on the meta device (`init_weights=False`): DeepSpeed's
    move to the rank's device then waits for the parameters to be allocated. With
    `tensor_parallel` > 1 its grid has a model axis of that size (the caller cuts it)."""
    from deepspeed.pipe import PipelineModule
    from deepspeed.runtime.pipe import ProcessTopology

    class GPTPipeline(PipelineModule):
        def to(self, *args, **kwargs):
            """On the meta device a move waits for the parameters to be allocated (DeepSpeed
            moves the stage while building it); a cast applies at once, so the stage is
            allocated in the training dtype (not in fp32 first)."""
            if any(p.is_meta for p in self.parameters()):
                _, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
                return super().to(dtype=dtype) if dtype is not None else self
            return super().to(*args, **kwargs)

    if partition_method not in PARTITION_METHODS:
        raise ValueError(
            f"partition method must be one of {sorted(PARTITION_METHODS)}, not {partition_method!r}"
        )
    dp = dist.get_world_size() // (num_stages * tensor_parallel)
    # DeepSpeed's PipeModelDataParallelTopology's axes, or without a model axis its
    # PipeDataParallelTopology's, whose layer files keep their names (layer_NN-model_states.pt;
    # with one, layer_NN-model_TT-model_states.pt per tensor rank).
    if tensor_parallel > 1:
        topology = ProcessTopology(axes=["pipe", "data", "model"], dims=[num_stages, dp, tensor_parallel])
    else:
        topology = ProcessTopology(axes=["pipe", "data"], dims=[num_stages, dp])
    module = GPTPipeline(
        layers=pipeline_layers(cfg),
        topology=topology,
        loss_fn=LMLoss(cfg.z_loss),
        partition_method=PARTITION_METHODS[partition_method],
        activation_checkpoint_interval=activation_checkpoint_interval,
        # Blocks only: DeepSpeed's default checkpoints every layer with parameters,
        # the embedding too, whose int64 input under its reentrant checkpoint leaves
        # nothing on the first stage that requires grad (backward then fails).
        checkpointable_layers=[Block.__name__],
    )
    if init_weights:
        for name, param in module.named_parameters():
            init_parameter(canonical_name(name, cfg.n_layer), param, cfg)
    return module
