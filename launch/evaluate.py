"""Score a checkpoint on text: mean loss, perplexity and bits per byte, over whole documents.

    python launch/evaluate.py --checkpoint runs/demo/run \\
        --input held_out/ more.jsonl --json eval.json
    python launch/evaluate.py --checkpoint runs/x --input data/corpus --stride 512

--input takes the tokenizer's input forms (.txt, .jsonl, .parquet/.arrow with a text
column, directories, globs, .gz) or a directory made by launch/prepare_data.py (its valid/
split, documents cut at the end-of-document token). Bits per byte compare runs whose
tokenizers differ; loss and perplexity are per token. Documents longer than the context
are scored with a sliding window (--stride, default the context: no overlap).
"""

import argparse
import json
import math
from pathlib import Path

import numpy as np
from tqdm import tqdm

from megatrain.data import TokenDataset
from megatrain.errors import UserError
from megatrain.files import write_atomically
from megatrain.scoring import Scores, score_document
from megatrain.train import run_tokenizer
from megatrain.train.convert import load_model
from tokenizer import CorpusOptions, CorpusStats, iter_pieces, resolve_inputs

from _cli import add_placement_args, add_tokenizer_arg, placement, run


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a run directory or a checkpoint directory")
    add_tokenizer_arg(p)
    p.add_argument(
        "--input", nargs="+", required=True, help="corpus files/directories, or a prepared data directory"
    )
    p.add_argument(
        "--stride", type=int, default=None, help="sliding-window step in tokens (default: the context)"
    )
    p.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_placement_args(p)
    return p.parse_args()


def documents(inputs: list[str], tok):
    """(source, token ids, UTF-8 bytes) of every document."""
    if len(inputs) == 1 and (Path(inputs[0]) / "valid" / "manifest.json").is_file():
        data = TokenDataset(inputs[0], seq_len=1, split="valid")
        if data.tokenizer_sha256 != tok.sha256:
            raise UserError(f"{inputs[0]}: made with another tokenizer than the one given")
        stream = data.tokens(0, data.num_tokens)
        ends = np.flatnonzero(stream == tok.eod_id)
        starts = np.concatenate([[0], ends + 1])
        for a, b in zip(starts, [*ends, len(stream)], strict=True):
            ids = stream[a:b].tolist()
            if ids:
                yield inputs[0], ids, len(tok.decode(ids).encode())
        return
    text, source = [], None
    for piece in iter_pieces(resolve_inputs(inputs), CorpusOptions(), CorpusStats()):
        text.append(piece.text)
        source = piece.source
        if piece.end:
            joined = "".join(text)
            text = []
            if joined:
                yield source, tok.encode(joined), len(joined.encode())


def main():
    args = parse_args()
    if args.stride is not None and args.stride < 1:
        raise UserError(f"--stride {args.stride}: must be at least 1")
    device, dtype = placement(args)
    tok = run_tokenizer.for_run(args.checkpoint, args.tokenizer)
    model = load_model(args.checkpoint, tok, device, dtype)
    scores = Scores()
    for source, ids, nbytes in tqdm(
        documents(args.input, tok), desc="evaluate", unit="doc", disable=args.quiet
    ):
        scores.add(source, score_document(model, ids, nbytes, tok.eod_id, args.stride))
    if scores.total.documents == 0:
        raise UserError(f"{' '.join(args.input)}: no documents to score (an empty corpus)")
    result = scores.summary()
    print(
        f"loss {result['loss']:.4f}, perplexity {result['perplexity']:.2f}, bits per byte "
        f"{result['bits_per_byte']:.4f} ({result['documents']} documents, {result['tokens']:,} tokens, "
        f"{result['bytes']:,} bytes)"
    )
    if args.json:
        write_atomically(Path(args.json), json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0 if math.isfinite(result["loss"]) else 1


if __name__ == "__main__":
    run(main)
