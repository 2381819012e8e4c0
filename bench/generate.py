"""Generation speed: megatrain's GPT.generate (KV cache) against transformers' generate on
the same weights exported as GPT2LMHeadModel, greedy, batch 1 and 8, round-robin in one
process. Goal: megatrain at least as fast.

    python bench/generate.py [--json FILE] [--new-tokens 128] [--repeat 3]
"""

from __future__ import annotations

from _bench import arg_parser, interleaved_medians, machine, print_table, write_json

import os

import torch

from megatrain.model import GPT, GPTConfig
from megatrain.model.hf import to_gpt2

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The ~20M model of bench/train.py's second row, with the demo's vocabulary.
CONFIG = GPTConfig(vocab_size=8192, seq_len=512, n_layer=6, n_head=6, d_model=384, init_seed=1)


def main():
    p = arg_parser(__doc__)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    torch.manual_seed(0)
    ours = GPT(CONFIG).eval()
    theirs = to_gpt2(ours.state_dict(), CONFIG, eos_id=4)
    rows, results = [], []
    for batch in (1, 8):
        prompt = torch.randint(
            0, CONFIG.vocab_size, (batch, 16), generator=torch.Generator().manual_seed(batch)
        )
        outputs = {}

        def run_ours(prompt=prompt, outputs=outputs):
            outputs["ours"] = ours.generate(prompt, args.new_tokens, temperature=0)

        def run_theirs(prompt=prompt, outputs=outputs):
            with torch.no_grad():
                outputs["theirs"] = theirs.generate(
                    prompt,
                    attention_mask=torch.ones_like(prompt),
                    do_sample=False,
                    max_new_tokens=args.new_tokens,
                    min_new_tokens=args.new_tokens,
                    eos_token_id=None,
                    pad_token_id=4,
                )

        times = interleaved_medians(
            {"megatrain": run_ours, "transformers": run_theirs}, args.repeat, warmup=1
        )
        same = torch.equal(outputs["ours"], outputs["theirs"])
        tps = {k: batch * args.new_tokens / t for k, t in times.items()}
        rows.append(
            [batch, tps["megatrain"], tps["transformers"], tps["megatrain"] / tps["transformers"], same]
        )
        results.append({"batch": batch, "tokens_per_s": tps, "same_tokens": same})
    print_table(
        f"Greedy generation, {args.new_tokens} new tokens after 16, "
        f"~{sum(p.numel() for p in ours.parameters()) / 1e6:.0f}M "
        "parameters, fp32, CPU",
        ["batch", "megatrain tok/s", "transformers tok/s", "ratio", "same tokens"],
        rows,
    )
    write_json(args.json, {"machine": machine(), "new_tokens": args.new_tokens, "rows": results})


if __name__ == "__main__":
    main()
