"""The wall around DeepSpeed (megatrain/train/ds_internals.py): DeepSpeed-private names
appear nowhere else in megatrain; another DeepSpeed version is refused; and a contract test
per optimizer flavour against DeepSpeed's real objects: what the wall sets into a live
engine (masters, moments, step count) is what DeepSpeed then saves, read back by the wall
from DeepSpeed's own files, by parameter name. Engines are built in a spawned process as a
world of one; fp16 (which DeepSpeed refuses on a CPU engine) on DeepSpeed's real
FP16_Optimizer, built directly."""

from __future__ import annotations

import json
import re
import types
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
from helpers import REPO, TINY_CONFIG, same_values
from safetensors.torch import save_file

from megatrain.errors import UserError
from megatrain.layout import Layout
from megatrain.model import GPT, GPTConfig
from megatrain.optim import param_groups
from megatrain.train import ds_internals as wall
from megatrain.train import layout_free
from megatrain.train.checkpoint_writer import HostCopies

SHAPE = GPTConfig(vocab_size=64, seq_len=8, n_layer=2, n_head=2, d_model=16)


def fp16_optimizer(seed: int):
    """A fp16 GPT under FP16_Optimizer, its masters and moments set to values fp16 cannot hold."""
    torch.manual_seed(seed)
    model = GPT(SHAPE).half()
    groups = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    recorded = [[names[id(p)] for p in g["params"]] for g in groups]
    opt = FP16_Optimizer(torch.optim.AdamW(groups, lr=1e-3), dynamic_loss_scale=True, verbose=False)
    for flat in opt.fp32_groups_flat:
        flat.data.add_(torch.randn_like(flat) * 1e-4)
        opt.optimizer.state[flat] = {
            "step": torch.tensor(7.0),
            "exp_avg": torch.randn_like(flat),
            "exp_avg_sq": torch.rand_like(flat),
        }
    return model, opt, recorded


def test_fp16_flat_masters_read_and_loaded_master_by_master(tmp_path):
    """The fp16_flat flavour: ZeRO-0 under fp16 with DeepSpeed's FusedAdam (`optim.name:
    adamw` on a GPU), whose FP16_Optimizer keeps each parameter group's fp32 master and
    moments as one flat tensor. Read from its checkpoint file as DeepSpeed's ZeRO-0 engine
    writes it, and loaded into another master by master: the fp16 weights alone would lose
    the masters' low bits, and weights written to the fp16 model alone would be overwritten
    from the old masters at the next step."""
    assert wall.flavour(fp16_optimizer(seed=0)[1]) == "fp16_flat"
    model, opt, recorded = fp16_optimizer(seed=0)
    torch.save(
        {"module": model.state_dict(), "optimizer": opt.state_dict()}, tmp_path / "mp_rank_00_model_states.pt"
    )
    torch.save({"optimizer_params": {"mp_rank": 0, "groups": recorded}}, tmp_path / "megatrain-rank00000.pt")

    read, step = wall.read_checkpoint(tmp_path, 0, layout_free.KINDS, None, lambda mp: recorded)
    assert step == 7
    params = dict(model.named_parameters())
    for group, flat in zip(recorded, opt.fp32_groups_flat, strict=True):
        offset, state = 0, opt.optimizer.state[flat]
        for name in group:
            n = params[name].numel()
            assert torch.equal(read[f"param/{name}"].make().reshape(-1), flat[offset : offset + n])
            assert not torch.equal(
                read[f"param/{name}"].make(), params[name].float()
            )  # the masters, not the weights
            for kind in layout_free.MOMENTS:
                assert torch.equal(
                    read[f"{kind}/{name}"].make().reshape(-1), state[kind][offset : offset + n]
                )
            offset += n

    # and into another FP16_Optimizer, as a resume on another layout loads them
    path = tmp_path / layout_free.FILE
    save_file({k: d.make().float().contiguous() for k, d in read.items()}, path, {"optimizer_step": "7"})
    other, other_opt, _ = fp16_optimizer(seed=1)
    other_opt.optimizer.state.clear()  # a fresh optimizer: its state is made by the load
    module = types.SimpleNamespace(
        engine=types.SimpleNamespace(module=other, optimizer=other_opt),
        layout=Layout(0, 1, 1, 1),
        model_cfg=SHAPE,
        experts=None,  # a dense model: no expert shards
    )
    assert layout_free.load_into(module, path) == 7
    for flat, other_flat in zip(opt.fp32_groups_flat, other_opt.fp32_groups_flat, strict=True):
        assert torch.equal(other_flat, flat)
        for kind in layout_free.MOMENTS:
            assert torch.equal(other_opt.optimizer.state[other_flat][kind], opt.optimizer.state[flat][kind])
        assert float(other_opt.optimizer.state[other_flat]["step"]) == 7
    for name, p in other.named_parameters():  # the fp16 weights: the masters rounded, as after a step
        assert torch.equal(p, read[f"param/{name}"].make().half()), name


