"""The wall around DeepSpeed: the one module that touches DeepSpeed state outside its public
API (initialize, zero.Init, the accelerator, deepspeed.pipe, deepspeed.utils' safe_*
accessors) or reads DeepSpeed's checkpoint files; the rest of megatrain speaks of parameter
names and tensors. By name where there is one: the optimizer flavour and what it holds
(masters, moments, step count: set into a live engine; read from checkpoints), ZeRO 1-2's
flat-partition fragments, fp16's loss scale in either of DeepSpeed's forms, AutoTP's cut,
the cache of built ops DeepSpeed's builders load from, its checkpoint files handed over
to megatrain's background writer instead of written.

Written for the DeepSpeed versions in SUPPORTED; another is refused in one line when this
module is imported (MEGATRAIN_UNSUPPORTED_DEEPSPEED=1 goes on, with a warning), since an
upgrade can change any internal, silently where an attribute just stops existing.
tests/unit/test_deepspeed_wall.py: a contract test per flavour against DeepSpeed's real
objects, and a grep that fails on DeepSpeed-private names anywhere else.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import math
import os
import re
from pathlib import Path

import deepspeed
import torch
from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

from megatrain.errors import UserError
from megatrain.files import Deferred
from megatrain.optim import FusedAdamWClip

log = logging.getLogger(__name__)

SUPPORTED = ("0.19.8",)
OVERRIDE = "MEGATRAIN_UNSUPPORTED_DEEPSPEED"
MOMENTS = ("exp_avg", "exp_avg_sq")


def check_version(version: str = deepspeed.__version__) -> None:
    """DeepSpeed's version is one this module was written for, or the override is set."""
    if version in SUPPORTED:
        return
    message = (
        f"DeepSpeed {version} is installed; megatrain reaches into DeepSpeed's internals "
        f"(megatrain/train/ds_internals.py) as they are in {', '.join(SUPPORTED)}"
    )
    if not os.environ.get(OVERRIDE):
        raise UserError(f"{message}: install deepspeed=={SUPPORTED[-1]}, or set {OVERRIDE}=1 to try anyway")
    log.warning("%s; %s=1 is set: going on, untested", message, OVERRIDE)


check_version()


# --- optimizer flavours -------------------------------------------------------------------

FLAVOURS = {  # DeepSpeed's wrapper -> megatrain's name for it
    DeepSpeedZeroOptimizer_Stage3: "zero3",
    DeepSpeedZeroOptimizer: "zero12",  # ZeRO 1-2: flat fp32 partitions
    BF16_Optimizer: "bf16",  # ZeRO-1 in bf16 with fp32 accumulation: flat fp32 partitions
    FP16_Optimizer: "fp16_flat",  # ZeRO-0 fp16 with DeepSpeed's FusedAdam: one flat fp32 master per group
    FP16_UnfusedOptimizer: "copies",  # ZeRO-0 bf16/fp16: an fp32 copy of each parameter
}


def flavour(engine_optimizer) -> str:
    """What DeepSpeed made of the optimizer: a FLAVOURS value, or "plain" (ZeRO-0 with fp32
    weights: the client optimizer itself, stepping the model's parameters)."""
    return next((name for cls, name in FLAVOURS.items() if isinstance(engine_optimizer, cls)), "plain")


def base_optimizer(engine_optimizer):
    """The optimizer that owns the moments: the one inside DeepSpeed's wrapper, or itself."""
    return engine_optimizer.optimizer if flavour(engine_optimizer) != "plain" else engine_optimizer


def master_copies(engine_optimizer) -> dict[int, torch.Tensor]:
    """{id(model parameter): the fp32 copy the optimizer steps} where DeepSpeed keeps one per
    parameter (ZeRO-0 in bf16/fp16); empty otherwise."""
    if flavour(engine_optimizer) != "copies":
        return {}
    return {
        id(lp): hp
        for lps, hps in zip(engine_optimizer.fp16_groups, engine_optimizer.fp32_groups, strict=True)
        for lp, hp in zip(lps, hps, strict=True)
    }


