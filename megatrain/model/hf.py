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
- llama with experts -> MixtralForCausalLM (experts in every block, renormalised top-k), or
  with qk_norm Qwen3MoeForCausalLM (experts every model.moe.every blocks, dense MLPs between,
  top-k renormalised or not). The router is `mlp.gate`, the experts transformers' 3D tensors
  (gate|up packed as megatrain's), which save_pretrained writes per expert.
A gpt3 model with qk_norm or experts, and experts with shared experts or biases, have no
transformers class: their export is refused in one line.

Import is the same renaming backwards (`read_hf_shape`, `read_hf_weights`, or
`hf_weights_deferred`: each parameter read when made): a Hugging
Face directory of one of these classes (config.json and safetensors or PyTorch weights,
sharded or not), read from disk, never downloaded. A class whose arithmetic differs from
megatrain's (another activation, RoPE scaling, untied GPT-2) is refused in one line.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch

from megatrain.errors import UserError
from megatrain.files import Deferred, read_deferred_tensors
from megatrain.model.gpt import GPTConfig

# GPT name -> GPT-2 name inside transformer.h.{i}; Conv1D weights are transposed.
_BLOCK = {
    "ln1": "ln_1",
    "attn.qkv": "attn.c_attn",
    "attn.proj": "attn.c_proj",
    "ln2": "ln_2",
    "mlp.fc": "mlp.c_fc",
    "mlp.proj": "mlp.c_proj",
}
_CONV1D = {"attn.qkv", "attn.proj", "mlp.fc", "mlp.proj"}


def gpt2_config(cfg: GPTConfig, eos_id: int):
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=cfg.vocab_size,
        n_positions=cfg.seq_len,
        n_embd=cfg.d_model,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        n_inner=cfg.ffn_hidden,
        activation_function="gelu_new",
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        layer_norm_epsilon=cfg.norm_eps,
        tie_word_embeddings=True,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
    )


def to_gpt2_state_dict(sd: dict[str, torch.Tensor], cfg: GPTConfig) -> dict[str, torch.Tensor]:
    """GPT's parameters (as GPT.state_dict() names them) under GPT2LMHeadModel's names."""
    d = cfg.d_model
    out = {
        "transformer.wte.weight": sd["embed.wte.weight"],
        "transformer.wpe.weight": sd["embed.positions.wpe.weight"],
        "transformer.ln_f.weight": sd["head.ln_f.weight"],
        "transformer.ln_f.bias": sd.get("head.ln_f.bias", torch.zeros(d)),
    }
    for i in range(cfg.n_layer):
        for ours, theirs in _BLOCK.items():
            weight = sd[f"blocks.{i}.{ours}.weight"]
            out[f"transformer.h.{i}.{theirs}.weight"] = weight.t().contiguous() if ours in _CONV1D else weight
            out[f"transformer.h.{i}.{theirs}.bias"] = sd.get(
                f"blocks.{i}.{ours}.bias", torch.zeros(weight.shape[0])
            )
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


# An MoE block's GPT names -> transformers' (Mixtral, Qwen3-MoE) inside model.layers.{i}.
_MOE_BLOCK = {
    "mlp.router.weight": "mlp.gate.weight",
    "mlp.experts.fc": "mlp.experts.gate_up_proj",
    "mlp.experts.proj": "mlp.experts.down_proj",
}

# GPT name -> Llama/Qwen3 name inside model.layers.{i} (weights cut from a fused one are separate).
_LLAMA_BLOCK = {
    "ln1": "input_layernorm",
    "ln2": "post_attention_layernorm",
    "attn.proj": "self_attn.o_proj",
    "mlp.proj": "mlp.down_proj",
    "attn.q_norm": "self_attn.q_norm",
    "attn.k_norm": "self_attn.k_norm",
}


def hf_class_name(cfg: GPTConfig) -> str:
    """The transformers class a model of `cfg` exports to (UserError if none has its architecture)."""
    if cfg.moe_experts:
        return _moe_class_name(cfg)
    if cfg.arch == "gpt3":
        if cfg.qk_norm:
            raise UserError(
                "a gpt3 model with model.qk_norm has no Hugging Face class (GPT-2 has no QK-norm); "
                "train arch: llama with qk_norm to export it (as Qwen3ForCausalLM)"
            )
        return "GPT2LMHeadModel"
    if cfg.qk_norm:
        if cfg.bias:
            raise UserError(
                "a llama model with model.qk_norm and biases has no Hugging Face class (Qwen3's MLP has "
                "no biases)"
            )
        return "Qwen3ForCausalLM"
    return "LlamaForCausalLM"


