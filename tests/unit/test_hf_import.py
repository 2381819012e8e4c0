"""Importing Hugging Face models (megatrain/model/hf.py, model.init_from): models built and
saved locally with transformers (nothing downloaded), read back as megatrain's GPT with
the same logits, and exported again bit for bit; and the refusals, one line each."""

from __future__ import annotations

import json
import re

import pytest
import torch
import transformers

from megatrain.errors import UserError
from megatrain.model import GPT, GPTConfig
from megatrain.model.hf import read_hf_shape, read_hf_weights, to_hf

VOCAB, CONTEXT = 96, 32


def gpt2(**overrides):
    config = transformers.GPT2Config(
        vocab_size=VOCAB,
        n_positions=CONTEXT,
        n_embd=32,
        n_layer=2,
        n_head=4,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        **overrides,
    )
    return transformers.GPT2LMHeadModel(config)


def llama(kind="Llama", **overrides):
    common = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=CONTEXT,
        tie_word_embeddings=False,
        **overrides,
    )
    config = getattr(transformers, f"{kind}Config")(**common)
    return getattr(transformers, f"{kind}ForCausalLM")(config)


def saved(model, path):
    torch.manual_seed(0)
    with torch.no_grad():  # larger than the default init: logits that differ when anything is wrong
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.eval().save_pretrained(path)
    return model


def imported(path) -> GPT:
    cfg = GPTConfig.from_shape(read_hf_shape(path))
    model = GPT(cfg, init_weights=False)
    model.load_state_dict(read_hf_weights(path, cfg))
    return model.eval()


@pytest.mark.parametrize(
    "make", [gpt2, llama, lambda: llama("Qwen3", head_dim=8)], ids=["gpt2", "llama", "qwen3"]
)
def test_import_gives_the_sources_logits_and_export_round_trips_exactly(tmp_path, make):
    source = saved(make(), tmp_path / "hf")
    ours = imported(tmp_path / "hf")
    x = torch.randint(0, VOCAB, (3, CONTEXT))
    with torch.no_grad():
        theirs, mine = source(x).logits, ours(x)
    assert theirs.abs().max() > 1.0  # not a degenerate model
    assert torch.allclose(mine, theirs, atol=1e-4, rtol=0), (mine - theirs).abs().max()
    back = to_hf(ours.state_dict(), ours.cfg, eos_id=0).state_dict()
    original = source.state_dict()
    for name, tensor in original.items():
        assert torch.equal(back[name], tensor), name
    assert type(to_hf(ours.state_dict(), ours.cfg, eos_id=0)).__name__ == type(source).__name__


def test_sharded_safetensors_are_read(tmp_path):
    source = gpt2()
    source.save_pretrained(tmp_path / "hf", max_shard_size="20KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    ours = imported(tmp_path / "hf")
    assert torch.equal(ours.state_dict()["embed.wte.weight"], source.state_dict()["transformer.wte.weight"])


def test_bad_directories_are_refused_in_one_line(tmp_path):
    d = tmp_path / "hf"
    with pytest.raises(UserError, match="no config.json"):
        read_hf_shape(tmp_path)
    transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        architectures=["BertForMaskedLM"],
    ).save_pretrained(d)
    with pytest.raises(
        UserError,
        match="BertForMaskedLM cannot be imported; supported: GPT2LMHeadModel, "
        "LlamaForCausalLM, Qwen3ForCausalLM",
    ):
        read_hf_shape(d)
    gpt2().save_pretrained(d)
    for f in d.glob("model*"):  # a config and no weights
        f.unlink()
    cfg = GPTConfig.from_shape(read_hf_shape(d))
    with pytest.raises(UserError, match="partial directory: config.json but no weights"):
        read_hf_weights(d, cfg)
    gpt2().save_pretrained(d, max_shard_size="20KB")
    next(d.glob("model-00002-of-*.safetensors")).unlink()
    with pytest.raises(
        UserError,
        match=r"partial directory: model-00002-of-\d+.safetensors listed in "
        "model.safetensors.index.json is missing",
    ):
        read_hf_weights(d, cfg)
    config = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**config, "activation_function": "gelu"}))
    with pytest.raises(UserError, match="activation_function 'gelu'"):
        read_hf_shape(d)
    two = tmp_path / "two-layers"
    gpt2().save_pretrained(two)
    (two / "config.json").write_text(json.dumps({**config, "n_layer": 3}))  # says 3 layers, holds 2
    with pytest.raises(UserError, match=r"partial directory: the weights lack transformer\.h\.2\."):
        read_hf_weights(two, GPTConfig.from_shape(read_hf_shape(two)))