def fragment(p: torch.Tensor) -> tuple[int, int, int] | None:
    """(parameter group, start, numel) of this rank's piece of parameter `p` in its group's
    flat fp32 partition (ZeRO 1-2, BF16_Optimizer), or None when this rank holds none of it
    or there are no flat partitions."""
    mapping = getattr(p, "_hp_mapping", None)
    if mapping is None:
        return None
    address = mapping.get_hp_fragment_address()
    return mapping.param_group_index, address.start, address.numel


def tensor_parallel_group():
    """AutoTP's tensor-parallel process group (made by cut_for_tensor_parallel)."""
    from deepspeed.utils import groups

    return groups.get_tensor_model_parallel_group()


# --- setting state into a live engine --------------------------------------------------------


def load_state(engine_optimizer, named, part, step: int, moments) -> None:
    """Set every parameter's master weight, model weight and (`moments`) AdamW moments from
    `part` (layout_free._Parts: `shard(kind, name)`, this rank's whole or tensor-parallel
    piece; `flat(kind, name, start, n)`, a flat range of it) and the step count, for the
    engine's optimizer flavour. `named`: (GPT name, model parameter) pairs."""
    base = base_optimizer(engine_optimizer)
    form = flavour(engine_optimizer)
    if form == "zero3":
        _load_zero3(engine_optimizer, base, named, part, step, moments)
    elif form in ("zero12", "bf16"):
        _load_zero12(engine_optimizer, base, named, part, step, moments)
    elif form == "fp16_flat":
        _load_flat(engine_optimizer, base, named, part, step, moments)
    else:  # whole parameters, masters either the model's own or DeepSpeed's fp32 copies
        masters = master_copies(engine_optimizer)
        for name, p in named:
            value = part.shard("param", name)
            p.copy_(value)
            hp = masters.get(id(p), p)
            hp.copy_(value)
            if moments:
                state = _adam_state(base, hp, step)
                for kind in moments:
                    state[kind].copy_(part.shard(kind, name))


def _load_zero12(opt, base, named, part, step: int, moments) -> None:
    if moments:  # the flat fp32 partitions: DeepSpeed's ZeRO optimizer's, or its BF16_Optimizer's
        flats = getattr(opt, "single_partition_of_fp32_groups", None) or opt.fp32_groups_flat_partition
        for flat in flats:
            _adam_state(base, flat, step)
        opt._hp_optimizer_states_linked = False  # link each parameter's fragment to the new state tensors
        opt._lazy_init_hp_params_optimizer_state()
    for name, p in named:
        value = part.shard("param", name)
        p.copy_(value)  # every rank holds whole model weights
        if p._hp_mapping is not None:  # this rank's fragment of the masters and moments
            address = p._hp_mapping.lp_fragment_address
            p._hp_mapping.get_hp_fragment().copy_(value.reshape(-1).narrow(0, address.start, address.numel))
            for kind in moments:
                p._hp_mapping.get_hp_fragment(kind).copy_(part.flat(kind, name, address.start, address.numel))


def _load_flat(opt, base, named, part, step: int, moments) -> None:
    """DeepSpeed's FP16_Optimizer: each group's fp16 parameters are views of one flat buffer,
    their masters and moments one flat fp32 tensor each, in the same order. The masters
    are set, not only the fp16 weights: those are copied from the masters after each step."""
    name_of = {id(p): name for name, p in named}
    for lps, flat in zip(opt.fp16_groups, opt.fp32_groups_flat, strict=True):
        state = _adam_state(base, flat, step) if moments else {}
        offset = 0
        for lp in lps:
            name, n = name_of[id(lp)], lp.numel()
            value = part.shard("param", name)
            lp.copy_(value)
            flat.narrow(0, offset, n).copy_(value.reshape(-1))
            for kind in moments:
                state[kind].narrow(0, offset, n).copy_(part.shard(kind, name).reshape(-1))
            offset += n


