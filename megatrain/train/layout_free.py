"""The training state in a form no layout owns: per GPT parameter, the fp32 master weight
and the AdamW moments, and the optimizer's step count. Read from a checkpoint of any
layout, loaded into the live engine of any other (docs/checkpoints.md, "Resuming on
another layout").

    tensors, step = read(ckpt)                 # {"param/NAME", "exp_avg/NAME", "exp_avg_sq/NAME": fp32}
    path, converted = ensure(ckpt)             # CKPT/layout-free.safetensors, written once, atomically
    load_into(module, path)                    # every rank takes its own slices

Where a checkpoint keeps them:
  ZeRO 1-3 (and a pipeline's ZeRO-1, stage by stage)
        the fp32 partitions and, with the same flat layout, the moments, in the
        *optim_states.pt files; merged by DeepSpeed's zero_to_fp32 (the moments through
        the same merge as the weights);
  ZeRO-0
        the client optimizer's state in the model-states file, by position in its
        parameter groups: megatrain records the parameters' names in that order in each
        rank's megatrain-rankNNNNN.pt ("optimizer_params"); the masters are the module
        weights (fp32) or DeepSpeed's fp32 copies (bf16).
A pipeline's names map back to GPT's (canonical_name); the tied embedding is kept by the
first and the last stage, and both copies are checked to be equal before one is taken.
Tensor-parallel ranks' shards are gathered into whole parameters (model/tensor_parallel.py);
the parameters every rank keeps whole are checked to be equal; loading cuts each rank's
shard again.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

import torch

from megatrain.errors import UserError
from megatrain.files import file_sha256, save_safetensors_atomically, write_atomically
from megatrain.model import GPTConfig, canonical_name, tensor_parallel
from megatrain.train.checkpoint import MANIFEST, Checkpointer

FORMAT = "megatrain-layout-free/1"
FILE = "layout-free.safetensors"
KINDS = ("param", "exp_avg", "exp_avg_sq")
MOMENTS = KINDS[1:]


# --- reading any layout ------------------------------------------------------------------


def read(ckpt: Path, moments: bool = True) -> tuple[dict[str, torch.Tensor], int | None]:
    """({"KIND/NAME": fp32 tensor}, optimizer step count) of a checkpoint directory, by GPT's
    names; without `moments`, the weights only (step None)."""
    ckpt = Path(ckpt)
    state = Checkpointer.read_state(ckpt)
    n_layer = state["model_shape"]["n_layer"]
    layout = {"tensor_parallel": 1, **state["layout"]}
    stages, tp = layout["pipeline_stages"], layout["tensor_parallel"]
    pipeline = stages > 1
    kinds = KINDS if moments else KINDS[:1]
    # DeepSpeed's files are per model-parallel rank (mp_rank_NN): a pipeline stage, or a
    # tensor-parallel rank; with neither, one.
    mp_ranks = list(range(stages * tp)) if stages * tp > 1 else [None]
    if any(ckpt.glob("*zero_pp_rank_*_optim_states.pt")):
        parts = [_zero_partitions(ckpt, mp, kinds) for mp in mp_ranks]
    else:
        # A pipeline's weights are in per-layer files that no stage owns: read them once.
        weights = _pipeline_weights(ckpt) if pipeline else None
        parts = [_zero0(ckpt, mp or 0, kinds, weights) for mp in mp_ranks]
    if moments and len({step for _, step in parts}) != 1:
        raise UserError(f"{ckpt}: the optimizer's step counts disagree between parameters "
                        f"({sorted({step for _, step in parts})})")
    named = [{_key(key, n_layer, pipeline): t.detach().to(torch.float32) for key, t in part.items()}
             for part, _ in parts]
    if tp > 1:  # each tensor-parallel rank's shards, gathered into whole parameters
        model = GPTConfig.from_shape(state["model_shape"])
        tensors = {}
        for key in named[0]:
            name, shards = key.partition("/")[2], [part[key] for part in named]
            if tensor_parallel.split_of(name, model) is None and not all(torch.equal(shards[0], s) for s in shards):
                raise UserError(f"{ckpt}: the tensor-parallel ranks hold different copies of {key}, which every "
                                "rank keeps whole: the checkpoint is inconsistent")
            tensors[key] = _own(tensor_parallel.gather(name, shards, model))
        return tensors, parts[0][1]
    tensors: dict[str, torch.Tensor] = {}
    for part in named:
        for key, t in part.items():
            if key in tensors and not torch.equal(tensors[key], t):  # the tied embedding's two copies
                raise UserError(f"{ckpt}: the pipeline stages hold different copies of {key} (the tied "
                                "embedding): the checkpoint is inconsistent")
            tensors.setdefault(key, _own(t))
    return tensors, parts[0][1]


def _own(t: torch.Tensor) -> torch.Tensor:
    """`t` with a storage of its own: a view into a larger buffer (a merged flat group, a
    loaded checkpoint's flat state) is copied, a tensor that already owns its storage is
    not, so the layout-free tensors never hold a model's worth twice."""
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


def _zero_partitions(ckpt: Path, mp: int | None, kinds) -> tuple[dict[str, torch.Tensor], int | None]:
    """From ZeRO optimizer partitions (all of them, or one model-parallel rank's): each kind
    of tensor is merged the way zero_to_fp32 merges the fp32 masters."""
    from deepspeed.utils import zero_to_fp32 as z

    if mp is None:
        with _quiet():
            model_states = z.parse_model_states(z.get_model_state_files(str(ckpt)))
        pattern = "*zero_pp_rank_*_optim_states.pt"
    else:
        # A pipeline stage's model file carries no module weights (they are in layer_NN files),
        # which parse_model_states reads for buffers; GPT has none, so the record is built
        # from the file's parameter shapes directly (ZeRO-3 keeps one model file per rank).
        meta_file = ckpt / f"mp_rank_{mp:02d}_model_states.pt"
        if not meta_file.is_file():
            meta_file = ckpt / f"zero_pp_rank_0_mp_rank_{mp:02d}_model_states.pt"
        meta = torch.load(meta_file, map_location="cpu", weights_only=False)
        model_states = [z.zero_model_state(buffers={}, param_shapes=meta["param_shapes"],
                                           shared_params=list(meta["shared_params"].items()),
                                           ds_version=meta.get("ds_version"),
                                           frozen_param_shapes=meta.get("frozen_param_shapes"),
                                           frozen_param_fragments=meta.get("frozen_param_fragments"))]
        pattern = f"*zero_pp_rank_*_mp_rank_{mp:02d}_optim_states.pt"
    files = sorted((str(p) for p in ckpt.glob(pattern)), key=z.natural_keys)
    flats: dict[str, list] = {k: [] for k in kinds}
    step_states = []
    for f in files:
        sd = torch.load(f, map_location="cpu", mmap=True, weights_only=False)["optimizer_state_dict"]
        zero_stage = int(sd["zero_stage"])
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
        with _quiet():
            if zero_stage <= 2:
                merged = z._get_fp32_state_dict_from_zero2_checkpoint(len(files), flats[kind], model_states, False,
                                                                      paddings)
            else:
                merged = z.to_torch_tensor(z._get_fp32_state_dict_from_zero3_checkpoint(
                    len(files), flats[kind], model_states, False))
        # Each parameter copied out of the merged flat group now, so that one kind's merged
        # groups at a time are in memory, not all three kinds' next to the copies.
        out.update({f"{kind}/{k}": _own(v) for k, v in merged.items()})
        del merged
    return out, (_step_of(step_states) if len(kinds) > 1 else None)


def _zero0(ckpt: Path, mp: int, kinds, pipeline_weights: dict | None) -> tuple[dict[str, torch.Tensor], int | None]:
    """From a ZeRO-0 checkpoint: the module weights (a pipeline's, already read, else
    model-parallel rank `mp`'s), or with moments the client optimizer's state by the names
    megatrain recorded in its parameter order."""
    model_file = ckpt / f"mp_rank_{mp:02d}_model_states.pt"

    def module_weights():
        if pipeline_weights is not None:
            return pipeline_weights
        return torch.load(model_file, map_location="cpu", weights_only=False)["module"]

    if len(kinds) == 1:
        return {f"param/{k}": v for k, v in module_weights().items()}, None
    opt = torch.load(model_file, map_location="cpu", weights_only=False)["optimizer"]
    names = _recorded_names(ckpt, mp)
    if "fp32_groups" in opt:  # bf16: DeepSpeed's fp32 copies are the masters
        states = opt["optimizer_state_dict"]["state"]
        masters = [t for group in opt["fp32_groups"] for t in group]
        out = {f"param/{n}": t for n, t in zip(names, masters, strict=True)}
    else:
        states = opt["state"]
        out = {f"param/{k}": v for k, v in module_weights().items()}
    for i, name in enumerate(names):
        for kind in MOMENTS:
            out[f"{kind}/{name}"] = states[i][kind]
    return out, _step_of(states[i] for i in range(len(names)))


def _pipeline_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    """Every stage's module weights, by the pipeline's layer-indexed names."""
    weights = {}
    for f in sorted(ckpt.glob("layer_*-model_states.pt")):
        layer = int(re.match(r"layer_(\d+)", f.name).group(1))
        for name, t in torch.load(f, map_location="cpu", weights_only=False).items():
            weights[f"{layer}.{name}"] = t
    return weights


def _recorded_names(ckpt: Path, mp: int) -> list[str]:
    for f in sorted(ckpt.glob("megatrain-rank*.pt")):
        record = torch.load(f, map_location="cpu", weights_only=False).get("optimizer_params")
        if record is not None and record["mp_rank"] == mp:
            return [n for group in record["groups"] for n in group]
    raise UserError(f"{ckpt}: its ZeRO-0 optimizer state has no parameter names (written before megatrain "
                    "recorded them): resume it on the layout that wrote it")


@contextlib.contextmanager
def _quiet():
    """zero_to_fp32 narrates its progress on stdout and stderr."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield


# --- the file ----------------------------------------------------------------------------


def _manifest_sha(ckpt: Path) -> str:
    return file_sha256(ckpt / MANIFEST)


def write(ckpt: Path) -> Path:
    """CKPT/layout-free.safetensors from the checkpoint's own files (under a temporary name,
    renamed when complete), then listed in the checkpoint's manifest, so that a checkpoint's
    verification covers it; a conversion interrupted at any point leaves no file that a
    resume would use."""
    ckpt = Path(ckpt)
    tensors, step = read(ckpt)
    out = ckpt / FILE
    meta = {"format": FORMAT, "optimizer_step": str(step), "checkpoint_manifest": _manifest_sha(ckpt)}
    save_safetensors_atomically(out, tensors, meta)
    manifest = json.loads((ckpt / MANIFEST).read_text())
    manifest["files"][FILE] = {"bytes": out.stat().st_size, "sha256": file_sha256(out)}
    write_atomically(ckpt / MANIFEST, json.dumps(manifest, indent=1))
    return out


def usable(ckpt: Path) -> bool:
    """The checkpoint has a complete layout-free file (listed in its manifest: written to the end)."""
    manifest = json.loads((Path(ckpt) / MANIFEST).read_text())
    return FILE in manifest["files"] and (Path(ckpt) / FILE).is_file()


def ensure(ckpt: Path) -> tuple[Path, bool]:
    """Collective: the checkpoint's layout-free file, written by rank 0 if it has none yet;
    (path, whether it was converted now)."""
    from megatrain.train import distributed as dist

    # Rank 0 alone decides: another rank looking after rank 0 finished would see the file.
    converted = dist.is_main() and not usable(ckpt)
    if converted:
        write(ckpt)
    converted = dist.any_rank([converted])[0]  # also the barrier after the write
    return Path(ckpt) / FILE, converted


# --- loading into a live engine ------------------------------------------------------------


def load_into(module, path: Path) -> int:
    """Every rank: set the master weights, the model's weights and (when the file has them)
    the moments of `module`'s engine (any layout) from a layout-free file; returns the
    optimizer step count. A file of weights alone leaves the optimizer as new."""
    from safetensors import safe_open

    engine, opt = module.engine, module.engine.optimizer
    n_layer = module.n_layer
    with safe_open(str(path), "pt") as f:
        step = int(f.metadata()["optimizer_step"])
        named = [(canonical_name(n, n_layer) if module.pipeline else n, p) for n, p in engine.module.named_parameters()]
        moments = MOMENTS if f"{MOMENTS[0]}/{named[0][0]}" in f.keys() else ()

        def full(kind: str, name: str) -> torch.Tensor:
            """The parameter as this rank holds it whole: under tensor parallelism its shard."""
            return tensor_parallel.shard(name, f.get_tensor(f"{kind}/{name}"), module.tp_rank, module.tp_size,
                                         module.model_cfg)

        with torch.no_grad():
            if hasattr(opt, "fp32_partitioned_groups_flat"):  # ZeRO-3
                _load_zero3(opt, module.base_optimizer, named, full, step, moments)
            elif any(getattr(p, "_hp_mapping", None) is not None for _, p in named):  # ZeRO-1/2
                _load_zero12(opt, module.base_optimizer, named, full, step, moments)
            else:  # ZeRO-0: whole parameters, masters either the model's own or DeepSpeed's fp32 copies
                masters = {}
                if hasattr(opt, "fp32_groups") and hasattr(opt, "fp16_groups"):
                    masters = {id(lp): hp for lps, hps in zip(opt.fp16_groups, opt.fp32_groups, strict=True)
                               for lp, hp in zip(lps, hps, strict=True)}
                for name, p in named:
                    p.copy_(full("param", name))
                    hp = masters.get(id(p), p)
                    hp.copy_(full("param", name))
                    if moments:
                        state = _adam_state(module.base_optimizer, hp, step)
                        for kind in moments:
                            state[kind].copy_(full(kind, name))
    return step


def _load_zero12(opt, base, named, full, step: int, moments) -> None:
    if moments:
        for flat in opt.single_partition_of_fp32_groups:
            _adam_state(base, flat, step)
        opt._hp_optimizer_states_linked = False  # link each parameter's fragment to the new state tensors
        opt._lazy_init_hp_params_optimizer_state()
    for name, p in named:
        p.copy_(full("param", name))  # every rank holds whole model weights
        if p._hp_mapping is not None:
            p.set_full_hp_param(full("param", name))
            for kind in moments:
                p.set_full_hp_param(full(kind, name), kind)


def _load_zero3(opt, base, named, full, step: int, moments) -> None:
    for flat in opt.fp32_partitioned_groups_flat if moments else ():
        _adam_state(base, flat, step)
    for name, p in named:
        opt.set_full_hp_param(full("param", name), p)
        for kind in moments:
            opt.set_full_hp_param(full(kind, name), p, kind)
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
    group = next((g for g in base.param_groups if any(p is tensor for p in g["params"])), base.param_groups[0])
    if "step" in group:  # DeepSpeed's FusedAdam counts steps per group
        group["step"] = step
    else:  # FusedAdamWClip, torch's AdamW: a float tensor (on the device when the kernel is fused)
        device = tensor.device if group.get("fused") or not isinstance(base, torch.optim.AdamW) else "cpu"
        state["step"] = torch.tensor(float(step), dtype=torch.float32, device=device)
    return state
