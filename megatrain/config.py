"""The run configuration: a YAML file plus dotted overrides, validated into dataclasses.

    cfg = load_config("configs/tiny-cpu.yaml", ["train.max_steps=50", "parallel.zero_stage=3"])

Every key is a field below, documented where it is defined. Unknown keys and wrong
types fail with the dotted key, where it came from (file or --set) and the closest
valid key. `deepspeed_config` turns a Config into DeepSpeed's JSON.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from megatrain.errors import UserError


@dataclass
class RunConfig:
    dir: str = "runs/default"
    """Run directory: config.yaml, metrics.jsonl, events.jsonl, checkpoints/, latest, curves.png."""
    name: str | None = None
    """Run name for wandb and the console; defaults to the run directory's name."""
    seed: int = 1234
    """Seeds the model initialisation, the data order and dropout."""


@dataclass
class ModelConfig:
    n_layer: int = 12
    """Transformer blocks."""
    n_head: int = 12
    """Attention heads; must divide d_model."""
    d_model: int = 768
    """Width of the residual stream (GPT-3's d_model)."""
    vocab_size: int | None = None
    """Vocabulary size; None takes the tokenizer's from the data manifest."""
    dropout: float = 0.0
    """Dropout on embeddings, attention and residuals. GPT-3-scale pretraining uses none."""
    bias: bool = True
    """Biases in linear layers and LayerNorms, as in GPT-2/3."""
    init_std: float = 0.02
    """Standard deviation of the GPT-2 initialisation."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in the backward pass (saves memory, costs ~1/3 more compute)."""


@dataclass
class DataConfig:
    path: str | list = ""
    """A directory made by launch/prepare_data.py, or a blend: a list of {path: DIR, weight: W}."""
    valid_path: str | None = None
    """Where validation samples come from; None: the valid/ split of the first data path."""
    seed: int | None = None
    """Seeds the sample order and the blend; None uses run.seed."""
    skip: list = field(default_factory=list)
    """[[position, samples], ...]: when the global sample position reaches `position` (at a
    step boundary), jump `samples` ahead: batches to leave out, e.g. those around a loss
    spike (the spike guard does this by itself; this is the manual form)."""


@dataclass
class TrainConfig:
    seq_len: int = 2048
    """Tokens per sample (the model's context length)."""
    micro_batch: int = 1
    """Samples per rank per forward/backward."""
    max_steps: int | None = None
    """Stop after this many optimizer steps (None: no limit). At least one of max_steps/max_tokens is needed."""
    max_tokens: int | None = None
    """Stop once this many tokens were consumed (None: no limit)."""
    precision: Literal["bf16", "bf16-autocast", "fp16", "fp32"] = "bf16"
    """bf16: the model in bf16, fp32 master weights in the optimizer (DeepSpeed's bf16 mode,
    as Megatron-LM); bf16-autocast: fp32 weights, matmuls in bf16 through torch.autocast
    (DeepSpeed's torch_autocast); fp16: with dynamic loss scaling, GPU only; fp32."""
    eval_every: int = 100
    """Optimizer steps between validation passes (0: only at the end)."""
    eval_samples: int = 64
    """Validation samples per pass (the same samples every time), split across ranks."""
    log_every: int = 1
    """Optimizer steps between console updates (metrics.jsonl gets every step)."""
    peak_flops: float | None = None
    """Peak FLOP/s of one device for MFU; None measures a matmul once at start."""


@dataclass
class OptimConfig:
    name: Literal["fused_adamw", "torch_adamw", "adamw"] = "fused_adamw"
    """fused_adamw: megatrain's fused AdamW + global-norm clip kernel (csrc/); torch_adamw:
    torch.optim.AdamW; adamw: DeepSpeed's stock FusedAdam (its CPU kernel recomputes beta^t
    differently after a resume, so resumed losses can differ in the last bits). The last
    two clip through DeepSpeed."""
    lr: float = 6.0e-4
    """Peak learning rate."""
    betas: list = field(default_factory=lambda: [0.9, 0.95])
    """AdamW betas (GPT-3: 0.9, 0.95)."""
    eps: float = 1.0e-8
    """AdamW epsilon."""
    weight_decay: float = 0.1
    """Decoupled weight decay; not applied to biases, norms or embeddings."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0: no clipping)."""