# --- nobody else reaches in --------------------------------------------------------------

PUBLIC_MODULES = {
    "deepspeed",
    "deepspeed.accelerator",
    "deepspeed.pipe",
    "deepspeed.runtime.pipe",  # ProcessTopology: the type PipelineModule's documented `topology` takes
}  # and deepspeed.utils' safe_* accessors
NOT_DEEPSPEED = re.compile(
    r"\b(?:self|cls|torch|os|sys)(?:\.\w+)+"
)  # attribute chains of no DeepSpeed object


def test_deepspeed_internals_only_behind_the_wall():
    """Outside ds_internals.py, megatrain and launch/ import only DeepSpeed's public modules,
    and touch no `_`-prefixed attribute (DeepSpeed's objects' private state; torch's, the
    os's and a class's own are not DeepSpeed's)."""
    found = []
    for path in sorted([*(REPO / "megatrain").rglob("*.py"), *(REPO / "launch").glob("*.py")]):
        if path.name == "ds_internals.py":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#")[0]
            imported = re.search(r"^\s*(?:from|import)\s+(deepspeed[\w.]*)(?:\s+import\s+(.*))?", code)
            if (
                imported
                and imported.group(1) not in PUBLIC_MODULES
                and not (
                    imported.group(1) == "deepspeed.utils"
                    and re.fullmatch(r"[\w, ]*", imported.group(2) or "")
                    and all(n.strip().startswith("safe_") for n in imported.group(2).split(","))
                )
            ):
                found.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
            private = re.search(
                r"\b\w+\._[A-Za-z]\w*|getattr\([^,]+,\s*[\"']_[A-Za-z]", NOT_DEEPSPEED.sub("", code)
            )
            if private and "megatrain._fused_adamw" not in code:
                found.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert found == []


def test_another_deepspeed_version_is_refused_in_one_line(monkeypatch, caplog):
    with pytest.raises(
        UserError,
        match=r"^DeepSpeed 0\.20\.0 is installed; megatrain reaches into DeepSpeed's internals "
        r".* as they are in 0\.19\.8: install deepspeed==0\.19\.8, or set "
        r"MEGATRAIN_UNSUPPORTED_DEEPSPEED=1 to try anyway$",
    ):
        wall.check_version("0.20.0")
    monkeypatch.setenv(wall.OVERRIDE, "1")
    wall.check_version("0.20.0")
    assert "going on, untested" in caplog.text
    wall.check_version()  # the installed one


# --- a contract per optimizer flavour ----------------------------------------------------

