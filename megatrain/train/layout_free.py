"""The training state in a form no layout owns: per GPT parameter, the fp32 master weight
and the AdamW moments, and the optimizer's step count. Read from a checkpoint of any
layout, loaded into the live engine of any other (docs/checkpoints.md, "Resuming on
another layout").

    tensors, step = read(ckpt)                 # {"param/NAME", "exp_avg/NAME", "exp_avg_sq/NAME": fp32}
    deferred, step = read_deferred(ckpt)       # the same, each made when asked for: one at a time
    path, converted = ensure(ckpt)             # CKPT/layout-free.safetensors, written once by all ranks, atomically
    load_into(module, path)                    # every rank takes its own slices

Where a checkpoint keeps them:
  ZeRO 1-3 (and a pipeline's ZeRO-1, stage by stage)
        the fp32 partitions and, with the same flat layout, the moments, in the
        *optim_states.pt files (ZeRO-1 in bf16 with fp32 accumulation: DeepSpeed's
        BF16_Optimizer writes them alike); each parameter reassembled from the ranks' pieces
        as DeepSpeed's zero_to_fp32 reassembles the weights (the moments the same way);
  ZeRO-0
        the client optimizer's state in the model-states file, by position in its
        parameter groups: megatrain records the parameters' names in that order in each
        rank's megatrain-rankNNNNN.pt ("optimizer_params"); the masters are the module
        weights (fp32) or DeepSpeed's fp32 copies (bf16, fp16), under fp16 with DeepSpeed's
        FusedAdam one flat fp32 tensor per parameter group (its moments likewise).
A pipeline's names map back to GPT's (canonical_name); the tied embedding is kept by the
first and the last stage, and both copies are checked to be equal before one is taken.
Tensor-parallel ranks' shards are gathered into whole parameters (model/tensor_parallel.py);
the parameters every rank keeps whole are checked to be equal; loading cuts each rank's
shard again.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import math
import os
import re
from pathlib import Path

import torch

from megatrain.errors import UserError
from megatrain.files import Deferred, SafetensorsFile, file_sha256, write_atomically
from megatrain.model import GPTConfig, canonical_name, tensor_parallel
from megatrain.optim import FusedAdamWClip
from megatrain.train.checkpoint import MANIFEST, Checkpointer

FORMAT = "megatrain-layout-free/1"
FILE = "layout-free.safetensors"
KINDS = ("param", "exp_avg", "exp_avg_sq")
MOMENTS = KINDS[1:]


# --- reading any layout ------------------------------------------------------------------


def read(ckpt: Path, moments: bool = True) -> tuple[dict[str, torch.Tensor], int | None]:
    """({"KIND/NAME": fp32 tensor}, optimizer step count) of a checkpoint directory, by GPT's
    names; without `moments`, the weights only (step None)."""
    deferred, step = read_deferred(ckpt, moments)
    return {key: d.make() for key, d in deferred.items()}, step


def read_deferred(ckpt: Path, moments: bool = True) -> tuple[dict[str, Deferred], int | None]:
    """As read, each tensor made only when asked for, from the checkpoint's files mapped
    into memory: a model far larger than memory is converted one parameter at a time."""
    ckpt = Path(ckpt)
    state = Checkpointer.read_state(ckpt)
    n_layer = state["model_shape"]["n_layer"]
    layout = {"tensor_parallel": 1, **state["layout"]}
    stages, tp = layout["pipeline_stages"], layout["tensor_parallel"]
    pipeline = stages > 1
    kinds = KINDS if moments else KINDS[:1]
    # DeepSpeed's files are per model-parallel rank (mp_rank_NN): a pipeline stage, or a
    # tensor-parallel rank; with neither, one.
    mp_ranks = range(stages * tp)
    if any(ckpt.glob("*zero_pp_rank_*_optim_states.pt")):
        parts = [_zero_partitions(ckpt, mp, kinds) for mp in mp_ranks]
    else:
        # A pipeline's weights are in per-layer files that no stage owns: read them once.
        weights = _pipeline_weights(ckpt) if pipeline else None
        parts = [_zero0(ckpt, mp, kinds, weights) for mp in mp_ranks]
    if moments and len({step for _, step in parts}) != 1:
        raise UserError(f"{ckpt}: the optimizer's step counts disagree between parameters "
                        f"({sorted({step for _, step in parts})})")
    named = [{_key(key, n_layer, pipeline): d for key, d in part.items()} for part, _ in parts]
    if tp > 1:  # each tensor-parallel rank's shards, gathered into whole parameters
        model = GPTConfig.from_shape(state["model_shape"])
        tensors = {key: _gathered(ckpt, key, [part[key] for part in named], model) for key in named[0]}
    else:
        tensors = {}
        for part in named:
            for key, d in part.items():  # a key twice: the tied embedding, kept by the first and last stage
                tensors[key] = _one_of_equal(ckpt, key, tensors[key], d) if key in tensors else d
    return {key: _fp32(d) for key, d in tensors.items()}, parts[0][1]


def _fp32(d: Deferred) -> Deferred:
    return Deferred(d.shape, torch.float32, lambda: _own(d.make().detach().to(torch.float32)))


def _gathered(ckpt: Path, key: str, shards: list[Deferred], model: GPTConfig) -> Deferred:
    """The whole parameter from the tensor-parallel ranks' shards; one that every rank keeps
    whole is checked to be the same on all."""
    name = key.partition("/")[2]
    shape = tensor_parallel.gather(name, [torch.empty(d.shape, dtype=d.dtype, device="meta") for d in shards],
                                   model).shape

    def make():
        made = [d.make() for d in shards]
        if tensor_parallel.split_of(name, model) is None and not all(torch.equal(made[0], t) for t in made):
            raise UserError(f"{ckpt}: the tensor-parallel ranks hold different copies of {key}, which every "
                            "rank keeps whole: the checkpoint is inconsistent")
        return tensor_parallel.gather(name, made, model)

    return Deferred(tuple(shape), shards[0].dtype, make)


def _one_of_equal(ckpt: Path, key: str, first: Deferred, second: Deferred) -> Deferred:
    def make():
        a = first.make()
        if not torch.equal(a, second.make()):
            raise UserError(f"{ckpt}: the pipeline stages hold different copies of {key} (the tied "
                            "embedding): the checkpoint is inconsistent")
        return a

    return Deferred(first.shape, first.dtype, make)


def _at_hand(t: torch.Tensor) -> Deferred:
    """A tensor already read (from a file mapped into memory)."""
    return Deferred(tuple(t.shape), t.dtype, lambda: t)


def _own(t: torch.Tensor) -> torch.Tensor:
    """`t` with a storage of its own: a view into a larger buffer (a checkpoint's flat
    partition) is copied, a tensor that already owns its storage is not."""
    whole = t.is_contiguous() and t.storage_offset() == 0 and t.untyped_storage().nbytes() == t.numel() * t.element_size()
    return t if whole else t.clone()


def _key(key: str, n_layer: int, pipeline: bool) -> str:
    """"KIND/NAME" with NAME as the plain GPT's."""
    kind, _, name = key.partition("/")
    name = name.removeprefix("module.")
    return f"{kind}/{canonical_name(name, n_layer) if pipeline else name}"


