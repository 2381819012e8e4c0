"""What every entry script shares: bad input ends in one line, not a traceback, and a
distributed process leaves without interpreter finalization."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable

from megatrain.errors import ExitCode, RunError, UserError
from tokenizer import InputError


def run(main: Callable[[], int | None]) -> None:
    """Run `main`; a user error prints `error: <one line>` and exits ExitCode.BAD_INPUT, a run
    error (a failed checkpoint write) the same line with ExitCode.RUN_ERROR (MEGATRAIN_DEBUG=1:
    the traceback)."""
    try:
        code = main() or 0
    except (UserError, InputError, RunError) as e:
        if os.environ.get("MEGATRAIN_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr, flush=True)
        code = ExitCode.RUN_ERROR if isinstance(e, RunError) else ExitCode.BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        code = 130
    _exit(int(code))


def add_corpus_args(p: argparse.ArgumentParser) -> None:
    """The corpus and how its documents are read (train_tokenizer, prepare_data): --input and
    CorpusOptions."""
    p.add_argument(
        "--input",
        nargs="+",
        required=True,
        metavar="PATH",
        help="files, directories (recursive), globs, or builtin:stdlib; "
        ".txt .jsonl .parquet .arrow, optionally .gz",
    )
    p.add_argument(
        "--txt-documents",
        choices=["file", "paragraph"],
        default="file",
        help="a .txt document is the whole file (default) or a blank-line-separated paragraph",
    )
    p.add_argument("--text-field", default="text", help="JSON field with the text in .jsonl (default: text)")
    p.add_argument(
        "--text-column", default="text", help="column with the text in .parquet/.arrow (default: text)"
    )
    p.add_argument(
        "--invalid-utf8",
        choices=["skip", "fail"],
        default="skip",
        help="drop documents that are not UTF-8 and report them (default), or stop at the first",
    )


def corpus_options(args: argparse.Namespace):
    """CorpusOptions from add_corpus_args' options."""
    from tokenizer import CorpusOptions

    return CorpusOptions(args.txt_documents, args.text_field, args.text_column, args.invalid_utf8)


def add_tokenizer_arg(p: argparse.ArgumentParser) -> None:
    """--tokenizer of a script that reads a run (megatrain/train/run_tokenizer.py)."""
    p.add_argument(
        "--tokenizer",
        help="the tokenizer directory the run's data was made with (default: the one the run keeps)",
    )


def add_placement_args(p: argparse.ArgumentParser) -> None:
    """--device and --dtype of a script that runs a trained model (generate, evaluate)."""
    p.add_argument(
        "--device", help="where the model runs: cpu, cuda, cuda:N (default: cuda when there is one)"
    )
    p.add_argument(
        "--dtype",
        choices=["fp32", "bf16"],
        default="fp32",
        help="the weights' and activations' precision (bf16: half the memory, not the same figures)",
    )


def placement(args: argparse.Namespace) -> tuple:
    """(torch.device, torch.dtype) from add_placement_args' options; a device that is not
    here is a user error."""
    import torch

    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as e:
        raise UserError(f"--device {args.device}: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {args.device}: no CUDA device here (torch {torch.__version__})")
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {args.device}: only cpu and cuda are supported")
    return device, {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]


def _exit(code: int) -> None:
    """A process with a live torch.distributed process group leaves with os._exit: Gloo's
    C++ threads can still hold work when the interpreter finalizes, and it then aborts
    ("terminate called without an active exception", SIGABRT; seen in a few percent of
    runs), which turns a finished or refused run into a crash. Everything is flushed first;
    files are closed as they are written."""
    torch_dist = sys.modules.get("torch.distributed")
    if torch_dist is None or not torch_dist.is_available() or not torch_dist.is_initialized():
        sys.exit(code)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