def _load_zero3(opt, base, named, part, step: int, moments) -> None:
    """Each rank sets its own partition of every parameter (DeepSpeed's local setters): the
    last rank's is padded when the ranks do not divide a parameter's elements."""
    from deepspeed.utils import safe_set_local_fp32_param, safe_set_local_optimizer_state

    for flat in opt.fp32_partitioned_groups_flat if moments else ():
        _adam_state(base, flat, step)
    for name, p in named:
        size = p.ds_tensor.numel()  # the partition, padded: the last rank's slice may end inside it
        start = torch.distributed.get_rank(group=p.ds_process_group) * size
        n = max(0, min(size, p.ds_numel - start))  # (a rank past a small parameter's end: padding alone)
        for kind in ("param", *moments):
            local = torch.zeros(size, dtype=torch.float32)
            if n:
                local[:n] = part.flat(kind, name, start, n)
            if kind == "param":
                safe_set_local_fp32_param(p, local)
            else:
                safe_set_local_optimizer_state(p, local, kind)
    for lp, hp in zip(opt.fp16_partitioned_groups_flat, opt.fp32_partitioned_groups_flat, strict=True):
        lp.copy_(hp)  # the model's own partitions, gathered on use


def _adam_state(base, tensor: torch.Tensor, step: int) -> dict:
    """The optimizer's state for `tensor`, created as its first step would (zero moments)
    when absent, with the step count set."""
    state = base.state[tensor]
    for kind in MOMENTS:
        if kind not in state:
            state[kind] = torch.zeros_like(tensor, dtype=torch.float32, memory_format=torch.contiguous_format)
    # (ZeRO-3 empties the base optimizer's groups between steps: then the first stands for all)
    group = next(
        (g for g in base.param_groups if any(p is tensor for p in g["params"])), base.param_groups[0]
    )
    if "step" in group:  # DeepSpeed's FusedAdam, once it has stepped, starts new states' counts from here
        group["step"] = step
    if isinstance(base, torch.optim.AdamW | FusedAdamWClip):  # a float tensor, on the device when fused
        device = tensor.device if group.get("fused") or isinstance(base, FusedAdamWClip) else "cpu"
        state["step"] = torch.tensor(float(step), dtype=torch.float32, device=device)
    else:  # DeepSpeed's own Adams count in a plain int (a GPU tensor would be read back every step)
        state["step"] = step
    return state


# --- DeepSpeed's checkpoint files ---------------------------------------------------------


def read_checkpoint(ckpt: Path, mp: int, kinds, pipeline_weights: dict | None, recorded_groups):
    """({"KIND/NAME": Deferred}, step count or None) of model-parallel rank `mp`'s state in
    checkpoint `ckpt`, NAME as DeepSpeed's module names it: from the ZeRO partitions' files
    where there are some, else from ZeRO-0's model-states file (the weights of a pipeline
    already read by pipeline_weights; the client optimizer's state named by
    `recorded_groups(mp)`, the parameter names in its order)."""
    if any(ckpt.glob("*zero_pp_rank_*_optim_states.pt")):
        return _zero_partitions(ckpt, mp, kinds)
    return _zero0(ckpt, mp, kinds, pipeline_weights, recorded_groups)


def _load(path: Path) -> dict:
    """A DeepSpeed checkpoint file, its tensors mapped from the file rather than read."""
    return torch.load(path, map_location="cpu", mmap=True, weights_only=False)


def _step_of(states) -> int:
    found = {int(s["step"]) for s in states if "step" in s}
    if len(found) != 1:
        raise UserError(f"optimizer step counts disagree or are missing: {sorted(found)}")
    return found.pop()


def _at_hand(t: torch.Tensor) -> Deferred:
    """A tensor already read (from a file mapped into memory)."""
    return Deferred(tuple(t.shape), t.dtype, lambda: t)