def _moe_class_name(cfg: GPTConfig) -> str:
    def refuse(why: str):
        raise UserError(f"a mixture-of-experts model with {why} has no Hugging Face class to export to")

    if cfg.arch == "gpt3":
        refuse("arch gpt3 (GPT-2 has no experts; train arch: llama)")
    if cfg.moe_shared_experts:
        refuse("model.moe.shared_experts (Mixtral and Qwen3-MoE have none)")
    if cfg.bias:
        refuse("biases (Mixtral and Qwen3-MoE have none)")
    if cfg.qk_norm:
        return "Qwen3MoeForCausalLM"
    if cfg.moe_every != 1:
        refuse(f"model.moe.every={cfg.moe_every} and no qk_norm (Mixtral has experts in every block)")
    if not cfg.moe_renormalize:
        refuse("model.moe.renormalize false and no qk_norm (Mixtral renormalises the top-k weights)")
    return "MixtralForCausalLM"


def llama_config(cfg: GPTConfig, eos_id: int):
    import transformers

    kind = hf_class_name(cfg).removesuffix("ForCausalLM")
    common = dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        intermediate_size=cfg.ffn_hidden,
        num_hidden_layers=cfg.n_layer,
        num_attention_heads=cfg.n_head,
        num_key_value_heads=cfg.n_kv_head,
        head_dim=cfg.head_dim,
        hidden_act="silu",
        max_position_embeddings=cfg.seq_len,
        rms_norm_eps=cfg.norm_eps,
        tie_word_embeddings=cfg.tie_embeddings,
        attention_bias=cfg.bias,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        attention_dropout=0.0,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
    )
    if kind == "Llama":
        return transformers.LlamaConfig(mlp_bias=cfg.bias, **common)
    if kind == "Qwen3":
        return transformers.Qwen3Config(use_sliding_window=False, **common)
    moe = dict(
        num_experts_per_tok=cfg.moe_top_k, router_aux_loss_coef=cfg.moe_aux_loss, output_router_logits=False
    )
    if kind == "Mixtral":
        common.update(intermediate_size=cfg.moe_ffn_hidden)
        return transformers.MixtralConfig(
            num_local_experts=cfg.moe_experts, router_jitter_noise=0.0, **moe, **common
        )
    return transformers.Qwen3MoeConfig(
        num_experts=cfg.moe_experts,
        moe_intermediate_size=cfg.moe_ffn_hidden,
        decoder_sparse_step=cfg.moe_every,
        mlp_only_layers=[],
        norm_topk_prob=cfg.moe_renormalize,
        use_sliding_window=False,
        **moe,
        **common,
    )


def to_llama_state_dict(sd: dict[str, torch.Tensor], cfg: GPTConfig) -> dict[str, torch.Tensor]:
    """GPT's parameters (arch llama) under LlamaForCausalLM's (or Qwen3ForCausalLM's) names."""
    q, kv = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim
    out = {
        "model.embed_tokens.weight": sd["embed.wte.weight"],
        "model.norm.weight": sd["head.ln_f.weight"],
        "lm_head.weight": sd["embed.wte.weight"] if cfg.tie_embeddings else sd["head.lm_head.weight"],
    }
    for i in range(cfg.n_layer):
        ours, theirs = f"blocks.{i}.", f"model.layers.{i}."
        for kind in ("weight", "bias"):
            if f"{ours}attn.qkv.{kind}" in sd:
                for name, part in zip(
                    ("q_proj", "k_proj", "v_proj"),
                    sd[f"{ours}attn.qkv.{kind}"].split([q, kv, kv]),
                    strict=True,
                ):
                    out[f"{theirs}self_attn.{name}.{kind}"] = part
            if f"{ours}mlp.fc.{kind}" in sd:
                gate, up = sd[f"{ours}mlp.fc.{kind}"].chunk(2)
                out[f"{theirs}mlp.gate_proj.{kind}"], out[f"{theirs}mlp.up_proj.{kind}"] = gate, up
            for mine, hf in _LLAMA_BLOCK.items():
                if f"{ours}{mine}.{kind}" in sd:
                    out[f"{theirs}{hf}.{kind}"] = sd[f"{ours}{mine}.{kind}"]
        for mine, hf in _MOE_BLOCK.items():  # experts: the same [experts, out, in] tensors
            if f"{ours}{mine}" in sd:
                out[f"{theirs}{hf}"] = sd[f"{ours}{mine}"]
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
        raise RuntimeError(
            f"{hf_class_name(cfg)} mapping is incomplete: missing {missing}, unexpected {unexpected}"
        )
    return model.eval()