@dataclass
class ScheduleConfig:
    """Learning rate and global batch as functions of tokens consumed (GPT-3 appendix B)."""

    warmup_tokens: int = 375_000_000
    """Linear warmup from 0 to optim.lr over this many tokens (GPT-3: 375M)."""
    decay_tokens: int = 260_000_000_000
    """The learning rate reaches min_lr_ratio x optim.lr here and stays there (GPT-3: 260B)."""
    min_lr_ratio: float = 0.1
    """Floor of the decay, as a fraction of the peak (GPT-3: 10%)."""
    lr_shape: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay shape between warmup and decay_tokens; constant keeps the peak after warmup."""
    batch_final_tokens: int = 524288
    """The global batch in tokens (GPT-3 Table 2.1), rounded down to a whole number of
    micro_batch x seq_len x data-parallel ranks, never below one micro batch per rank."""
    batch_start_tokens: int = 32768
    """Global batch at the start of the ramp (GPT-3: 32K tokens)."""
    batch_ramp_tokens: int = 0
    """The batch grows linearly from batch_start_tokens to batch_final_tokens over this many
    tokens (GPT-3: 4-12B by model size); 0: no ramp."""
    batch_steps: list | None = None
    """Instead of the ramp, [[tokens, batch_tokens], ...] starting at 0 tokens: from each token
    count on, that global batch (Megatron's step schedule)."""


@dataclass
class ParallelConfig:
    zero_stage: int = 0
    """DeepSpeed ZeRO stage: 0 (plain data parallel), 1 (optimizer states sharded),
    2 (+ gradients), 3 (+ parameters). With a pipeline, 0 or 1."""
    pipeline_stages: int = 1
    """Pipeline stages P (1: no pipeline). The world is P stages x world/P data-parallel ranks."""
    partition_method: Literal["parameters", "uniform", "blocks"] = "parameters"
    """How layers are cut into stages: balanced by parameter count, by layer count, or by
    transformer blocks only."""
    activation_checkpoint_interval: int = 0
    """With a pipeline: recompute activations every this many layers in the backward pass
    (0: none; model.activation_checkpointing sets 1)."""


@dataclass
class CheckpointConfig:
    every_steps: int = 1000
    """Optimizer steps between checkpoints (0: only at the end)."""
    keep: int = 3
    """Complete checkpoints kept; older ones are deleted once a newer one is published."""


@dataclass
class SpikeConfig:
    """The spike guard: rolls the run back and skips data when the loss spikes (PaLM 5.1)."""

    enabled: bool = True
    """Watch for spikes and recover from them."""
    watch: list = field(default_factory=lambda: ["loss"])
    """Signals compared with their recent history: "loss" and/or "grad_norm". The gradient norm
    jumps early in training while the loss falls smoothly, so it is not watched by default. A
    non-finite loss or norm is always a spike, watched or not."""
    stats: Literal["median_mad", "mean_std"] = "median_mad"
    """Baseline and spread: median and MAD (robust to the spikes themselves), or mean and std."""
    window: int = 100
    """Steps of history the baseline is taken over."""
    min_history: int = 20
    """Steps of history needed before a value is judged (non-finite values always are)."""
    threshold: float = 6.0
    """A value is above the baseline when it exceeds it by this many spreads (MADs are scaled
    by 1.4826 to compare with standard deviations)."""
    patience: int = 1
    """Consecutive steps above the threshold that make a spike; the spike began at the first."""
    skip: int = 200
    """Data skipped after a rollback, counted from the rollback point, in `skip_unit`s; always
    at least up to the end of the spike (PaLM skipped 200-500 batches)."""
    skip_unit: Literal["batches", "tokens"] = "batches"
    """batches: global batches at the batch size of the spike; tokens: tokens."""
    max_rollbacks: int = 5
    """Rollbacks allowed in a run; one more spike stops it (with a checkpoint, exit code 3)."""
    snapshot_every: int = 50
    """Optimizer steps between in-memory rollback points (model, optimizer, schedule, sampler)."""
    snapshots: int = 3
    """Rollback points kept in host memory (0: roll back to disk checkpoints only)."""


@dataclass
class LoggingConfig:
    wandb: bool = False
    """Log to Weights & Biases (rank 0 only), offline unless WANDB_MODE says otherwise."""
    wandb_project: str = "megatrain"
    """wandb project name."""
    progress: bool = True
    """A progress bar on rank 0's console."""


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    spike: SpikeConfig = field(default_factory=SpikeConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    deepspeed: dict = field(default_factory=dict)
    """Raw DeepSpeed JSON merged on top of the generated config, for experts."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def model_hash(self) -> str:
        """Identifies what a checkpoint's weights mean: model shape and sequence length."""
        shape = {**dataclasses.asdict(self.model), "seq_len": self.train.seq_len}
        shape.pop("dropout"), shape.pop("activation_checkpointing")
        return hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()[:16]


# --- loading and validation ----------------------------------------------------------

def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _all_keys(cls, prefix: str = "") -> list[str]:
    keys = []
    for name, tp in _hints(cls).items():
        keys.append(prefix + name)
        if dataclasses.is_dataclass(tp):
            keys.extend(_all_keys(tp, f"{prefix}{name}."))
    return keys


def _closest(key: str) -> str:
    """The valid key a typo most likely meant: a close sibling, the same name under
    another section (train.lr -> optim.lr), or the closest dotted key."""
    keys = _all_keys(Config)
    section, _, leaf = key.rpartition(".")
    siblings = [k for k in keys if k.rpartition(".")[0] == section]
    by_leaf = {k.rpartition(".")[2]: k for k in siblings}
    match = [by_leaf[m] for m in difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.6)]
    match = match or [k for k in keys if k.rpartition(".")[2] == leaf][:1]
    match = match or difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
    return f" (did you mean '{match[0]}'?)" if match else ""


def _type_name(tp) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp, key: str, source: str) -> Any:
    """Check `value` against the annotation `tp`; numbers written as strings ("6e-4",
    which YAML reads as a string) are accepted for numeric fields."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, key, source)
            except UserError:
                continue
        raise _type_error(value, tp, key, source)
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise _type_error(value, tp, key, source)
    if tp is type(None):
        if value is None:
            return None
        raise _type_error(value, tp, key, source)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _type_error(value, tp, key, source)
    if tp in (int, float):
        number = value
        if isinstance(value, str):
            try:
                number = float(value.replace("_", ""))
            except ValueError:
                raise _type_error(value, tp, key, source) from None
        if isinstance(number, bool) or not isinstance(number, (int, float)):
            raise _type_error(value, tp, key, source)
        if tp is int:
            if float(number) != int(number):
                raise _type_error(value, tp, key, source)
            return int(number)
        return float(number)
    if tp in (str, list, dict):
        if isinstance(value, tp):
            return value
        raise _type_error(value, tp, key, source)
    raise TypeError(f"unsupported config annotation {tp} for {key}")


def _type_error(value, tp, key, source) -> UserError:
    return UserError(f"{source}: {key} must be {_type_name(tp)}, got {type(value).__name__} {value!r}")


def _source_of(key: str, sources: dict) -> str:
    """Where a key came from: its --set override (or one below it), else the file."""
    if key in sources:
        return sources[key]
    return next((s for k, s in sources.items() if k.startswith(key + ".")), sources[""])


def _build(cls, raw: dict, prefix: str, sources: dict) -> Any:
    if not isinstance(raw, dict):
        section = prefix.rstrip(".")
        raise UserError(f"{_source_of(section, sources)}: {section} must be a mapping, got {type(raw).__name__}")
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for name, value in raw.items():
        key = prefix + str(name)
        source = _source_of(key, sources)
        if name not in names:
            raise UserError(f"{source}: unknown key '{key}'{_closest(key)}")
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value if value is not None else {}, key + ".", sources)
        else:
            kwargs[name] = _coerce(value, tp, key, source)
    return cls(**kwargs)


def _set_dotted(raw: dict, key: str, value: Any) -> None:
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Read a YAML file (or start from defaults when path is None), apply `key=value`
    overrides (values parsed as YAML), validate."""
    source = str(path) if path else "<defaults>"
    raw: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"{p}: no such config file")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise UserError(f"{p}: invalid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(raw, dict):
            raise UserError(f"{p}: the config must be a mapping of sections, not {type(raw).__name__}")
    sources = {"": source}
    for item in overrides:
        if "=" not in item:
            raise UserError(f"--set {item}: expected KEY=VALUE, e.g. train.max_steps=50")
        key, text = item.split("=", 1)
        key = key.strip()
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            value = text
        _set_dotted(raw, key, value)
        sources[key] = f"--set {key}"
    cfg = _build(Config, raw, "", sources)
    validate(cfg, source)
    return cfg


def validate(cfg: Config, source: str = "<config>") -> None:
    """Checks across fields (types were checked while loading)."""

    def need(ok: bool, key: str, msg: str):
        if not ok:
            raise UserError(f"{source}: {key} {msg}")

    m, t = cfg.model, cfg.train
    for key, value in (("model.n_layer", m.n_layer), ("model.n_head", m.n_head), ("model.d_model", m.d_model),
                       ("train.seq_len", t.seq_len), ("train.micro_batch", t.micro_batch),
                       ("schedule.batch_final_tokens", cfg.schedule.batch_final_tokens),
                       ("schedule.batch_start_tokens", cfg.schedule.batch_start_tokens)):
        need(value > 0, key, f"must be positive, got {value}")
    need(m.d_model % m.n_head == 0, "model.d_model", f"({m.d_model}) must be divisible by model.n_head ({m.n_head})")
    need(0.0 <= m.dropout < 1.0, "model.dropout", f"must be in [0, 1), got {m.dropout}")
    need(m.vocab_size is None or m.vocab_size > 0, "model.vocab_size", "must be positive")
    need(t.max_steps is not None or t.max_tokens is not None, "train.max_steps",
         "or train.max_tokens must be set (otherwise the run never ends)")
    need(t.eval_every >= 0 and t.eval_samples >= 0, "train.eval_every", "and train.eval_samples must be >= 0")
    par = cfg.parallel
    need(par.zero_stage in (0, 1, 2, 3), "parallel.zero_stage", f"must be 0, 1, 2 or 3, got {par.zero_stage}")
    need(par.pipeline_stages >= 1, "parallel.pipeline_stages", f"must be >= 1, got {par.pipeline_stages}")
    need(par.pipeline_stages == 1 or par.zero_stage <= 1, f"parallel.zero_stage={par.zero_stage}",
         f"cannot be combined with parallel.pipeline_stages={par.pipeline_stages}: DeepSpeed's "
         "pipeline engine supports ZeRO-1 at most (it would partition gradients the pipeline schedule still needs); "
         "use parallel.zero_stage=1")
    need(par.activation_checkpoint_interval >= 0, "parallel.activation_checkpoint_interval", "must be >= 0")
    need(len(cfg.optim.betas) == 2 and all(0 <= b < 1 for b in cfg.optim.betas), "optim.betas",
         f"must be two numbers in [0, 1), got {cfg.optim.betas}")
    need(cfg.optim.lr >= 0 and cfg.optim.grad_clip >= 0, "optim.lr", "and optim.grad_clip must be >= 0")
    sc = cfg.schedule
    need(sc.batch_ramp_tokens >= 0, "schedule.batch_ramp_tokens", "must be >= 0")
    need(sc.batch_ramp_tokens == 0 or sc.batch_start_tokens <= sc.batch_final_tokens, "schedule.batch_start_tokens",
         f"({sc.batch_start_tokens}) must not exceed schedule.batch_final_tokens ({sc.batch_final_tokens})")
    need(0.0 <= sc.min_lr_ratio <= 1.0, "schedule.min_lr_ratio", f"must be in [0, 1], got {sc.min_lr_ratio}")
    from megatrain.schedule import BatchSchedule, LRSchedule  # the schedules check their own parameters

    for key, build in (("schedule.warmup_tokens", lambda: LRSchedule.from_config(cfg)),
                       ("schedule.batch_steps", lambda: BatchSchedule.from_config(cfg, dp_size=1))):
        try:
            build()
        except ValueError as e:
            raise UserError(f"{source}: {key}: {e}") from None
    sp = cfg.spike
    need(set(sp.watch) <= {"loss", "grad_norm"} and bool(sp.watch), "spike.watch",
         f"must list 'loss' and/or 'grad_norm', got {sp.watch}")
    need(sp.window >= 2, "spike.window", f"must be >= 2, got {sp.window}")
    need(1 <= sp.min_history <= sp.window, "spike.min_history",
         f"must be between 1 and spike.window ({sp.window}), got {sp.min_history}")
    need(sp.threshold > 0, "spike.threshold", f"must be > 0, got {sp.threshold}")
    for key, value, least in (("patience", sp.patience, 1), ("skip", sp.skip, 0), ("max_rollbacks", sp.max_rollbacks, 0),
                              ("snapshot_every", sp.snapshot_every, 1), ("snapshots", sp.snapshots, 0)):
        need(value >= least, f"spike.{key}", f"must be >= {least}, got {value}")
    ok = all(isinstance(x, list) and len(x) == 2 and all(isinstance(v, (int, float)) and v >= 0 for v in x)
             for x in cfg.data.skip)
    need(ok, "data.skip", f"must be [[position, samples], ...] with non-negative numbers, got {cfg.data.skip!r}")
    need(cfg.checkpoint.keep >= 1, "checkpoint.keep", f"must be >= 1, got {cfg.checkpoint.keep}")
    need(cfg.checkpoint.every_steps >= 0, "checkpoint.every_steps", "must be >= 0")
    need(bool(cfg.data.path), "data.path", "must name a prepared data directory (launch/prepare_data.py)")
    if isinstance(cfg.data.path, list):
        for i, item in enumerate(cfg.data.path):
            need(isinstance(item, dict) and set(item) <= {"path", "weight"} and "path" in item, f"data.path[{i}]",
                 f"must be {{path: DIR, weight: W}}, got {item!r}")


def data_sources(cfg: Config) -> list[tuple[str, float]]:
    """data.path as a list of (directory, weight)."""
    if isinstance(cfg.data.path, str):
        return [(cfg.data.path, 1.0)]
    return [(item["path"], float(item.get("weight", 1.0))) for item in cfg.data.path]


# --- DeepSpeed -----------------------------------------------------------------------

def deep_merge(base: dict, top: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in top.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def optimizer_clips(cfg: Config) -> bool:
    """Whether the optimizer (FusedAdamWClip) does the clipping. Not under ZeRO-3, where
    DeepSpeed steps parameter sub-groups separately and no single call sees every gradient."""
    return cfg.optim.name == "fused_adamw" and cfg.parallel.zero_stage != 3


def deepspeed_config(cfg: Config, dp_size: int, grad_accum: int) -> dict:
    """DeepSpeed's JSON config for this run. The learning rate is set by the trainer every
    step (no DeepSpeed scheduler)."""
    t, o = cfg.train, cfg.optim
    ds: dict = {
        "train_micro_batch_size_per_gpu": t.micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": t.micro_batch * grad_accum * dp_size,
        "zero_optimization": {"stage": cfg.parallel.zero_stage},
        "bf16": {"enabled": t.precision == "bf16"},
        "fp16": {"enabled": t.precision == "fp16"},
        "steps_per_print": 2**31 - 1,  # the trainer logs
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
    }
    # FusedAdamWClip computes the global norm and clips inside its kernel, so DeepSpeed's
    # clipping is off and, under ZeRO-1/2, so is DeepSpeed's own norm pass.
    ds["gradient_clipping"] = 0.0 if optimizer_clips(cfg) else o.grad_clip
    if optimizer_clips(cfg) and cfg.parallel.zero_stage in (1, 2):
        ds["zero_optimization"]["compute_grad_norm"] = False
    if o.name == "adamw":  # DeepSpeed builds its own optimizer; otherwise the trainer passes one
        ds["optimizer"] = {"type": "AdamW", "params": {"lr": o.lr, "betas": list(o.betas), "eps": o.eps,
                                                       "weight_decay": o.weight_decay}}
    if t.precision == "bf16-autocast":
        ds["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    if t.precision == "fp16":
        # Dynamic loss scaling: start at 2^16, halve on overflow, double after 1000 clean steps.
        ds["fp16"].update({"loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000,
                           "hysteresis": 2, "min_loss_scale": 1})
    return deep_merge(ds, cfg.deepspeed)
