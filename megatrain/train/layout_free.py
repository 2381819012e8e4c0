"""The training state in a form no layout owns: per GPT parameter, the fp32 master weight
and the AdamW moments, and the optimizer's step count. Read from a checkpoint of any
layout, loaded into the live engine of any other (docs/checkpoints.md, "Resuming on
another layout").

    tensors, step = read(ckpt)            # {"param/NAME", "exp_avg/NAME", "exp_avg_sq/NAME": fp32}
    deferred, step = read_deferred(ckpt)  # the same, each made when asked for: one at a time
    path, converted = ensure(ckpt)        # CKPT/layout-free.safetensors, written once by all ranks
    load_into(module, path)               # every rank takes its own slices

DeepSpeed's files are read, and a live engine set, by the wall (ds_internals.py); this
module speaks of names and tensors. ZeRO-0's optimizer state is by position: megatrain
records the parameters' names in that order in each rank's megatrain-rankNNNNN.pt. A
pipeline's names map back to GPT's (canonical_name); the tied embedding, kept by the first
and last stage, and the parameters every tensor-parallel rank keeps whole are checked to be
equal across their copies; tensor-parallel shards are gathered into whole parameters, and
cut again on loading (model/tensor_parallel.py).
"""

from __future__ import annotations

import functools
import json
import math
import os
from pathlib import Path

import torch

from megatrain.errors import UserError
from megatrain.files import Deferred, SafetensorsFile, file_sha256, write_atomically
from megatrain.model import GPTConfig, canonical_name, tensor_parallel
from megatrain.train import ds_internals as wall
from megatrain.train.checkpoint import MANIFEST, Checkpointer, rank_file
from megatrain.train.expert_shards import whole_experts

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
    stages, tp = state["layout"]["pipeline_stages"], state["layout"]["tensor_parallel"]
    pipeline = stages > 1
    kinds = KINDS if moments else KINDS[:1]
    # DeepSpeed's files are per model-parallel rank (mp_rank_NN: stage x T + tensor rank).
    # A pipeline's weights are in per-layer files that no stage owns (one set per tensor
    # rank): read them once.
    weights = [wall.pipeline_weights(ckpt, t if tp > 1 else None) for t in range(tp)] if pipeline else None
    parts = [
        wall.read_checkpoint(
            ckpt,
            s * tp + t,
            kinds,
            weights[t] if pipeline else None,
            functools.partial(_recorded_groups, ckpt),
        )
        for s in range(stages)
        for t in range(tp)
    ]
    if moments and len({step for _, step in parts}) != 1:
        raise UserError(
            f"{ckpt}: the optimizer's step counts disagree between parameters "
            f"({sorted({step for _, step in parts})})"
        )
    # Per tensor rank, its stages' parameters (a key twice: the tied embedding, kept by the
    # first and last stage); then each tensor rank's shards gathered into whole parameters.
    by_tensor_rank = []
    for t in range(tp):
        merged: dict[str, Deferred] = {}
        for s in range(stages):
            part, _ = parts[s * tp + t]
            for key, d in part.items():
                key = _key(key, n_layer, pipeline)
                merged[key] = _one_of_equal(ckpt, key, merged[key], d) if key in merged else d
        by_tensor_rank.append(merged)
    if tp > 1:
        model = GPTConfig.from_shape(state["model_shape"])
        first = by_tensor_rank[0]
        tensors = {key: _gathered(ckpt, key, [m[key] for m in by_tensor_rank], model) for key in first}
    else:
        tensors = by_tensor_rank[0]
    step = parts[0][1]
    experts = state["layout"].get("expert_parallel", 1)
    if experts > 1:  # the experts, split over the ranks' own files (train/expert_shards.py)
        replicas = state["layout"]["dp_size"] // experts
        tensors.update(_expert_shards(ckpt, experts, replicas, kinds, step))
    return {key: _fp32(d) for key, d in tensors.items()}, step


def _expert_shards(ckpt: Path, size: int, replicas: int, kinds, step: int | None) -> dict[str, Deferred]:
    """The whole experts of a checkpoint that split them over `size` places, each kept by
    `replicas` ranks (place p, replica i: rank p + i * size), each rank a slice of its place's
    experts in its rank file (train/expert_shards.py)."""
    states = []
    for place in range(size):
        states.append([])
        for replica in range(replicas):
            rank = place + replica * size
            mine = Checkpointer.rank_state(ckpt, rank)["experts"]
            found = (mine["place"], mine["replica"], mine["step"] if step is not None else None)
            if found != (place, replica, step):
                raise UserError(
                    f"{ckpt / rank_file(rank)}: its experts are (place, replica, optimizer step) "
                    f"{found}, expected {(place, replica, step)}: the checkpoint is inconsistent"
                )
            states[-1].append(mine)
    return whole_experts(states, kinds)


def _fp32(d: Deferred) -> Deferred:
    return Deferred(d.shape, torch.float32, lambda: _own(d.make().detach().to(torch.float32)))


