"""megatrain's models as Hugging Face classes with the same architecture, so export is a
renaming (`to_hf` picks the class):

- gpt3 -> GPT2LMHeadModel (learned positions, pre-LayerNorm blocks, tanh GELU =
  "gelu_new", a 4x MLP, tied embeddings, biases), plus GPT-2's Conv1D layout ([in, out]:
  the transpose of nn.Linear's weight). The fused q|k|v projection keeps its order. A model
  trained without biases exports zero biases (GPT-2 always has them).
- llama -> LlamaForCausalLM: q|k|v and gate|up are cut into Llama's separate projections.
  Both rotate dimension i with i + d_head/2 (`rotate_half`), so q and k need no permutation.
- llama with qk_norm -> Qwen3ForCausalLM: Llama's layout plus RMSNorm on each head's
  queries and keys before the rotation, as megatrain's.
A gpt3 model with qk_norm has no transformers class: its export is refused.
"""

from __future__ import annotations

import torch

from megatrain.errors import UserError
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


# GPT name -> Llama/Qwen3 name inside model.layers.{i} (weights cut from a fused one are separate).
_LLAMA_BLOCK = {"ln1": "input_layernorm", "ln2": "post_attention_layernorm", "attn.proj": "self_attn.o_proj",
                "mlp.proj": "mlp.down_proj", "attn.q_norm": "self_attn.q_norm", "attn.k_norm": "self_attn.k_norm"}


def hf_class_name(cfg: GPTConfig) -> str:
    """The transformers class a model of `cfg` exports to (UserError if none has its architecture)."""
    if cfg.arch == "gpt3":
        if cfg.qk_norm:
            raise UserError("a gpt3 model with model.qk_norm has no Hugging Face class (GPT-2 has no QK-norm); "
                            "train arch: llama with qk_norm to export it (as Qwen3ForCausalLM)")
        return "GPT2LMHeadModel"
    if cfg.qk_norm:
        if cfg.bias:
            raise UserError("a llama model with model.qk_norm and biases has no Hugging Face class (Qwen3's MLP has "
                            "no biases)")
        return "Qwen3ForCausalLM"
    return "LlamaForCausalLM"


def llama_config(cfg: GPTConfig, eos_id: int):
    import transformers

    kind = hf_class_name(cfg).removesuffix("ForCausalLM")
    common = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.ffn_hidden,
                  num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_kv_head,
                  head_dim=cfg.head_dim, hidden_act="silu", max_position_embeddings=cfg.seq_len,
                  rms_norm_eps=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings, attention_bias=cfg.bias,
                  rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta}, attention_dropout=0.0,
                  bos_token_id=eos_id, eos_token_id=eos_id)
    if kind == "Llama":
        return transformers.LlamaConfig(mlp_bias=cfg.bias, **common)
    return transformers.Qwen3Config(use_sliding_window=False, **common)


def to_llama_state_dict(sd: dict[str, torch.Tensor], cfg: GPTConfig) -> dict[str, torch.Tensor]:
    """GPT's parameters (arch llama) under LlamaForCausalLM's (or Qwen3ForCausalLM's) names."""
    q, kv = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim
    out = {"model.embed_tokens.weight": sd["embed.wte.weight"], "model.norm.weight": sd["head.ln_f.weight"],
           "lm_head.weight": sd["embed.wte.weight"] if cfg.tie_embeddings else sd["head.lm_head.weight"]}
    for i in range(cfg.n_layer):
        ours, theirs = f"blocks.{i}.", f"model.layers.{i}."
        for kind in ("weight", "bias"):
            if f"{ours}attn.qkv.{kind}" in sd:
                for name, part in zip(("q_proj", "k_proj", "v_proj"), sd[f"{ours}attn.qkv.{kind}"].split([q, kv, kv]),
                                      strict=True):
                    out[f"{theirs}self_attn.{name}.{kind}"] = part
            if f"{ours}mlp.fc.{kind}" in sd:
                gate, up = sd[f"{ours}mlp.fc.{kind}"].chunk(2)
                out[f"{theirs}mlp.gate_proj.{kind}"], out[f"{theirs}mlp.up_proj.{kind}"] = gate, up
            for mine, hf in _LLAMA_BLOCK.items():
                if f"{ours}{mine}.{kind}" in sd:
                    out[f"{theirs}{hf}.{kind}"] = sd[f"{ours}{mine}.{kind}"]
    return out


def to_hf(sd: dict[str, torch.Tensor], cfg: GPTConfig, eos_id: int):
    """The transformers model (fp32, eval mode) of `cfg`'s architecture with these weights."""
    if cfg.arch == "gpt3":
        hf_class_name(cfg)  # refuses what GPT-2 cannot hold
        return to_gpt2(sd, cfg, eos_id)
    import transformers

    model = getattr(transformers, hf_class_name(cfg))(llama_config(cfg, eos_id))
    theirs = to_llama_state_dict(sd, cfg)
    missing, unexpected = model.load_state_dict(theirs, strict=False)
    if unexpected or set(missing) - ({"lm_head.weight"} if cfg.tie_embeddings else set()):
        raise RuntimeError(f"{hf_class_name(cfg)} mapping is incomplete: missing {missing}, unexpected {unexpected}")
    return model.eval()
