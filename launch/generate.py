"""Sample text from a megatrain checkpoint (the model's own generate(), with a KV cache).

    python launch/generate.py --checkpoint runs/demo/run --prompt "def main("
    python launch/generate.py --checkpoint runs/x/checkpoints/step-00001000 \\
        --prompt-file prompts.txt --temperature 0.8 --top-k 50 --top-p 0.95 --num-samples 4 --seed 1

Generation stops at the end-of-document token or --max-new-tokens. One prompt and one
sample stream to the terminal as they are produced; otherwise the samples of all prompts
of one token length are drawn as one batch. A prompt longer than the model's context keeps
its last tokens (and says so). --temperature 0 is greedy.
"""

import argparse
import sys
from pathlib import Path

import torch

from megatrain.train import run_tokenizer
from megatrain.train.convert import load_model
from tokenizer import Tokenizer

from _cli import add_placement_args, add_tokenizer_arg, placement, run


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a run directory or a checkpoint directory")
    add_tokenizer_arg(p)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="prompt text")
    source.add_argument("--prompt-file", help="a file of prompts, one per line (batched)")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    add_placement_args(p)
    return p.parse_args()


class Stream:
    """Prints what each new token adds to the decoded text (a byte token can end inside a
    character: the text is decoded whole each time and only the new part printed)."""

    def __init__(self, tok: Tokenizer):
        self.tok, self.ids, self.text = tok, [], ""

    def __call__(self, token: torch.Tensor) -> None:
        self.ids.append(int(token[0]))
        text = self.tok.decode([i for i in self.ids if i != self.tok.eod_id])
        print(text[len(self.text) :], end="", flush=True)
        self.text = text


def main():
    args = parse_args()
    device, dtype = placement(args)
    tok = run_tokenizer.for_run(args.checkpoint, args.tokenizer)
    model = load_model(args.checkpoint, tok, device, dtype)
    prompts = [args.prompt] if args.prompt is not None else Path(args.prompt_file).read_text().splitlines()
    generator = torch.Generator(device).manual_seed(args.seed)
    sampling = dict(
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        eos_id=tok.eod_id,
        generator=generator,
    )
    encoded = [prompt_ids(tok, p, model.cfg.seq_len) for p in prompts]
    if len(prompts) == 1 and args.num_samples == 1:  # stream it
        print(prompts[0], end="", flush=True)
        model.generate(
            torch.tensor(encoded, device=device), args.max_new_tokens, on_token=Stream(tok), **sampling
        )
        print()
        return
    by_length: dict[int, list[int]] = {}  # prompts of one length form one batch (no padding needed)
    for i, ids in enumerate(encoded):
        by_length.setdefault(len(ids), []).append(i)
    samples: dict[int, list[list[int]]] = {}
    n = args.num_samples
    for length, members in by_length.items():
        out = model.generate(
            torch.tensor([encoded[i] for i in members for _ in range(n)], device=device),
            args.max_new_tokens,
            **sampling,
        )
        for k, i in enumerate(members):
            samples[i] = out[k * n : (k + 1) * n, length:].tolist()
    for i, prompt in enumerate(prompts):
        for j, row in enumerate(samples[i]):
            row = row[: row.index(tok.eod_id)] if tok.eod_id in row else row
            title = f"sample {j + 1}" if len(prompts) == 1 else f"prompt {i + 1}, sample {j + 1}"
            print(f"--- {title}\n{prompt}{tok.decode(row)}")


def prompt_ids(tok: Tokenizer, prompt: str, context: int) -> list[int]:
    """The prompt's ids; one longer than the context keeps its last tokens, and says so."""
    ids = tok.encode(prompt)
    if len(ids) >= context:
        print(
            f"note: the prompt has {len(ids)} tokens; the model's context is {context}: "
            f"generating from its last {context - 1}",
            file=sys.stderr,
        )
        ids = ids[-(context - 1) :]
    return ids


if __name__ == "__main__":
    run(main)
