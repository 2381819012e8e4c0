"""Config loading and validation, and the DeepSpeed JSON generated from it."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import TINY_CONFIG, run_script

from megatrain.config import Config, deepspeed_config, load_config
from megatrain.errors import UserError

BASE = ["data.path=somewhere", "train.max_steps=10"]


def test_yaml_plus_overrides():
    cfg = load_config(
        TINY_CONFIG,
        BASE
        + [
            "parallel.zero_stage=3",
            "optim.lr=6e-4",
            "train.max_tokens=3.2e6",
            "data.path=[{path: a, weight: 0.3}, {path: b, weight: 0.7}]",
        ],
    )
    assert cfg.parallel.zero_stage == 3 and cfg.model.d_model == 32
    assert cfg.optim.lr == 6e-4  # YAML reads 6e-4 as a string; numeric fields accept it
    assert cfg.train.max_tokens == 3_200_000 and isinstance(cfg.train.max_tokens, int)
    assert cfg.data.path == [{"path": "a", "weight": 0.3}, {"path": "b", "weight": 0.7}]
    assert cfg.data.valid_sets() == {"a": "a", "b": "b"}  # a blend: one validation set per source
    cfg = load_config(TINY_CONFIG, BASE + ["data.valid={code: d1, prose: d2}"])
    assert cfg.data.valid_sets() == {"code": "d1", "prose": "d2"}
    assert load_config(TINY_CONFIG, BASE + ["data.path=[{path: x/a}, {path: y/a}]"]).data.valid_sets() == {
        "a": "x/a",
        "a-1": "y/a",
    }
    assert load_config(None, BASE).to_dict() == Config(**{}).to_dict() | {
        "data": {**Config().to_dict()["data"], "path": "somewhere"},
        "train": {**Config().to_dict()["train"], "max_steps": 10},
    }


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.lr=1", "--set train.lr: unknown key 'train.lr' (did you mean 'optim.lr'?)"),
        ("train.micro_bach=2", "unknown key 'train.micro_bach' (did you mean 'train.micro_batch'?)"),
        ("trian.seq_len=4", "unknown key 'trian' (did you mean 'train'?)"),
        ("train.max_steps=ten", "train.max_steps must be int | null, got str 'ten'"),
        ("train.micro_batch=2.5", "train.micro_batch must be int, got float 2.5"),
        (
            "train.precision=fp8",
            "train.precision must be 'bf16' | 'bf16-autocast' | 'fp16' | 'fp32', got str 'fp8'",
        ),
        ("logging.wandb=yes please", "logging.wandb must be bool"),
        ("model.n_head=5", "model.d_model (32) must be divisible by model.n_head (5)"),
        ("parallel.zero_stage=4", "parallel.zero_stage must be 0, 1, 2 or 3"),
        (
            "parallel.tensor_parallel=4",
            "parallel.tensor_parallel=4 must divide model.n_head (2): heads are split",
        ),
        (
            "parallel.sequence_parallel=true",
            "parallel.sequence_parallel needs parallel.tensor_parallel > 1",
        ),
        (
            "parallel={tensor_parallel: 2, zero_stage: 3}",
            "parallel.tensor_parallel=2 cannot be combined with parallel.zero_stage=3: DeepSpeed's AutoTP "
            "training "
            "supports ZeRO 0-2",
        ),
        ("train=3", "train must be a mapping"),
        (
            "model={arch: llama, n_head: 4, n_kv_head: 3}",
            "model.n_kv_head (3) must be a positive divisor of model.n_head (4)",
        ),
        ("model.tie_embeddings=false", "model.tie_embeddings GPT-3 ties its embeddings"),
        ("model.arch=mamba", "model.arch must be 'gpt3' | 'llama'"),
        ("optim.z_loss=-1", "optim.z_loss must be >= 0"),
    ],
)
def test_bad_overrides(override, message):
    with pytest.raises(UserError) as e:
        load_config(TINY_CONFIG, BASE + [override])
    assert message in str(e.value)


@pytest.mark.parametrize(
    "model, message",
    [
        (
            "model={arch: llama, n_head: 4, n_kv_head: 1}",
            "parallel.tensor_parallel=2 must divide model.n_kv_head (1)",
        ),
        (
            "model={arch: llama, n_head: 4, ffn_hidden: 33}",
            "parallel.tensor_parallel=2 must divide model.ffn_hidden (33)",
        ),
        (
            "model.vocab_size=1025",
            "parallel.tensor_parallel=2 must divide model.vocab_size (1025): the vocabulary is split too",
        ),
    ],
)
def test_tensor_parallel_must_split_whole_kv_heads_and_mlp_units(model, message):
    with pytest.raises(UserError) as e:
        load_config(TINY_CONFIG, BASE + ["parallel.tensor_parallel=2", model])
    assert message in str(e.value)


@pytest.mark.parametrize(
    "extra, message",
    [
        (
            "train.seq_len=33",
            "parallel.sequence_parallel needs train.seq_len (33) divisible by parallel.tensor_parallel=2",
        ),
        ("model.dropout=0.1", "parallel.sequence_parallel cannot be combined with model.dropout=0.1 yet"),
    ],
)
def test_sequence_parallelism_refusals(extra, message):
    sets = ["parallel.tensor_parallel=2", "parallel.sequence_parallel=true"]
    load_config(TINY_CONFIG, BASE + sets)  # fine as it is
    with pytest.raises(UserError) as e:
        load_config(TINY_CONFIG, BASE + sets + [extra])
    assert message in str(e.value)


def test_bad_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  seq_len: 64\n  micro_bacth: 1024\n")
    with pytest.raises(
        UserError, match=r"bad.yaml: unknown key 'train.micro_bacth' \(did you mean 'train.micro_batch'\?\)"
    ):
        load_config(bad, BASE)
    bad.write_text("train: [1, 2\n")
    with pytest.raises(UserError, match="bad.yaml: invalid YAML"):
        load_config(bad, BASE)
    with pytest.raises(UserError, match="no such config file"):
        load_config(tmp_path / "none.yaml")
    with pytest.raises(UserError, match="train.max_steps or train.max_tokens must be set"):
        load_config(None, ["data.path=x"])


def test_cli_reports_one_line(tmp_path):
    proc = run_script("pretrain.py", "--config", TINY_CONFIG, "--set", "train.lr=1", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: --set train.lr: unknown key 'train.lr' (did you mean 'optim.lr'?)"
    ]


def test_every_config_file_loads():
    from helpers import REPO

    for path in sorted((REPO / "configs").glob("*.yaml")):
        cfg = load_config(path)
        assert cfg.train.seq_len > 0, path


def _deepspeed(cfg, dp_size: int, grad_accum: int) -> dict:
    """The DeepSpeed JSON of `cfg` on `dp_size` data-parallel ranks."""
    from megatrain.layout import Layout
    from megatrain.optim.grad_norm import GradNormPolicy

    layout = Layout.from_config(cfg, dp_size * cfg.parallel.tensor_parallel * cfg.parallel.pipeline_stages)
    return deepspeed_config(cfg, layout, grad_accum, GradNormPolicy.decide(cfg.optim, cfg.train, layout))


@pytest.mark.parametrize("precision", ["fp16", "bf16", "bf16-autocast", "fp32"])
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_deepspeed_json(precision, stage):
    cfg = load_config(
        TINY_CONFIG,
        BASE
        + [
            f"train.precision={precision}",
            f"parallel.zero_stage={stage}",
            "optim.name=adamw",
            "optim.grad_clip=0.5",
        ],
    )
    ds = json.loads(json.dumps(_deepspeed(cfg, dp_size=4, grad_accum=3)))  # JSON-serialisable
    assert ds["train_micro_batch_size_per_gpu"] == 4 and ds["gradient_accumulation_steps"] == 3
    assert ds["train_batch_size"] == 4 * 3 * 4
    assert ds["zero_optimization"]["stage"] == stage and ds["gradient_clipping"] == 0.5
    assert ds["bf16"]["enabled"] == (precision == "bf16") and ds["fp16"]["enabled"] == (precision == "fp16")
    if precision == "fp16":  # dynamic loss scaling
        assert ds["fp16"]["loss_scale"] == 0 and ds["fp16"]["initial_scale_power"] == 16
        assert ds["fp16"]["loss_scale_window"] == 1000 and ds["fp16"]["hysteresis"] == 2
    assert ds["optimizer"]["type"] == "AdamW" and ds["optimizer"]["params"]["betas"] == [0.9, 0.95]
    from deepspeed.runtime.config import DeepSpeedConfig

    parsed = DeepSpeedConfig(_deepspeed(cfg, dp_size=1, grad_accum=3))  # DeepSpeed's own parser (world of 1)
    assert parsed.zero_optimization_stage == stage
    assert parsed.float16_config.enabled == (precision == "fp16") and parsed.bfloat16_config.enabled == (
        precision == "bf16"
    )
    if precision == "fp16":
        assert parsed.float16_config.loss_scale == 0  # 0 means dynamic in DeepSpeed
    assert parsed.torch_autocast_enabled == (precision == "bf16-autocast")
    if precision == "bf16-autocast":
        assert parsed.torch_autocast_dtype == torch.bfloat16


def test_raw_deepspeed_section_merges_on_top():
    cfg = load_config(
        TINY_CONFIG,
        BASE
        + [
            "deepspeed={zero_optimization: {reduce_bucket_size: 1000}, wall_clock_breakdown: true}",
            "parallel.zero_stage=2",
        ],
    )
    ds = _deepspeed(cfg, dp_size=1, grad_accum=1)
    assert ds["zero_optimization"] == {"stage": 2, "reduce_bucket_size": 1000, "compute_grad_norm": False}
    assert ds["wall_clock_breakdown"] is True


def test_fused_deepspeed_config_turns_deepspeed_clipping_off():
    base = [f"data.path={TINY_CONFIG}", "train.max_steps=1"]
    for stage, clip, norm in [
        (0, 0.0, None),
        (1, 0.0, False),
        (2, 0.0, False),
        (3, 0.6, None),
    ]:  # tiny.yaml clips at 0.6
        ds = _deepspeed(load_config(TINY_CONFIG, base + [f"parallel.zero_stage={stage}"]), 2, 1)
        assert ds["gradient_clipping"] == clip, stage  # ZeRO-3: DeepSpeed clips
        assert ds["zero_optimization"].get("compute_grad_norm") is norm, stage
        assert "optimizer" not in ds  # a client optimizer
    ds = _deepspeed(load_config(TINY_CONFIG, base + ["optim.name=adamw"]), 2, 1)
    assert ds["gradient_clipping"] == 0.6 and ds["optimizer"]["type"] == "AdamW"


@pytest.mark.parametrize(
    "override,message",
    [
        ("spike.max_rollbacks=-1", "spike.max_rollbacks must be >= 0, got -1"),
        ("spike.patience=0", "spike.patience must be >= 1, got 0"),
        ("spike.min_history=500", "spike.min_history must be between 1 and spike.window (100), got 500"),
        ("spike.watch=[foo]", "spike.watch must list 'loss' and/or 'grad_norm', got ['foo']"),
        (
            "data.skip=[[1]]",
            "data.skip must be [[position, samples], ...] with non-negative numbers, got [[1]]",
        ),
    ],
)
def test_spike_and_skip_settings_are_checked_one_key_at_a_time(override, message):
    with pytest.raises(UserError) as e:
        load_config(None, [*BASE, override])
    assert message in str(e.value)