def _step_of(states) -> int:
    found = {int(s["step"]) for s in states if "step" in s}
    if len(found) != 1:
        raise UserError(f"optimizer step counts disagree or are missing: {sorted(found)}")
    return found.pop()


def _load(path: Path) -> dict:
    """A DeepSpeed checkpoint file, its tensors mapped from the file rather than read."""
    return torch.load(path, map_location="cpu", mmap=True, weights_only=False)


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
    model_states = [z.zero_model_state(buffers={}, param_shapes=meta["param_shapes"],
                                       shared_params=list(meta["shared_params"].items()),
                                       ds_version=meta.get("ds_version"),
                                       frozen_param_shapes=meta.get("frozen_param_shapes"),
                                       frozen_param_fragments=meta.get("frozen_param_fragments"))]
    files = sorted((str(p) for p in ckpt.glob(f"*zero_pp_rank_*_mp_rank_{mp:02d}_optim_states.pt")),
                   key=z.natural_keys)
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
                gathered = z._get_fp32_state_dict_from_zero3_checkpoint(len(files), flats[kind], model_states, False)
            params = {k: Deferred(tuple(g.shape), g.dtype, g.contiguous) for k, g in gathered.items()}
        out.update({f"{kind}/{k}": d for k, d in params.items()})
    return out, (_step_of(step_states) if len(kinds) > 1 else None)


