"""The tokenizer a run trained with, kept in its run directory (RUN_DIR/tokenizer).

At start the run copies it from its data (launch/prepare_data.py leaves one in
DATA/tokenizer), checked against the data's tokenizer hash; the tools that read a run
(export_hf.py, generate.py, evaluate.py) take it from there when --tokenizer is omitted.
Data prepared before has no copy: put the tokenizer directory at DATA/tokenizer, or give
the tools --tokenizer.
"""

from __future__ import annotations

from pathlib import Path

from megatrain.data.prepare import TOKENIZER_DIR
from megatrain.errors import UserError
from tokenizer import Tokenizer
from tokenizer.tokenizer import MODEL_FILE


def keep(run_dir: Path, data_paths: list[str], sha256: str, write: bool) -> Path | None:
    """The run's copy, made from the data's where missing (`write`: rank 0; the checks run
    on every rank, so that all refuse alike); None when neither has one."""
    kept = Path(run_dir) / TOKENIZER_DIR
    if (kept / MODEL_FILE).is_file():
        _check(Tokenizer.load(kept), sha256, "the run's tokenizer")
        return kept
    # DATA/tokenizer beside DATA/train; a data path may also name the split directory itself
    candidates = (Path(p) / up / TOKENIZER_DIR for p in data_paths for up in (".", ".."))
    found = next((d.resolve() for d in candidates if (d / MODEL_FILE).is_file()), None)
    if found is None:
        return None
    tok = Tokenizer.load(found)
    _check(tok, sha256, "the tokenizer kept with the data")
    if write:
        tok.save(kept)
    return kept


def _check(tok: Tokenizer, sha256: str, what: str) -> None:
    if tok.sha256 != sha256:
        raise UserError(
            f"{tok.source}: {what} (sha256 {tok.sha256[:12]}) is not the one the data was made with "
            f"({sha256[:12]})"
        )


def for_run(source: str | Path, given: str | Path | None) -> Tokenizer:
    """The tokenizer for a run or checkpoint directory: `given`, else the run's copy
    (convert.load_model checks a given one against the run's record)."""
    if given is not None:
        return Tokenizer.load(given)
    source = Path(source)
    run = source.parent.parent if source.parent.name == "checkpoints" else source
    kept = run / TOKENIZER_DIR
    if not (kept / MODEL_FILE).is_file():
        raise UserError(
            f"{run}: no tokenizer kept in this run directory (made before runs kept one): give --tokenizer"
        )
    return Tokenizer.load(kept)