def _zero_partitions(ckpt: Path, mp: int, kinds) -> tuple[dict[str, Deferred], int | None]:
    """From model-parallel rank `mp`'s ZeRO optimizer partitions: each kind of tensor is
    reassembled the way zero_to_fp32 reassembles the fp32 masters."""
    from deepspeed.utils import zero_to_fp32 as z

    # The parameters' shapes, from the model-states file (ZeRO-3 keeps one per rank; a
    # pipeline stage's has no module weights, which parse_model_states would read for
    # buffers: GPT has none, so the record is built here).
    meta_file = ckpt / f"mp_rank_{mp:02d}_model_states.pt"
    if not meta_file.is_file():
        meta_file = ckpt / f"zero_pp_rank_0_mp_rank_{mp:02d}_model_states.pt"
    meta = _load(meta_file)
    model_states = [
        z.zero_model_state(
            buffers={},
            param_shapes=meta["param_shapes"],
            shared_params=list(meta["shared_params"].items()),
            ds_version=meta.get("ds_version"),
            frozen_param_shapes=meta.get("frozen_param_shapes"),
            frozen_param_fragments=meta.get("frozen_param_fragments"),
        )
    ]
    files = sorted(
        (str(p) for p in ckpt.glob(f"*zero_pp_rank_*_mp_rank_{mp:02d}_optim_states.pt")), key=z.natural_keys
    )
    flats: dict[str, list] = {k: [] for k in kinds}
    step_states = []
    for f in files:
        sd = _load(f)["optimizer_state_dict"]
        zero_stage = int(sd.get("zero_stage", 1))  # DeepSpeed's BF16_Optimizer (ZeRO-1 in bf16) records none
        masters = sd["single_partition_of_fp32_groups" if zero_stage <= 2 else "fp32_flat_groups"]
        base = sd["base_optimizer_state" if zero_stage <= 2 else "optimizer_state_dict"]
        flats["param"].append(masters)
        if len(kinds) > 1:
            # The base optimizer's state i belongs to flat group i (ZeRO-3: its sub-groups, in order).
            states = [base["state"][i] for i in range(len(masters))]
            for kind in kinds[1:]:
                flats[kind].append([s[kind].reshape(-1) for s in states])
                if any(s[kind].numel() != m.numel() for s, m in zip(states, masters, strict=True)):
                    raise UserError(f"{f}: optimizer state {kind} does not match its fp32 partition")
            step_states += states
        paddings = sd.get("param_alignment_paddings")
    out = {}
    for kind in kinds:
        if zero_stage <= 2:
            params = _zero2_params(files[0], flats[kind], meta["param_shapes"], paddings)
        else:
            with _quiet():  # zero_to_fp32's merge for ZeRO-3 is lazy already: a GatheredTensor per parameter
                gathered = z._get_fp32_state_dict_from_zero3_checkpoint(
                    len(files), flats[kind], model_states, False
                )
            params = {k: Deferred(tuple(g.shape), g.dtype, g.contiguous) for k, g in gathered.items()}
        out.update({f"{kind}/{k}": d for k, d in params.items()})
    return out, (_step_of(step_states) if len(kinds) > 1 else None)


def _zero2_params(
    file: str, flats: list[list[torch.Tensor]], param_shapes: list[dict], paddings
) -> dict[str, Deferred]:
    """Each parameter of ZeRO 1-2 partitions (rank -> flat group), made from the pieces
    the ranks hold: zero_to_fp32's reassembly (each group's partitions end to end, the
    parameters in order with their alignment padding), without concatenating whole groups."""
    out = {}
    for g, shapes in enumerate(param_shapes):
        parts = [rank_groups[g] for rank_groups in flats]
        starts = [0]
        for part in parts:
            starts.append(starts[-1] + part.numel())
        if paddings is not None and len(paddings[g]) != len(shapes):
            raise UserError(f"{file}: group {g} has {len(shapes)} parameters and {len(paddings[g])} paddings")
        offset = 0
        for i, (name, shape) in enumerate(shapes.items()):
            n = math.prod(shape)
            out[name] = Deferred(
                tuple(shape), parts[0].dtype, functools.partial(_span, parts, starts, offset, n, tuple(shape))
            )
            offset += n + (paddings[g][i] if paddings is not None else 0)
        # ZeRO-2 pads each group to a multiple of 2 x ranks: what is left over is padding alone
        align = 2 * len(parts)
        if math.ceil(offset / align) != math.ceil(starts[-1] / align):
            raise UserError(
                f"{file}: the parameters of group {g} take {offset} elements of its {starts[-1]}: "
                "the checkpoint does not match its model"
            )
    return out


