"""megatrain's GPT as Hugging Face's GPT2LMHeadModel: the same architecture (learned
positions, pre-LayerNorm blocks, tanh GELU = "gelu_new", a 4x MLP, tied embeddings,
biases), so export is a renaming plus GPT-2's Conv1D layout ([in, out]: the transpose of
nn.Linear's weight). The fused q|k|v projection keeps its order. A model trained without
biases exports zero biases (GPT-2 always has them).
"""

from __future__ import annotations

import torch

from megatrain.model.gpt import GPTConfig

# GPT name -> GPT-2 name inside transformer.h.{i}; Conv1D weights are transposed.
_BLOCK = {"ln1": "ln_1", "attn.qkv": "attn.c_attn", "attn.proj": "attn.c_proj", "ln2": "ln_2",
          "mlp.fc": "mlp.c_fc", "mlp.proj": "mlp.c_proj"}
_CONV1D = {"attn.qkv", "attn.proj", "mlp.fc", "mlp.proj"}


def gpt2_config(cfg: GPTConfig, eos_id: int):
    from transformers import GPT2Config

    return GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.seq_len, n_embd=cfg.d_model, n_layer=cfg.n_layer,
                      n_head=cfg.n_head, n_inner=4 * cfg.d_model, activation_function="gelu_new",
                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, layer_norm_epsilon=1e-5,
                      tie_word_embeddings=True, bos_token_id=eos_id, eos_token_id=eos_id)


def to_gpt2_state_dict(sd: dict[str, torch.Tensor], cfg: GPTConfig) -> dict[str, torch.Tensor]:
    """GPT's parameters (as GPT.state_dict() names them) under GPT2LMHeadModel's names."""
    d = cfg.d_model
    out = {"transformer.wte.weight": sd["embed.wte.weight"], "transformer.wpe.weight": sd["embed.positions.wpe.weight"],
           "transformer.ln_f.weight": sd["head.ln_f.weight"],
           "transformer.ln_f.bias": sd.get("head.ln_f.bias", torch.zeros(d))}
    for i in range(cfg.n_layer):
        for ours, theirs in _BLOCK.items():
            weight = sd[f"blocks.{i}.{ours}.weight"]
            out[f"transformer.h.{i}.{theirs}.weight"] = weight.t().contiguous() if ours in _CONV1D else weight
            out[f"transformer.h.{i}.{theirs}.bias"] = sd.get(f"blocks.{i}.{ours}.bias",
                                                             torch.zeros(weight.shape[0]))
    out["lm_head.weight"] = out["transformer.wte.weight"]  # tied
    return out


def to_gpt2(sd: dict[str, torch.Tensor], cfg: GPTConfig, eos_id: int):
    """A transformers GPT2LMHeadModel with these weights (fp32)."""
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel(gpt2_config(cfg, eos_id))
    missing, unexpected = model.load_state_dict(to_gpt2_state_dict(sd, cfg), strict=False)
    if unexpected or any(not k.endswith("attn.bias") and not k.endswith("attn.masked_bias") for k in missing):
        raise RuntimeError(f"GPT-2 mapping is incomplete: missing {missing}, unexpected {unexpected}")
    return model.eval()