FLAVOURS = {  # (settings, the flavour DeepSpeed makes of them)
    "fused_adamw fp32 ZeRO-0": (["parallel.zero_stage=0"], "plain"),
    "torch_adamw fp32 ZeRO-0": (["parallel.zero_stage=0", "optim.name=torch_adamw"], "plain"),
    "DeepSpeed's AdamW fp32 ZeRO-0": (["parallel.zero_stage=0", "optim.name=adamw"], "plain"),
    "fused_adamw bf16 ZeRO-0": (["parallel.zero_stage=0", "train.precision=bf16"], "copies"),
    "fused_adamw fp32 ZeRO-1": (["parallel.zero_stage=1"], "zero12"),
    "DeepSpeed's AdamW bf16 ZeRO-2": (
        ["parallel.zero_stage=2", "train.precision=bf16", "optim.name=adamw"],
        "zero12",
    ),
    "fused_adamw bf16 ZeRO-1": (["parallel.zero_stage=1", "train.precision=bf16"], "bf16"),
    "fused_adamw fp32 ZeRO-3": (["parallel.zero_stage=3"], "zero3"),
}


def _contracts(data: str, work: str, out: str) -> None:
    """In a world of one, for each flavour: masters, moments and step 5 set through the wall
    (layout_free.load_into), the engine's own checkpoint written, and read back by the wall."""
    from megatrain.config import load_config
    from megatrain.train.train_module import TrainModule, init_layout

    results = {}
    for name, (sets, _) in FLAVOURS.items():
        cfg = load_config(TINY_CONFIG, [f"data.path={data}", *sets])
        layout = init_layout(cfg) if not results else Layout.from_config(cfg, 1)
        module = TrainModule(cfg, GPTConfig.from_config(cfg, 1024), 1, layout)
        g = torch.Generator().manual_seed(len(results))
        with torch.device("meta"):
            shapes = {n: p.shape for n, p in GPT(module.model_cfg, init_weights=False).named_parameters()}
        values = {
            f"{kind}/{n}": torch.randn(shape, generator=g).abs()
            for n, shape in shapes.items()
            for kind in layout_free.KINDS
        }
        file = Path(work) / f"{len(results)}.safetensors"
        save_file(values, file, {"optimizer_step": "5"})
        layout_free.load_into(module, file)
        module.engine.save_checkpoint(work, tag=f"c{len(results)}")
        # The same save handed over (background checkpoints): the files it would have written.
        copies, handed = HostCopies(pinned=False), {}
        copies.start()

        def hand_over(state, path, copies=copies, handed=handed):
            handed[Path(path).name] = copies.copy(state, path)

        with wall.files_handed_over(module.engine, hand_over):
            module.engine.save_checkpoint(work, tag=f"h{len(results)}")
        written = {p.name: p for p in (Path(work) / f"c{len(results)}").iterdir()}
        for file, state in handed.items():
            same_values(state, torch.load(written[file], weights_only=False), file)
        read, step = wall.read_checkpoint(
            Path(work) / f"c{len(results)}",
            0,
            layout_free.KINDS,
            None,
            lambda mp, groups=module.optimizer_params: groups,
        )
        read = {k.replace("/module.", "/"): d.make().float() for k, d in read.items()}
        results[name] = {
            "flavour": wall.flavour(module.engine.optimizer),
            "step": step,
            "keys": sorted(read) == sorted(values),
            "differ": sorted(k for k in values if k in read and not torch.equal(read[k], values[k])),
            "handed_over": sorted(handed) == sorted(written),
            "written_by_the_hand_over": sorted(p.name for p in (Path(work) / f"h{len(results)}").iterdir()),
        }
    Path(out).write_text(json.dumps(results))


def _spawned(_rank, *args):
    _contracts(*args)


def test_each_flavour_keeps_what_the_wall_sets_in_it(tmp_path, small_data):
    out = tmp_path / "out.json"
    mp.start_processes(
        _spawned, args=(str(small_data), str(tmp_path), str(out)), nprocs=1, start_method="spawn"
    )
    results = json.loads(out.read_text())
    assert {name: r["flavour"] for name, r in results.items()} == {
        name: f for name, (_, f) in FLAVOURS.items()
    }
    for name, r in results.items():
        assert r == {
            "flavour": FLAVOURS[name][1],
            "step": 5,
            "keys": True,
            "differ": [],
            "handed_over": True,
            "written_by_the_hand_over": [],
        }, name