def _zero2_params(file: str, flats: list[list[torch.Tensor]], param_shapes: list[dict], paddings) -> dict[str, Deferred]:
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
            out[name] = Deferred(tuple(shape), parts[0].dtype,
                                 functools.partial(_span, parts, starts, offset, n, tuple(shape)))
            offset += n + (paddings[g][i] if paddings is not None else 0)
        # ZeRO-2 pads each group to a multiple of 2 x ranks: what is left over is padding alone
        align = 2 * len(parts)
        if math.ceil(offset / align) != math.ceil(starts[-1] / align):
            raise UserError(f"{file}: the parameters of group {g} take {offset} elements of its {starts[-1]}: "
                            "the checkpoint does not match its model")
    return out


def _span(parts: list[torch.Tensor], starts: list[int], offset: int, n: int, shape: tuple) -> torch.Tensor:
    """Elements [offset, offset + n) of the partitions laid end to end, as `shape`."""
    pieces = [part[max(offset, lo) - lo:min(offset + n, hi) - lo]
              for part, lo, hi in zip(parts, starts, starts[1:], strict=False) if max(offset, lo) < min(offset + n, hi)]
    return torch.cat(pieces).view(shape)


def _zero0(ckpt: Path, mp: int, kinds, pipeline_weights: dict | None) -> tuple[dict[str, Deferred], int | None]:
    """From a ZeRO-0 checkpoint: the module weights (a pipeline's, already read, else
    model-parallel rank `mp`'s), or with moments the client optimizer's state by the names
    megatrain recorded in its parameter order."""
    model_file = ckpt / f"mp_rank_{mp:02d}_model_states.pt"
    saved = _load(model_file)
    weights = pipeline_weights if pipeline_weights is not None else saved["module"]
    if len(kinds) == 1:
        return {f"param/{k}": _at_hand(v) for k, v in weights.items()}, None
    opt = saved["optimizer"]
    groups = _recorded_groups(ckpt, mp)
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
        counted += [states[indices[-1]]] if "step" in param_group and indices else [states[i] for i in indices]
        start += len(group)
    return counted


def _pipeline_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    """Every stage's module weights, by the pipeline's layer-indexed names."""
    weights = {}
    for f in sorted(ckpt.glob("layer_*-model_states.pt")):
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
            raise UserError(f"{ckpt}: parameter group {index}'s flat fp32 master holds {flat.numel()} values, "
                            f"its parameters {offset}")
    return out


def _recorded_groups(ckpt: Path, mp: int) -> list[list[str]]:
    """The names of the ZeRO-0 optimizer's parameters, group by group, in its order."""
    for f in sorted(ckpt.glob("megatrain-rank*.pt")):
        record = torch.load(f, map_location="cpu", weights_only=False).get("optimizer_params")
        if record is not None and record["mp_rank"] == mp:
            return record["groups"]
    raise UserError(f"{ckpt}: its ZeRO-0 optimizer state has no parameter names (written before megatrain "
                    "recorded them): resume it on the layout that wrote it")


