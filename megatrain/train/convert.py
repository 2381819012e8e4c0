"""One consolidated fp32 state dict from any megatrain checkpoint, for the plain GPT, as
a safetensors file or a Hugging Face directory (megatrain/model/hf.py).

    sd, cfg = consolidate("runs/x/checkpoints/step-00001000")
    model = GPT(cfg); model.load_state_dict(sd)
    save_consolidated("runs/x", "gpt.safetensors"); model = load_consolidated("gpt.safetensors")
    export_hf("runs/x", "hf/", "runs/tok")   # AutoModelForCausalLM / AutoTokenizer .from_pretrained("hf/")

The fp32 weights are the layout-free state's (layout_free.py) without the moments: the
fp32 masters of ZeRO 1-3 (a pipeline's stage by stage, names mapped back to GPT's); under
ZeRO-0 the module weights in the training precision, cast to fp32: for fp32 runs these
are the master weights; for bf16 runs they are the weights the run evaluated with.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from megatrain.errors import UserError
from megatrain.files import save_safetensors_atomically
from megatrain.model import GPT, GPTConfig
from megatrain.train import layout_free
from megatrain.train.checkpoint import STATE, Checkpointer

FORMAT = "megatrain-consolidated/2"


def consolidate(ckpt: str | Path, verified: bool = False) -> tuple[dict[str, torch.Tensor], GPTConfig]:
    """fp32 weights by GPT's names, and the model's config; `verified`: the checksums were
    just checked (by checkpoint_of), so the files are not read twice."""
    ckpt = Path(ckpt)
    problem = None if verified else Checkpointer.verify(ckpt)
    if problem:
        raise UserError(f"{ckpt}: not a complete checkpoint: {problem}")
    cfg = GPTConfig.from_shape(Checkpointer.read_state(ckpt)["model_shape"])
    tensors, _ = layout_free.read(ckpt, moments=False)
    sd = {k.removeprefix("param/"): v for k, v in tensors.items()}
    try:
        GPT(cfg, init_weights=False).load_state_dict(
            sd, strict=True
        )  # every parameter present, every shape right
    except RuntimeError as e:
        raise UserError(
            f"{ckpt}: the weights do not fit the model shape in its {STATE} "
            f"({str(e).splitlines()[-1].strip()})"
        ) from None
    return sd, cfg


def checkpoint_of(source: str | Path) -> tuple[Path, bool]:
    """A checkpoint directory as given, or a run directory's newest intact checkpoint
    (damaged ones passed over, as --resume auto does); (path, whether it was verified)."""
    source = Path(source)
    if (source / STATE).is_file() or (source / "manifest.json").is_file():
        path, verified = source, False
    elif not source.is_dir():
        raise UserError(f"{source}: no such run or checkpoint directory")
    else:
        path, _ = Checkpointer(source, keep=1).find("auto")
        if path is None:
            raise UserError(f"{source}: no intact checkpoint in this run directory")
        verified = True
    return path, verified


def consolidate_any(source: str | Path) -> tuple[dict[str, torch.Tensor], GPTConfig, dict]:
    """consolidate() of a checkpoint or run directory (checkpoint_of), and its megatrain.json."""
    path, verified = checkpoint_of(source)
    sd, cfg = consolidate(path, verified=verified)
    return sd, cfg, Checkpointer.read_state(path)


def load_model(
    source: str | Path, tokenizer=None, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> GPT:
    """The plain GPT (eval mode) of a run or checkpoint directory, on `device` in `dtype`.
    With `tokenizer`, a check that it is the one the run trained with (by the tokenizer hash
    its checkpoint records, or its data's manifest when that data is at hand, else by
    vocabulary size)."""
    sd, cfg, state = consolidate_any(source)
    if tokenizer is not None:
        sha = tokenizer_of(state)
        if sha is not None and sha != tokenizer.sha256:
            raise UserError(
                f"{tokenizer.source}: not the tokenizer the run's data was made with "
                f"(sha256 {tokenizer.sha256[:12]}, the run's {sha[:12]})"
            )
        if tokenizer.vocab_size > cfg.vocab_size:
            raise UserError(
                f"{tokenizer.source}: {tokenizer.vocab_size} tokens, the checkpoint's model has "
                f"{cfg.vocab_size}: not the tokenizer its data was made with"
            )
    model = GPT(cfg, init_weights=False)
    model.load_state_dict(sd)
    return model.to(device=device, dtype=dtype).eval()


def tokenizer_of(state: dict) -> str | None:
    """The tokenizer hash of a checkpoint's data (megatrain.json records it; older ones: by
    the data's manifest, when that data is at hand)."""
    return state.get("tokenizer_sha256") or next(
        (s for p in data_paths(state) if (s := manifest_tokenizer(p))), None
    )


