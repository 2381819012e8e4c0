"""ZeRO-0 under fp16 with DeepSpeed's FusedAdam (`optim.name: adamw` on a GPU): DeepSpeed's
FP16_Optimizer keeps each parameter group's fp32 master and moments as one flat tensor.
A checkpoint of it is read into the layout-free form, and the layout-free form is loaded
into it (a resume on another layout, init.from), master by master: the fp16 weights alone
would lose the masters' low bits, and weights written to the fp16 model alone would be
overwritten from the old masters at the next step. DeepSpeed's real FP16_Optimizer, built
on the CPU (an engine refuses fp16 there); its checkpoint file as DeepSpeed's ZeRO-0 engine
writes it."""

from __future__ import annotations

import types

import torch
from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
from safetensors.torch import save_file

from megatrain.model import GPT, GPTConfig
from megatrain.optim import param_groups
from megatrain.train import layout_free

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
        opt.optimizer.state[flat] = {"step": torch.tensor(7.0), "exp_avg": torch.randn_like(flat),
                                     "exp_avg_sq": torch.rand_like(flat)}
    return model, opt, recorded


def test_fp16_flat_masters_read_and_loaded_master_by_master(tmp_path):
    model, opt, recorded = fp16_optimizer(seed=0)
    torch.save({"module": model.state_dict(), "optimizer": opt.state_dict()}, tmp_path / "mp_rank_00_model_states.pt")
    torch.save({"optimizer_params": {"mp_rank": 0, "groups": recorded}}, tmp_path / "megatrain-rank00000.pt")

    read, step = layout_free._zero0(tmp_path, 0, layout_free.KINDS, None)
    assert step == 7
    params = dict(model.named_parameters())
    for group, flat in zip(recorded, opt.fp32_groups_flat, strict=True):
        offset, state = 0, opt.optimizer.state[flat]
        for name in group:
            n = params[name].numel()
            assert torch.equal(read[f"param/{name}"].make().reshape(-1), flat[offset:offset + n])
            assert not torch.equal(read[f"param/{name}"].make(), params[name].float())  # the masters, not the weights
            for kind in layout_free.MOMENTS:
                assert torch.equal(read[f"{kind}/{name}"].make().reshape(-1), state[kind][offset:offset + n])
            offset += n

    # and into another FP16_Optimizer, as a resume on another layout loads them
    path = tmp_path / layout_free.FILE
    save_file({k: d.make().float().contiguous() for k, d in read.items()}, path, {"optimizer_step": "7"})
    other, other_opt, _ = fp16_optimizer(seed=1)
    other_opt.optimizer.state.clear()  # a fresh optimizer: its state is made by the load
    module = types.SimpleNamespace(engine=types.SimpleNamespace(module=other, optimizer=other_opt),
                                   base_optimizer=other_opt.optimizer, n_layer=SHAPE.n_layer, pipeline=False,
                                   tp_rank=0, tp_size=1, model_cfg=SHAPE)
    assert layout_free.load_into(module, path) == 7
    for flat, other_flat in zip(opt.fp32_groups_flat, other_opt.fp32_groups_flat, strict=True):
        assert torch.equal(other_flat, flat)
        for kind in layout_free.MOMENTS:
            assert torch.equal(other_opt.optimizer.state[other_flat][kind], opt.optimizer.state[flat][kind])
        assert float(other_opt.optimizer.state[other_flat]["step"]) == 7
    for name, p in other.named_parameters():  # the fp16 weights: the masters rounded, as after a step
        assert torch.equal(p, read[f"param/{name}"].make().half()), name