def _span(parts: list[torch.Tensor], starts: list[int], offset: int, n: int, shape: tuple) -> torch.Tensor:
    """Elements [offset, offset + n) of the partitions laid end to end, as `shape`."""
    pieces = [
        part[max(offset, lo) - lo : min(offset + n, hi) - lo]
        for part, lo, hi in zip(parts, starts, starts[1:], strict=False)
        if max(offset, lo) < min(offset + n, hi)
    ]
    return torch.cat(pieces).view(shape)


def _zero0(
    ckpt: Path, mp: int, kinds, pipeline_weights: dict | None, recorded_groups
) -> tuple[dict[str, Deferred], int | None]:
    """From a ZeRO-0 checkpoint: the module weights (a pipeline's, already read, else
    model-parallel rank `mp`'s), or with moments the client optimizer's state by the names
    megatrain recorded in its parameter order (`recorded_groups(mp)`)."""
    model_file = ckpt / f"mp_rank_{mp:02d}_model_states.pt"
    saved = _load(model_file)
    weights = pipeline_weights if pipeline_weights is not None else saved["module"]
    if len(kinds) == 1:
        return {f"param/{k}": _at_hand(v) for k, v in weights.items()}, None
    opt = saved["optimizer"]
    groups = recorded_groups(mp)
    names = [n for group in groups for n in group]
    if "fp32_groups_flat" in opt:  # fp16 with DeepSpeed's FusedAdam (FP16_Optimizer)
        states = opt["optimizer_state_dict"]["state"]
        return _split_flat(ckpt, groups, opt["fp32_groups_flat"], states, weights), _step_of(states.values())
    if "fp32_groups" in opt:  # bf16, and fp16 with another optimizer: DeepSpeed's fp32 copies are the masters
        base = opt["optimizer_state_dict"]
        masters = [t for group in opt["fp32_groups"] for t in group]
        out = {f"param/{n}": _at_hand(t) for n, t in zip(names, masters, strict=True)}
    else:
        base = opt
        out = {f"param/{k}": _at_hand(v) for k, v in weights.items()}
    states = base["state"]
    for i, name in enumerate(names):
        for kind in MOMENTS:
            out[f"{kind}/{name}"] = _at_hand(states[i][kind])
    return out, _step_of(_counted_states(states, groups, base["param_groups"]))


def _counted_states(states, groups: list[list[str]], param_groups: list[dict]) -> list[dict]:
    """The parameters' states that hold the step count. DeepSpeed's FusedAdam (its groups
    carry a "step") counts each group's steps in its last parameter's state alone and leaves
    the others' at 0; other optimizers count in every parameter's."""
    counted, start = [], 0
    for group, param_group in zip(groups, param_groups, strict=True):
        indices = range(start, start + len(group))
        counted += (
            [states[indices[-1]]] if "step" in param_group and indices else [states[i] for i in indices]
        )
        start += len(group)
    return counted


def pipeline_weights(ckpt: Path, tensor_rank: int | None = None) -> dict[str, torch.Tensor]:
    """Every stage's module weights, by the pipeline's layer-indexed names: with tensor
    parallelism, tensor rank `tensor_rank`'s (layer_NN-model_TT-model_states.pt)."""
    weights = {}
    pattern = (
        "layer_*-model_states.pt"
        if tensor_rank is None
        else f"layer_*-model_{tensor_rank:02d}-model_states.pt"
    )
    for f in sorted(ckpt.glob(pattern)):
        layer = int(re.match(r"layer_(\d+)", f.name).group(1))
        for name, t in _load(f).items():
            weights[f"{layer}.{name}"] = t
    return weights