def data_paths(state: dict) -> list[str]:
    """The data directories of a checkpoint's run (megatrain.json's config)."""
    path = state.get("config", {}).get("data", {}).get("path", "")
    return [path] if isinstance(path, str) else [item["path"] for item in path]


def manifest_tokenizer(path: str) -> str | None:
    """The tokenizer hash of a prepared data directory's manifest, if it is at hand."""
    for manifest in (Path(path) / "train" / "manifest.json", Path(path) / "manifest.json"):
        if manifest.is_file():
            try:
                return json.loads(manifest.read_text()).get("tokenizer_sha256")
            except (json.JSONDecodeError, UnicodeDecodeError):
                return None
    return None


def save_consolidated(ckpt: str | Path, out: str | Path) -> Path:
    """One safetensors file of fp32 weights; the model's shape rides in its header."""
    sd, cfg, state = consolidate_any(ckpt)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": FORMAT, "config": json.dumps(cfg.__dict__), "source": str(Path(ckpt).resolve())}
    sha = tokenizer_of(state)
    if sha:
        meta["tokenizer_sha256"] = sha
    save_safetensors_atomically(out, sd, meta)
    return out


def save_layout_free(source: str | Path) -> Path:
    """The layout-free training state written into the checkpoint (layout_free.write), for
    resuming on another layout without converting at start."""
    path, verified = checkpoint_of(source)
    problem = None if verified else Checkpointer.verify(path)
    if problem:
        raise UserError(f"{path}: not a complete checkpoint: {problem}")
    return layout_free.write(path)


def load_consolidated(path: str | Path) -> GPT:
    """The plain GPT with a consolidated checkpoint's weights."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise UserError(f"{path}: not a safetensors file ({e})") from None
    if meta.get("format") != FORMAT:
        raise UserError(f"{path}: not a consolidated megatrain checkpoint")
    model = GPT(GPTConfig(**json.loads(meta["config"])))
    model.load_state_dict(load_file(str(path)))
    return model


def export_hf(
    source: str | Path, out: str | Path, tokenizer_dir: str | Path | None, dtype: torch.dtype = torch.float32
) -> Path:
    """A Hugging Face directory: GPT2LMHeadModel, or LlamaForCausalLM / Qwen3ForCausalLM
    for the llama architecture (megatrain/model/hf.py) (config.json, model.safetensors,
    generation_config.json with eos = megatrain's end-of-document id) and the tokenizer as
    a fast tokenizer with the same ids (tokenizer/hf.py; by default the run's own,
    run_tokenizer.py). Written under a temporary name and renamed: nothing half-written at `out`."""
    import shutil

    from megatrain.model import hf
    from megatrain.train import run_tokenizer
    from tokenizer.hf import to_hf
    from tokenizer.tokenizer import SPECIAL_IDS

    tok = run_tokenizer.for_run(source, tokenizer_dir)
    model = load_model(source, tok)
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    exported = hf.to_hf(model.state_dict(), model.cfg, eos_id=SPECIAL_IDS["eod"]).to(dtype)
    exported.generation_config.pad_token_id = SPECIAL_IDS["eod"]
    exported.config.megatrain_tokenizer_sha256 = (
        tok.sha256
    )  # an import checks the data's tokenizer against it
    exported.save_pretrained(tmp)
    to_hf(tok, model_max_length=model.cfg.seq_len).save_pretrained(tmp)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out