@contextlib.contextmanager
def _quiet():
    """zero_to_fp32 narrates its progress on stdout and stderr."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield


# --- the file ----------------------------------------------------------------------------


def write(ckpt: Path) -> Path:
    """Collective (or one process): CKPT/layout-free.safetensors from the checkpoint's own
    files (write_shared), then listed in the checkpoint's manifest, by its parts' hashes, so
    that a checkpoint's verification covers it (in parallel); a conversion interrupted or
    failed at any point leaves no file that a resume would use."""
    from megatrain.train import distributed as dist

    ckpt = Path(ckpt)
    tensors, step = dist.on_every_rank(lambda: read_deferred(ckpt))
    meta = {"format": FORMAT, "optimizer_step": str(step), "checkpoint_manifest": file_sha256(ckpt / MANIFEST)}
    entry = write_shared(ckpt / FILE, tensors, meta, progress=f"{ckpt.name} to {FILE}")

    def list_it():
        if dist.is_main():
            manifest = json.loads((ckpt / MANIFEST).read_text())
            manifest["files"][FILE] = entry
            write_atomically(ckpt / MANIFEST, json.dumps(manifest, indent=1))

    dist.on_every_rank(list_it)
    return ckpt / FILE


def write_shared(path: Path, tensors: dict, metadata: dict[str, str], progress: str) -> dict:
    """Collective (or one process): the safetensors file of `tensors` (Deferred ones made in
    turn) at `path`, every rank writing and hashing its byte share of it (SafetensorsFile)
    under a temporary name, renamed by rank 0 once every share is on disk. Returns its
    manifest entry: {"bytes", "sha256"}, or with several shares {"bytes", "parts": [{"bytes",
    "sha256"}, ...]}. A failure on any rank raises on every rank and leaves no file."""
    from megatrain.train import distributed as dist

    file = SafetensorsFile(tensors, metadata)
    tmp = path.with_name(path.name + ".tmp")
    ranks = dist.world_size()
    if ranks > 1:
        progress += f" (rank 0's share of {ranks})"
    try:
        dist.on_every_rank(lambda: file.create(tmp) if dist.is_main() else None)
        mine = dist.on_every_rank(lambda: file.write_share(tmp, dist.rank(), ranks,
                                                           progress if dist.is_main() else None))
        parts = [part for part in dist.all_gather_object(mine) if part["bytes"]]
        dist.on_every_rank(lambda: os.replace(tmp, path) if dist.is_main() else None)
    except BaseException:
        if dist.is_main():
            tmp.unlink(missing_ok=True)
        raise
    return {"bytes": file.size, **(parts[0] if len(parts) == 1 else {"parts": parts})}


def usable(ckpt: Path) -> bool:
    """The checkpoint has a complete layout-free file (listed in its manifest: written to the end)."""
    manifest = json.loads((Path(ckpt) / MANIFEST).read_text())
    return FILE in manifest["files"] and (Path(ckpt) / FILE).is_file()


def ensure(ckpt: Path) -> tuple[Path, bool]:
    """Collective: the checkpoint's layout-free file, written by every rank (each its share)
    if it has none yet; (path, whether it was converted now)."""
    from megatrain.train import distributed as dist

    # Rank 0 alone decides: another rank looking after rank 0 finished would see the file.
    converted = dist.any_rank([dist.is_main() and not usable(ckpt)])[0]
    if converted:
        write(ckpt)  # its last step is collective: every rank returns after the file is listed
    return Path(ckpt) / FILE, converted


# --- loading into a live engine ------------------------------------------------------------


def load_into(module, path: Path) -> int:
    """Every rank: set the master weights, the model's weights and (when the file has them)
    the moments of `module`'s engine (any layout) from a layout-free file; returns the
    optimizer step count. A file of weights alone leaves the optimizer as new. Each rank
    reads only what it keeps: its tensor-parallel shards, its ZeRO-3 slices, its ZeRO 1-2
    fragments of the moments (the model's weights it holds whole)."""
    from safetensors import safe_open

    engine, opt = module.engine, module.engine.optimizer
    n_layer = module.n_layer
    with safe_open(str(path), "pt") as f:
        step = int(f.metadata()["optimizer_step"])
        named = [(canonical_name(n, n_layer) if module.pipeline else n, p) for n, p in engine.module.named_parameters()]
        moments = MOMENTS if f"{MOMENTS[0]}/{named[0][0]}" in f.keys() else ()
        part = _Parts(f, module)
        with torch.no_grad():
            if hasattr(opt, "fp32_partitioned_groups_flat"):  # ZeRO-3
                _load_zero3(opt, module.base_optimizer, named, part, step, moments)
            elif any(getattr(p, "_hp_mapping", None) is not None for _, p in named):  # ZeRO-1/2
                _load_zero12(opt, module.base_optimizer, named, part, step, moments)
            elif hasattr(opt, "fp32_groups_flat"):  # ZeRO-0, fp16 with DeepSpeed's FusedAdam
                _load_flat(opt, module.base_optimizer, named, part, step, moments)
            else:  # ZeRO-0: whole parameters, masters either the model's own or DeepSpeed's fp32 copies
                masters = {}
                if hasattr(opt, "fp32_groups") and hasattr(opt, "fp16_groups"):
                    masters = {id(lp): hp for lps, hps in zip(opt.fp16_groups, opt.fp32_groups, strict=True)
                               for lp, hp in zip(lps, hps, strict=True)}
                for name, p in named:
                    value = part.shard("param", name)
                    p.copy_(value)
                    hp = masters.get(id(p), p)
                    hp.copy_(value)
                    if moments:
                        state = _adam_state(module.base_optimizer, hp, step)
                        for kind in moments:
                            state[kind].copy_(part.shard(kind, name))
    return step


class _Parts:
    """This rank's parts of the tensors of an open layout-free file, read by slices: a
    parameter's tensor-parallel shard, or a flat range of it (the whole parameter is never
    read for either, except a flat range of a shard, read as the shard)."""

    def __init__(self, f, module):
        self.f, self.tp_rank, self.tp_size, self.model_cfg = f, module.tp_rank, module.tp_size, module.model_cfg

    def shard(self, kind: str, name: str) -> torch.Tensor:
        """Parameter `name` as this rank holds it: whole, or its tensor-parallel shard."""
        key = f"{kind}/{name}"
        cut = tensor_parallel.shard_ranges(name, self.f.get_slice(key).get_shape(), self.tp_rank, self.tp_size,
                                           self.model_cfg)
        if cut is None:
            return self.f.get_tensor(key)
        dim, ranges = cut
        sliced = self.f.get_slice(key)
        return torch.cat([sliced[a:b] if dim == 0 else sliced[:, a:b] for a, b in ranges], dim)

    def flat(self, kind: str, name: str, start: int, n: int) -> torch.Tensor:
        """Elements [start, start + n) of the flattened shard; with no tensor parallelism,
        only the rows they lie in are read."""
        key = f"{kind}/{name}"
        shape = self.f.get_slice(key).get_shape()
        if self.tp_size > 1 or len(shape) == 0:
            return self.shard(kind, name).reshape(-1).narrow(0, start, n)
        row = math.prod(shape[1:])
        first, last = start // row, -(-(start + n) // row)
        return self.f.get_slice(key)[first:last].reshape(-1).narrow(0, start - first * row, n)


def _load_zero12(opt, base, named, part: _Parts, step: int, moments) -> None:
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


def _load_flat(opt, base, named, part: _Parts, step: int, moments) -> None:
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


def _load_zero3(opt, base, named, part: _Parts, step: int, moments) -> None:
    """Each rank sets its own partition of every parameter (DeepSpeed's local setters): the
    last rank's is padded when the ranks do not divide a parameter's elements."""
    from deepspeed.utils import safe_set_local_fp32_param, safe_set_local_optimizer_state

    for flat in opt.fp32_partitioned_groups_flat if moments else ():
        _adam_state(base, flat, step)
    for name, p in named:
        safe_set_local_fp32_param(p, _zero3_partition(part, "param", name, p))
        for kind in moments:
            safe_set_local_optimizer_state(p, _zero3_partition(part, kind, name, p), kind)
    for lp, hp in zip(opt.fp16_partitioned_groups_flat, opt.fp32_partitioned_groups_flat, strict=True):
        lp.copy_(hp)  # the model's own partitions, gathered on use


def _zero3_partition(part: _Parts, kind: str, name: str, p) -> torch.Tensor:
    """This rank's ZeRO-3 partition of parameter `name` (p): its slice of the flattened
    parameter, zero-padded to the partition's size (the last rank's slice ends inside it, and
    a rank past a small parameter's end holds padding alone)."""
    size = p.ds_tensor.numel()
    start = torch.distributed.get_rank(group=p.ds_process_group) * size
    n = max(0, min(size, p.ds_numel - start))
    out = torch.zeros(size, dtype=torch.float32)
    if n:
        out[:n] = part.flat(kind, name, start, n)
    return out


def _adam_state(base, tensor: torch.Tensor, step: int) -> dict:
    """The optimizer's state for `tensor`, created as its first step would (zero moments)
    when absent, with the step count set."""
    state = base.state[tensor]
    for kind in MOMENTS:
        if kind not in state:
            state[kind] = torch.zeros_like(tensor, dtype=torch.float32, memory_format=torch.contiguous_format)
    # (ZeRO-3 empties the base optimizer's groups between steps: then the first stands for all)
    group = next((g for g in base.param_groups if any(p is tensor for p in g["params"])), base.param_groups[0])
    if "step" in group:  # DeepSpeed's FusedAdam, once it has stepped, starts new states' counts from here
        group["step"] = step
    if isinstance(base, torch.optim.AdamW | FusedAdamWClip):  # a float tensor, on the device when fused
        device = tensor.device if group.get("fused") or isinstance(base, FusedAdamWClip) else "cpu"
        state["step"] = torch.tensor(float(step), dtype=torch.float32, device=device)
    else:  # DeepSpeed's own Adams count in a plain int (a GPU tensor would be read back every step)
        state["step"] = step
    return state