def _split_flat(ckpt: Path, groups: list[list[str]], flats, states, weights) -> dict[str, Deferred]:
    """Each parameter's master and moments, cut from its group's flat tensors (the group's
    parameters one after another, as DeepSpeed flattens them) and shaped as its weight."""
    out = {}
    for index, (group, flat) in enumerate(zip(groups, flats, strict=True)):
        offset = 0
        for name in group:
            shape = weights[name].shape
            n = math.prod(shape)
            out[f"param/{name}"] = _at_hand(flat.narrow(0, offset, n).view(shape))
            for kind in MOMENTS:
                out[f"{kind}/{name}"] = _at_hand(states[index][kind].narrow(0, offset, n).view(shape))
            offset += n
        if offset != flat.numel():
            raise UserError(
                f"{ckpt}: parameter group {index}'s flat fp32 master holds {flat.numel()} values, "
                f"its parameters {offset}"
            )
    return out


@contextlib.contextmanager
def _quiet():
    """zero_to_fp32 narrates its progress on stdout and stderr."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield


# --- DeepSpeed's checkpoint files, handed over instead of written ----------------------------


@contextlib.contextmanager
def files_handed_over(engine, sink):
    """While inside, `engine.save_checkpoint` hands each file it would write, as
    sink(state_dict, path), instead of writing it (its directories are still made): the state
    dicts hold the engine's live tensors, which the sink copies before returning. The
    engine's own checkpoint engine (the one torch.save would write through) is put back after."""
    from deepspeed.runtime.checkpoint_engine.checkpoint_engine import CheckpointEngine

    own = engine.checkpoint_engine

    class HandOver(CheckpointEngine):
        def create(self, info):
            pass

        def save(self, state_dict, path):
            sink(state_dict, path)

        def load(self, path, map_location=None):
            raise RuntimeError("files_handed_over: a load while saving")

        def commit(self, info):
            return True

        def is_data_parallel_writer(self, dp_rank):
            return own.is_data_parallel_writer(dp_rank)

    engine.checkpoint_engine = HandOver()
    try:
        yield
    finally:
        engine.checkpoint_engine = own


# --- fp16's dynamic loss scale --------------------------------------------------------------
# Two forms: ZeRO 1-3's optimizers have a `loss_scaler` (with hysteresis under fp16) and a
# `cur_scale`; ZeRO-0's (FP16_Optimizer, FP16_UnfusedOptimizer) a `loss_scale_config` and no
# `cur_scale`. The same on every rank: checkpoints and rollback points keep it once.

_STATE = ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis")  # the parts that move


def _holder(optimizer):
    """The object that holds the optimizer's loss scale, or None."""
    for name in ("loss_scaler", "loss_scale_config"):
        found = getattr(optimizer, name, None)
        if found is not None:
            return found
    return None


def loss_scale(optimizer) -> float:
    """The scale the last step used (nan without one)."""
    found = _holder(optimizer)
    return float(found.cur_scale) if found is not None else float("nan")


def _dynamic(found) -> bool:
    return bool(getattr(found, "dynamic", False) or getattr(found, "dynamic_loss_scale", False))


def loss_scale_state(optimizer) -> dict | None:
    """The dynamic scale's state as plain numbers (for megatrain.json), or None without one."""
    found = _holder(optimizer)
    if found is None or not _dynamic(found):
        return None
    return {k: getattr(found, k) for k in _STATE if hasattr(found, k)}


def load_loss_scale_state(optimizer, saved: dict | None) -> bool:
    """Set the dynamic scale from `loss_scale_state()`'s output, of either form (a field this form lacks
    is ignored, one the other lacked keeps its value); False, changing nothing, when nothing
    was saved or this optimizer has no dynamic scale (fp16 resumed as bf16)."""
    found = _holder(optimizer)
    if not saved or found is None or not _dynamic(found):
        return False
    for k, v in saved.items():
        if hasattr(found, k):
            setattr(found, k, v)
    return True


# --- DeepSpeed's JIT ops -------------------------------------------------------------------