# --- import ----------------------------------------------------------------------------------

SUPPORTED = ("GPT2LMHeadModel", "LlamaForCausalLM", "Qwen3ForCausalLM")


def _hf_config(path: Path) -> dict:
    file = Path(path) / "config.json"
    if not file.is_file():
        raise UserError(f"{path}: not a Hugging Face model directory (no config.json)")
    try:
        config = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{file}: not valid JSON ({e})") from None
    classes = config.get("architectures") or []
    if len(classes) != 1 or classes[0] not in SUPPORTED:
        raise UserError(
            f"{file}: "
            + (
                f"{', '.join(classes)} cannot be imported"
                if classes
                else "names no model class (architectures)"
            )
            + f"; supported: {', '.join(SUPPORTED)}"
        )
    return config


def read_hf_shape(path: str | Path) -> dict:
    """GPTConfig.shape() of a Hugging Face directory's model (config.json only)."""
    c = _hf_config(Path(path))
    kind, file = c["architectures"][0], Path(path) / "config.json"

    def refuse(what: str):
        raise UserError(
            f"{file}: {kind} with {what} computes differently from megatrain's model; not importable"
        )

    if kind == "GPT2LMHeadModel":
        if c.get("activation_function", "gelu_new") != "gelu_new":
            refuse(
                f"activation_function {c['activation_function']!r} (megatrain's GELU is the tanh form, "
                "gelu_new)"
            )
        if c.get("scale_attn_by_inverse_layer_idx") or not c.get("scale_attn_weights", True):
            refuse("another attention scaling")
        if not c.get("tie_word_embeddings", True):
            refuse("untied embeddings")
        return {
            "arch": "gpt3",
            "vocab_size": c["vocab_size"],
            "seq_len": c["n_positions"],
            "n_layer": c["n_layer"],
            "n_head": c["n_head"],
            "n_kv_head": c["n_head"],
            "d_model": c["n_embd"],
            "ffn_hidden": c.get("n_inner") or 4 * c["n_embd"],
            "bias": True,
            "tie_embeddings": True,
            "qk_norm": False,
            "rope_theta": 10000.0,
            "norm_eps": c.get("layer_norm_epsilon", 1e-5),
        }
    rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        refuse(f"RoPE scaling {rope.get('rope_type', rope.get('type'))!r}")
    if c.get("hidden_act", "silu") != "silu":
        refuse(f"hidden_act {c['hidden_act']!r}")
    d, heads = c["hidden_size"], c["num_attention_heads"]
    if c.get("head_dim", d // heads) * heads != d:
        refuse(f"head_dim {c['head_dim']} x {heads} heads != hidden_size {d}")
    bias = bool(c.get("attention_bias", False))
    if kind == "LlamaForCausalLM" and bool(c.get("mlp_bias", False)) != bias:
        refuse("attention_bias and mlp_bias differing")
    if kind == "Qwen3ForCausalLM" and (bias or c.get("use_sliding_window")):
        refuse("attention biases or sliding-window attention")
    return {
        "arch": "llama",
        "vocab_size": c["vocab_size"],
        "seq_len": c.get("max_position_embeddings", 2048),
        "n_layer": c["num_hidden_layers"],
        "n_head": heads,
        "n_kv_head": c.get("num_key_value_heads", heads),
        "d_model": d,
        "ffn_hidden": c["intermediate_size"],
        "bias": bias,
        "tie_embeddings": bool(c.get("tie_word_embeddings", False)),
        "qk_norm": kind == "Qwen3ForCausalLM",
        "rope_theta": float(rope.get("rope_theta", c.get("rope_theta", 10000.0))),
        "norm_eps": c.get("rms_norm_eps", 1e-6),
    }


def read_hf_tokenizer_sha(path: str | Path) -> str | None:
    """The megatrain tokenizer an exported model's ids are from (export_hf records it)."""
    return _hf_config(Path(path)).get("megatrain_tokenizer_sha256")


def _hf_tensors(path: Path) -> dict[str, Deferred]:
    """Every tensor of the directory's weights (as fp32, each read when made):
    model.safetensors, its sharded index, or pytorch_model.bin (loaded weights-only)."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = path / index_name
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            missing = [s for s in shards if not (path / s).is_file()]
            if missing:
                raise UserError(
                    f"{path}: partial directory: {', '.join(missing)} listed in {index_name} is missing"
                )
            return {k: d for s in shards for k, d in read_deferred_tensors(path / s).items()}
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (path / name).is_file():
            return read_deferred_tensors(path / name)
    raise UserError(
        f"{path}: partial directory: config.json but no weights (model.safetensors, "
        "pytorch_model.bin or a sharded index)"
    )


def read_hf_weights(path: str | Path, cfg: GPTConfig) -> dict[str, torch.Tensor]:
    """The directory's weights by GPT's names (fp32), for the model `cfg` (read_hf_shape)."""
    return {name: d.make() for name, d in hf_weights_deferred(path, cfg).items()}


def hf_weights_deferred(path: str | Path, cfg: GPTConfig) -> dict[str, Deferred]:
    """As read_hf_weights, each parameter read from the directory's files when made."""
    from megatrain.model.gpt import GPT

    path = Path(path)
    theirs = _hf_tensors(path)
    with torch.device("meta"):
        names = [name for name, _ in GPT(cfg, init_weights=False).named_parameters()]
    rule = _from_gpt2 if cfg.arch == "gpt3" else _from_llama
    mapping = {ours: rule(ours, cfg) for ours in names}
    missing = sorted({n for sources, _ in mapping.values() for n in sources if n not in theirs})
    if missing:
        raise UserError(
            f"{path}: partial directory: the weights lack {', '.join(missing[:3])}"
            + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        )

    def made(sources, join):
        return join([theirs[n].make() for n in sources])

    out = {}
    for ours, (sources, join) in mapping.items():
        shape = join([torch.empty(theirs[n].shape, device="meta") for n in sources]).shape
        out[ours] = Deferred(tuple(shape), torch.float32, functools.partial(made, sources, join))
    return out


def _same(tensors):
    return tensors[0]


# GPT's parameters outside the blocks -> their names in the two Hugging Face families.
_GPT2_TOP = {
    "embed.wte.weight": "transformer.wte.weight",
    "embed.positions.wpe.weight": "transformer.wpe.weight",
    "head.ln_f.weight": "transformer.ln_f.weight",
    "head.ln_f.bias": "transformer.ln_f.bias",
}
_LLAMA_TOP = {
    "embed.wte.weight": "model.embed_tokens.weight",
    "head.ln_f.weight": "model.norm.weight",
    "head.lm_head.weight": "lm_head.weight",
}


def _from_gpt2(name: str, cfg: GPTConfig):
    """(GPT-2 names, how to make GPT's parameter `name` of them): to_gpt2_state_dict backwards."""
    if name in _GPT2_TOP:
        return [_GPT2_TOP[name]], _same
    _, i, rest = name.split(".", 2)
    ours, kind = rest.rsplit(".", 1)
    theirs = f"transformer.h.{i}.{_BLOCK[ours]}.{kind}"
    if ours in _CONV1D and kind == "weight":
        return [theirs], lambda ts: ts[0].t().contiguous()
    return [theirs], _same


def _from_llama(name: str, cfg: GPTConfig):
    """(Llama/Qwen3 names, how to make GPT's parameter `name` of them): to_llama_state_dict backwards."""
    if name in _LLAMA_TOP:
        return [_LLAMA_TOP[name]], _same
    _, i, rest = name.split(".", 2)
    ours, kind = rest.rsplit(".", 1)
    layer = f"model.layers.{i}."
    if ours == "attn.qkv":
        return [f"{layer}self_attn.{n}.{kind}" for n in ("q_proj", "k_proj", "v_proj")], torch.cat
    if ours == "mlp.fc":
        return [f"{layer}mlp.gate_proj.{kind}", f"{layer}mlp.up_proj.{kind}"], torch.cat
    return [f"{layer}{_LLAMA_BLOCK[ours]}.{kind}"], _same
