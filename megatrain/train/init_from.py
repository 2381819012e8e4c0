"""Starting a new run from trained weights (`model.init_from`): continued pretraining.

The source is a megatrain checkpoint of any layout (or a run directory: its newest
intact checkpoint), a consolidated .safetensors file (launch/convert_checkpoint.py), or
a Hugging Face directory of GPT2LMHeadModel, LlamaForCausalLM or Qwen3ForCausalLM
(megatrain/model/hf.py), read offline. The run gets the source's model shape; its step
counter, optimizer state and schedules start afresh unless `optim.init_from_state`
(the AdamW moments and step count of a megatrain checkpoint) or `schedule.init_from:
keep` (its steps and tokens, so LR and batch continue) say otherwise.

    source = open_source("runs/base")      # every rank: the shape (a checkpoint: its checksums, in shares)
    model_cfg = model_config(cfg, source, data_vocab, data_tokenizer)
    write_start(source, model_cfg, path, moments=True)      # every rank: its share of the layout-free form
    layout_free.load_into(module, path)                       # every rank takes its slices

Vocabulary: the source must have the data's tokenizer (the same tokenizer hash where the
source records one, else the same size). `model.init_from_vocab: resize` takes a source of
another vocabulary anyway: the embedding (and an untied head) keep the rows they share
and new rows start as the mean of the source's rows (Hewitt 2021: a new token then
predicts like an average one instead of at random).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from megatrain.config import Config
from megatrain.errors import UserError
from megatrain.files import Deferred, read_deferred_tensors
from megatrain.model import GPT, GPTConfig, hf
from megatrain.model.gpt import SHAPE
from megatrain.train import convert, layout_free
from megatrain.train.checkpoint import Checkpointer

# model.* keys that are the source's to say; one set in the config must agree.
SHAPE_KEYS = tuple(k for k in SHAPE if k not in ("vocab_size", "seq_len"))
VOCAB_ROWS = ("embed.wte.weight", "head.lm_head.weight")


@dataclass
class Source:
    path: Path
    kind: str  # "checkpoint" | "consolidated" | "huggingface"
    shape: dict  # GPTConfig.shape()
    tokenizer_sha256: str | None = None  # the tokenizer its ids are from, where recorded
    progress: dict | None = None  # a checkpoint's {"step", "tokens"}

    def describe(self) -> str:
        return {
            "checkpoint": "megatrain checkpoint",
            "consolidated": "consolidated file",
            "huggingface": "Hugging Face model",
        }[self.kind] + f" {self.path}"


def open_source(path: str | Path, verify: bool = True) -> Source:
    """What `path` is and the model it holds (reads metadata and, with `verify`, checks a
    checkpoint's checksums: collective, every rank calls it)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file or directory (model.init_from)")
    if path.is_file():
        meta = _safetensors_meta(path)
        if meta.get("format") != convert.FORMAT:
            raise UserError(
                f"{path}: not a consolidated megatrain checkpoint (launch/convert_checkpoint.py writes them)"
            )
        return Source(
            path,
            "consolidated",
            GPTConfig(**json.loads(meta["config"])).shape(),
            meta.get("tokenizer_sha256"),
        )
    if (path / "config.json").is_file():
        return Source(path, "huggingface", hf.read_hf_shape(path), hf.read_hf_tokenizer_sha(path))
    if not any((path / name).exists() for name in ("checkpoints", "megatrain.json", "manifest.json")):
        raise UserError(
            f"{path}: neither a megatrain run or checkpoint directory nor a Hugging Face model directory "
            "(no config.json) (model.init_from)"
        )
    # A checkpoint, or a run directory's newest intact one. Collective under torch.distributed:
    # every rank hashes its share of the files.
    ckpt, verified = convert.checkpoint_of(path) if verify else (Checkpointer(path, 1).latest() or path, True)
    problem = None if verified else Checkpointer.verify_collectively(ckpt)
    if problem:
        raise UserError(f"{ckpt}: not a complete checkpoint: {problem}")
    state = Checkpointer.read_state(ckpt)
    progress = state["state"]["progress"]
    return Source(
        ckpt,
        "checkpoint",
        GPTConfig.from_shape(state["model_shape"]).shape(),
        convert.tokenizer_of(state),
        {"step": progress["step"], "tokens": progress["tokens"]},
    )


def _safetensors_meta(path: Path) -> dict:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise UserError(f"{path}: not a safetensors file ({e})") from None


def model_config(cfg: Config, source: Source, data_vocab: int, data_tokenizer: str | None) -> GPTConfig:
    """The run's model: the source's shape, with the run's vocabulary and context. Sets
    cfg.model's shape keys to the source's (config.yaml then says what trains); refuses a
    config that sets one otherwise, a vocabulary that is not the data's (unless resized),
    and options the source cannot serve."""
    m, where = cfg.model, f"model.init_from={source.path}"
    theirs = GPTConfig.from_shape(source.shape).shape()  # a shape written before a key existed: its default
    if upcycling(theirs, cfg.model.moe.experts):
        _check_upcycling(cfg, theirs, where)
        theirs.update(
            {k: _get(m, k) for k in SHAPE_KEYS if k.startswith("moe_")}, moe_ffn_hidden=theirs["ffn_hidden"]
        )
    for key in SHAPE_KEYS:
        ours = _get(m, key)
        if f"model.{_config_key(key)}" in cfg.explicit_keys and ours is not None and ours != theirs[key]:
            raise UserError(
                f"{where}: model.{_config_key(key)} is {ours} in the config, {theirs[key]} in the source; "
                "leave it out (the source sets the shape) or start from another source"
            )
    if source.kind != "checkpoint" and cfg.optim.init_from_state:
        raise UserError(
            f"{where}: optim.init_from_state needs a megatrain checkpoint (a {source.describe()} has no "
            "optimizer state)"
        )
    if source.kind != "checkpoint" and cfg.schedule.init_from == "keep":
        raise UserError(
            f"{where}: schedule.init_from=keep needs a megatrain checkpoint (a {source.describe()} has "
            "no schedule position)"
        )
    if theirs["arch"] == "gpt3" and cfg.train.seq_len > theirs["seq_len"]:
        raise UserError(
            f"{where}: the source has learned positions for {theirs['seq_len']} tokens, "
            f"train.seq_len={cfg.train.seq_len} is longer"
        )
    vocab = _vocab(cfg, source, data_vocab, data_tokenizer)
    for key in SHAPE_KEYS:
        _set(m, key, theirs[key])
    m.vocab_size = vocab
    for key, message in cfg.parallel.shape_problems(cfg):  # the layout against the source's shape
        raise UserError(f"{where}: with the source's shape, {key} {message}")
    return GPTConfig.from_config(cfg, vocab)


def upcycling(source_shape: dict, experts: int) -> bool:
    """A dense source for a model with experts (Komatsuzaki et al. 2023, "Sparse Upcycling"):
    each MoE block's experts start as copies of the source's MLP, the router from the seed."""
    return not source_shape.get("moe_experts") and experts > 0


def _check_upcycling(cfg: Config, theirs: dict, where: str) -> None:
    moe = cfg.model.moe
    for problem, bad in (
        (
            f"model.moe.ffn_hidden={moe.ffn_hidden} is not the source's MLP width ({theirs['ffn_hidden']})",
            moe.ffn_hidden not in (None, theirs["ffn_hidden"]),
        ),
        ("model.moe.shared_experts has nothing to start from", moe.shared_experts > 0),
        ("the source's MLP has biases, experts have none", theirs["bias"]),
        ("optim.init_from_state: a dense source has no moments for the router", cfg.optim.init_from_state),
    ):
        if bad:
            raise UserError(f"{where}: upcycling to {moe.experts} experts: {problem}")


def upcycle(tensors: dict[str, Deferred], model_cfg: GPTConfig) -> dict[str, Deferred]:
    """A dense model's weights for `model_cfg`'s experts: each MoE block's dense MLP copied into
    every expert, its router drawn from (seed, name) as a fresh model's."""
    from megatrain.model.gpt import initial_value

    out = dict(tensors)
    E = model_cfg.moe_experts
    for i in model_cfg.moe_blocks:
        for part in ("fc", "proj"):
            d = out.pop(f"param/blocks.{i}.mlp.{part}.weight")
            out[f"param/blocks.{i}.mlp.experts.{part}"] = Deferred(
                (E, *d.shape), d.dtype, functools.partial(_repeated, d, E)
            )
        router = f"blocks.{i}.mlp.router.weight"
        shape = (E, model_cfg.d_model)
        out[f"param/{router}"] = Deferred(
            shape, torch.float32, functools.partial(initial_value, router, shape, model_cfg)
        )
    return out


def _repeated(d: Deferred, times: int) -> torch.Tensor:
    return d.make()[None].expand(times, *d.shape).clone()


def _config_key(shape_key: str) -> str:
    """The model section's key of a shape key: moe_experts is model.moe.experts."""
    return shape_key.replace("moe_", "moe.", 1)


def _get(model_section, shape_key: str):
    section, _, key = _config_key(shape_key).rpartition(".")
    return getattr(getattr(model_section, section) if section else model_section, key)


def _set(model_section, shape_key: str, value) -> None:
    section, _, key = _config_key(shape_key).rpartition(".")
    setattr(getattr(model_section, section) if section else model_section, key, value)


def _vocab(cfg: Config, source: Source, data_vocab: int, data_tokenizer: str | None) -> int:
    """The run's vocabulary size; refuses one that does not match the source's (unless
    resized). Without both tokenizer hashes to compare, only equal sizes count as a match;
    with the same tokenizer on record, the source's table may be padded beyond it."""
    theirs = source.shape["vocab_size"]
    if cfg.model.init_from_vocab == "resize":
        return cfg.model.vocab_size or data_vocab
    wanted = cfg.model.vocab_size or theirs
    known = bool(source.tokenizer_sha256 and data_tokenizer)
    if known and source.tokenizer_sha256 != data_tokenizer:
        theirs_hash, ours_hash = source.tokenizer_sha256[:12], data_tokenizer[:12]
        what = f"was made with another tokenizer ({theirs_hash}) than the data's ({ours_hash})"
    elif theirs != wanted or theirs < data_vocab or (not known and theirs != data_vocab):
        what = f"has {theirs} tokens, the run {wanted} (the data's tokenizer: {data_vocab})"
    else:
        return wanted
    raise UserError(
        f"model.init_from={source.path}: its vocabulary {what}; model.init_from_vocab=resize starts from "
        "it anyway (shared rows kept, new rows the mean embedding)"
    )


def write_start(source: Source, model_cfg: GPTConfig, out: Path, moments: bool) -> Path:
    """Collective: the run's starting weights (and, with `moments`, the source's AdamW
    state) in the layout-free form, which any layout loads (layout_free.load_into). Every
    rank reads the source one tensor at a time and writes its share of the file
    (layout_free.write_shared); a failure on any rank raises on every rank."""
    from megatrain.train import distributed as dist

    tensors, step = dist.on_every_rank(lambda: _start_tensors(source, model_cfg, moments))
    layout_free.write_shared(
        out,
        tensors,
        {"format": layout_free.FORMAT, "optimizer_step": str(step)},
        progress=f"model.init_from to {out.name}",
    )
    return out


def _start_tensors(source: Source, model_cfg: GPTConfig, moments: bool) -> tuple[dict[str, Deferred], int]:
    """The source's tensors made to fit the run, by layout-free key (each made when it is
    written), and the optimizer step count they come with."""
    step = 0
    if source.kind == "checkpoint":
        tensors, saved_step = layout_free.read_deferred(source.path, moments=moments)
        step = saved_step if moments else 0
    elif source.kind == "consolidated":
        tensors = {f"param/{k}": d for k, d in read_deferred_tensors(source.path).items()}
    else:
        tensors = {
            f"param/{k}": d
            for k, d in hf.hf_weights_deferred(source.path, GPTConfig.from_shape(source.shape)).items()
        }
    tensors = fit(tensors, model_cfg)
    if upcycling(source.shape, model_cfg.moe_experts):
        tensors = upcycle(tensors, model_cfg)
    with torch.device("meta"):
        expected = dict(GPT(model_cfg, init_weights=False).named_parameters())
    kinds = layout_free.KINDS if moments else layout_free.KINDS[:1]
    for name, p in expected.items():
        for kind in kinds:
            d = tensors.get(f"{kind}/{name}")
            if d is None or d.shape != tuple(p.shape):
                raise UserError(
                    f"{source.path}: {kind}/{name} is "
                    + ("missing" if d is None else f"{list(d.shape)}, the model needs {list(p.shape)}")
                )
    return {f"{kind}/{name}": tensors[f"{kind}/{name}"] for name in expected for kind in kinds}, step


def fit(tensors: dict[str, Deferred], model_cfg: GPTConfig) -> dict[str, Deferred]:
    """Source tensors made to fit the run: the vocabulary rows resized (new rows of weights:
    the mean row; of moments: zero), learned positions cut to the run's context."""
    out = {}
    for key, d in tensors.items():
        shape = _fitted(key, torch.empty(d.shape, dtype=d.dtype, device="meta"), model_cfg).shape
        out[key] = Deferred(tuple(shape), d.dtype, functools.partial(_fitted_made, key, d, model_cfg))
    return out


def _fitted_made(key: str, d: Deferred, model_cfg: GPTConfig) -> torch.Tensor:
    return _fitted(key, d.make(), model_cfg)


def _fitted(key: str, t: torch.Tensor, model_cfg: GPTConfig) -> torch.Tensor:
    kind, _, name = key.partition("/")
    if name in VOCAB_ROWS and t.shape[0] != model_cfg.vocab_size:
        rows = min(t.shape[0], model_cfg.vocab_size)
        fill = t.mean(0, keepdim=True) if kind == "param" else torch.zeros_like(t[:1])
        return torch.cat([t[:rows], fill.expand(model_cfg.vocab_size - rows, -1)])
    if name == "embed.positions.wpe.weight":
        return t[: model_cfg.seq_len]
    return t