def register_op(name: str, module) -> None:
    """Hand DeepSpeed an op it would otherwise build and load itself (prebuilt_ops.py): its
    builders return what is in this cache."""
    from deepspeed.ops.op_builder.builder import OpBuilder

    OpBuilder._loaded_ops[name] = module


# --- AutoTP, replayed on the meta model -----------------------------------------------------


def cut_for_tensor_parallel(model: torch.nn.Module, section: dict):
    """What `deepspeed.initialize` does with a `tensor_parallel` config section (DeepSpeed
    0.19.8, DeepSpeedEngine._apply_autotp_partitioning with a partition config), done here
    to the meta model: AutoTP swaps the split Linears for its layers and cuts their (meta)
    weights, so the rank then allocates only its shards. Done at initialize, every rank
    would hold the whole model on its device first. A pipeline stage is cut the same way
    (its engine is then given no `tensor_parallel` section: with one, DeepSpeed would
    replace the pipeline grid as the engine's mpu). The tensor-parallel groups are T
    consecutive ranks, the model axis of the pipeline grid's topology too. The AutoTP
    object, for finish_tensor_parallel."""
    from deepspeed.module_inject import set_autotp_mode
    from deepspeed.module_inject.auto_tp import AutoTP
    from deepspeed.runtime.tensor_parallel.config import get_tensor_parallel_config
    from deepspeed.utils import groups

    set_autotp_mode(training=True)  # as deepspeed.initialize does first: layers built for training
    tp_config = get_tensor_parallel_config({"tensor_parallel": section})
    size = tp_config.autotp_size
    groups._init_tp_mesh_device(tensor_model_parallel_size=size)  # the engine's own groups (it reuses them)
    autotp = AutoTP(
        module=model,
        all_reduce_linears=(),
        prefix="",
        state_dict=None,
        linear_layer_setting=(torch.nn.Linear, torch.nn.Embedding),
        orig_layer_impl=None,
        keep_module_on_host=False,
        partition_config=tp_config.get_partition_config_object(),
        vocab_parallel_lm_head=False,
        model_config=None,
        tp_grain_size=tp_config.tensor_parallel.tp_grain_size,
        training_mode=True,
    )
    autotp.set_tensor_parallel_config(size, groups.get_tensor_model_parallel_group())
    autotp.update_linear_policies()
    autotp._replace_module(model)
    return autotp


def finish_tensor_parallel(model: torch.nn.Module, autotp) -> None:
    """The rest of the engine's AutoTP step, on the allocated parameters; the mark tells
    `deepspeed.initialize` the model is already cut."""
    from deepspeed.checkpoint.constants import UNIVERSAL_CHECKPOINT_INFO
    from deepspeed.module_inject.layers import collect_autotp_universal_checkpoint_info

    autotp.register_replicated_grad_hooks(model)
    setattr(model, UNIVERSAL_CHECKPOINT_INFO, collect_autotp_universal_checkpoint_info(model))
    model.ds_autotp_parsed = True


def sequence_parallel_linears(model: torch.nn.Module, group) -> None:
    """Sequence parallelism in AutoTP's layers (DeepSpeed 0.19.8's module_inject.layers): each
    column-parallel layer (LinearLayer, SubParamLinearLayer) gathers the sequence on entry, in
    place of its identity forward and all-reduced input gradient; each row-parallel layer
    (LinearAllreduce, SubParamLinearAllreduce) reduce-scatters its output, in place of its
    all-reduce (model/sequence_parallel.py)."""
    from deepspeed.module_inject import layers

    from megatrain.model import sequence_parallel as sp

    column = (layers.LinearLayer, layers.SubParamLinearLayer)
    row = (layers.LinearAllreduce, layers.SubParamLinearAllreduce)
    for module in model.modules():
        kind = (
            sp.column_linear
            if isinstance(module, column)
            else sp.row_linear
            if isinstance(module, row)
            else None
        )
        if kind is not None:
            module.forward = functools.partial(_sequence_parallel_forward, module, kind, group)


def _sequence_parallel_forward(module, kind, group, x: torch.Tensor) -> torch.Tensor:
    return kind(x, module.weight, module.bias, group)