def _gathered(ckpt: Path, key: str, shards: list[Deferred], model: GPTConfig) -> Deferred:
    """The whole parameter from the tensor-parallel ranks' shards; one that every rank keeps
    whole is checked to be the same on all."""
    name = key.partition("/")[2]
    shape = tensor_parallel.gather(
        name, [torch.empty(d.shape, dtype=d.dtype, device="meta") for d in shards], model
    ).shape

    def make():
        made = [d.make() for d in shards]
        if tensor_parallel.split_of(name, model) is None and not all(torch.equal(made[0], t) for t in made):
            raise UserError(
                f"{ckpt}: the tensor-parallel ranks hold different copies of {key}, which every "
                "rank keeps whole: the checkpoint is inconsistent"
            )
        return tensor_parallel.gather(name, made, model)

    return Deferred(tuple(shape), shards[0].dtype, make)


def _one_of_equal(ckpt: Path, key: str, first: Deferred, second: Deferred) -> Deferred:
    def make():
        a = first.make()
        if not torch.equal(a, second.make()):
            raise UserError(
                f"{ckpt}: the pipeline stages hold different copies of {key} (the tied "
                "embedding): the checkpoint is inconsistent"
            )
        return a

    return Deferred(first.shape, first.dtype, make)


def _own(t: torch.Tensor) -> torch.Tensor:
    """`t` with a storage of its own: a view into a larger buffer (a checkpoint's flat
    partition) is copied, a tensor that already owns its storage is not."""
    whole = (
        t.is_contiguous()
        and t.storage_offset() == 0
        and t.untyped_storage().nbytes() == t.numel() * t.element_size()
    )
    return t if whole else t.clone()


def _key(key: str, n_layer: int, pipeline: bool) -> str:
    """ "KIND/NAME" with NAME as the plain GPT's."""
    kind, _, name = key.partition("/")
    name = name.removeprefix("module.")
    return f"{kind}/{canonical_name(name, n_layer) if pipeline else name}"


def _recorded_groups(ckpt: Path, mp: int) -> list[list[str]]:
    """The names of the ZeRO-0 optimizer's parameters, group by group, in its order."""
    for f in sorted(ckpt.glob("megatrain-rank*.pt")):
        record = torch.load(f, map_location="cpu", weights_only=False).get("optimizer_params")
        if record is not None and record["mp_rank"] == mp:
            return record["groups"]
    raise UserError(
        f"{ckpt}: its ZeRO-0 optimizer state has no parameter names (written before megatrain "
        "recorded them): resume it on the layout that wrote it"
    )


# --- the file ----------------------------------------------------------------------------


def write(ckpt: Path) -> Path:
    """Collective (or one process): CKPT/layout-free.safetensors from the checkpoint's own
    files (write_shared), then listed in the checkpoint's manifest, by its parts' hashes, so
    that a checkpoint's verification covers it (in parallel); a conversion interrupted or
    failed at any point leaves no file that a resume would use."""
    from megatrain.train import distributed as dist

    ckpt = Path(ckpt)
    tensors, step = dist.on_every_rank(lambda: read_deferred(ckpt))
    meta = {
        "format": FORMAT,
        "optimizer_step": str(step),
        "checkpoint_manifest": file_sha256(ckpt / MANIFEST),
    }
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
        mine = dist.on_every_rank(
            lambda: file.write_share(tmp, dist.rank(), ranks, progress if dist.is_main() else None)
        )
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

    engine, n_layer, pipeline = module.engine, module.model_cfg.n_layer, module.layout.pipeline
    with safe_open(str(path), "pt") as f:
        step = int(f.metadata()["optimizer_step"])
        named = [
            (canonical_name(n, n_layer) if pipeline else n, p) for n, p in engine.module.named_parameters()
        ]
        moments = MOMENTS if f"{MOMENTS[0]}/{named[0][0]}" in f.keys() else ()
        with torch.no_grad():
            wall.load_state(engine.optimizer, named, _Parts(f, module), step, moments)
            if module.experts is not None:  # this rank's rows of the experts
                module.experts.load_whole(
                    lambda kind, name, lo, hi: f.get_slice(f"{kind}/{name}")[lo:hi], bool(moments), step
                )
    return step


class _Parts:
    """This rank's parts of the tensors of an open layout-free file, read by slices: a
    parameter's tensor-parallel shard, or a flat range of it (the whole parameter is never
    read for either, except a flat range of a shard, read as the shard)."""

    def __init__(self, f, module):
        self.f, self.tp_rank, self.tp_size = f, module.layout.tp_rank, module.layout.tensor_parallel
        self.model_cfg = module.model_cfg

    def shard(self, kind: str, name: str) -> torch.Tensor:
        """Parameter `name` as this rank holds it: whole, or its tensor-parallel shard."""
        key = f"{kind}/{name}"
        cut = tensor_parallel.shard_ranges(
            name, self.f.get_slice(key).get_shape(), self.tp_rank, self.tp_size, self.model_cfg
        )
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