def test_init_from_refusals_each_one_line(tmp_path):
    """model_config's checks of a source against the run's config (megatrain/train/init_from.py)."""
    from megatrain.config import load_config
    from megatrain.train.init_from import Source, model_config, open_source

    shape = GPTConfig(vocab_size=VOCAB, seq_len=CONTEXT, n_layer=2, n_head=4, d_model=32).shape()
    checkpoint = Source(tmp_path, "checkpoint", shape, "aaaa" * 16, {"step": 10, "tokens": 100})
    hf_dir = Source(tmp_path, "huggingface", shape)

    def config(*sets):
        return load_config(
            None,
            [
                "data.path=d",
                "train.max_steps=1",
                f"train.seq_len={CONTEXT}",
                f"model.init_from={tmp_path}",
                *sets,
            ],
        )

    cfg = config("model.dropout=0.1")  # not shape: the run's own
    model = model_config(cfg, checkpoint, VOCAB, "aaaa" * 16)
    assert (model.n_layer, model.d_model, model.dropout, cfg.model.n_layer) == (2, 32, 0.1, 2)
    assert (
        model_config(config("train.seq_len=16"), hf_dir, VOCAB, None).seq_len == 16
    )  # shorter context: fine
    for source, sets, data_tokenizer, message in [
        (
            checkpoint,
            [],
            "bbbb" * 16,
            "its vocabulary was made with another tokenizer (aaaaaaaaaaaa) than the data's (bbbbbbbbbbbb)",
        ),
        (checkpoint, ["model.arch=llama"], None, "model.arch is llama in the config, gpt3 in the source"),
        (
            checkpoint,
            ["model.n_layer=3"],
            None,
            f"model.init_from={tmp_path}: model.n_layer is 3 in the config, 2 in "
            "the source; leave it out (the source sets the shape)",
        ),
        (hf_dir, ["optim.init_from_state=true"], None, "optim.init_from_state needs a megatrain checkpoint"),
        (
            hf_dir,
            ["parallel.tensor_parallel=8"],
            None,
            "with the source's shape, parallel.tensor_parallel=8 must divide model.n_head (4)",
        ),
        (hf_dir, [], None, f"its vocabulary has {VOCAB} tokens, the run {VOCAB} (the data's tokenizer: 50)"),
        (hf_dir, ["schedule.init_from=keep"], None, "schedule.init_from=keep needs a megatrain checkpoint"),
        (
            hf_dir,
            [f"train.seq_len={2 * CONTEXT}"],
            None,
            f"the source has learned positions for {CONTEXT} tokens, train.seq_len={2 * CONTEXT} is longer",
        ),
    ]:
        with pytest.raises(UserError) as e:  # (the data's tokenizer has 50 tokens in the hash-less case)
            model_config(
                config(*sets), source, VOCAB if source.tokenizer_sha256 or sets else 50, data_tokenizer
            )
        assert message in str(e.value) and "\n" not in str(e.value), str(e.value)
    resized = model_config(config("model.init_from_vocab=resize"), checkpoint, VOCAB + 4, "bbbb" * 16)
    assert resized.vocab_size == VOCAB + 4
    padded = model_config(
        config(), checkpoint, VOCAB - 3, "aaaa" * 16
    )  # the same tokenizer: a padded table is fine
    assert padded.vocab_size == VOCAB
    for path, message in [
        (tmp_path / "nowhere", "no such file or directory (model.init_from)"),
        (
            tmp_path,
            "neither a megatrain run or checkpoint directory nor a Hugging Face model "
            "directory (no config.json)",
        ),
        (tmp_path / "x.safetensors", "not a safetensors file"),
    ]:
        if path.suffix:
            path.write_bytes(b"not safetensors")
        with pytest.raises(UserError, match=re.escape(message)):
            open_source(path)


def test_pytorch_bin_weights_are_read(tmp_path):
    source = gpt2()
    source.config.architectures = ["GPT2LMHeadModel"]  # as the model's own save_pretrained writes it
    source.config.save_pretrained(tmp_path / "hf")
    torch.save(source.state_dict(), tmp_path / "hf" / "pytorch_model.bin")
    ours = imported(tmp_path / "hf")
    assert torch.equal(
        ours.state_dict()["blocks.1.attn.qkv.weight"],
        source.state_dict()["transformer.h.1.attn.c_attn.weight"].t(),
    )
