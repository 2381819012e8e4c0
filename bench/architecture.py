"""GPT-3 against llama at equal parameters and tokens, and loss spikes with and without
QK-norm and z-loss: the experiment in docs/results.md ("Architectures").

1. configs/tiny-cpu.yaml (GPT-3, 1.86M parameters) and configs/tiny-cpu-llama.yaml (llama,
   1.84M) on the stdlib corpus with make demo's tokenizer, 2 ranks, 1.2M tokens each, the
   same data order and schedule: held-out loss and bits per byte at the end, the curves
   side by side (--plot FILE).
2. Both again at --lr-factor times the learning rate, without and with model.qk_norm and
   optim.z_loss=1e-4, shorter (--spike-tokens): spikes counted as the spike guard's
   rollbacks (events.jsonl), and where the held-out loss ends.

    python bench/architecture.py [--json FILE] [--plot FILE] [--lr-factor 10] [--spike-tokens 6e5]
"""

from __future__ import annotations

from _bench import REPO, arg_parser, machine, print_table, stdlib_data, write_json

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from helpers import pretrain_command

from megatrain.config import load_config
from megatrain.train.metrics import read_events, read_metrics

CONFIGS = {"gpt3": REPO / "configs" / "tiny-cpu.yaml", "llama": REPO / "configs" / "tiny-cpu-llama.yaml"}
STABILISERS = ["model.qk_norm=true", "optim.z_loss=1e-4"]


def train(run: Path, arch: str, data: Path, sets: list[str]) -> dict:
    cmd = pretrain_command(
        CONFIGS[arch], [f"run.dir={run}", f"data.path={data}", *sets], nproc=2, resume="none"
    )
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
    if proc.returncode not in (0, 3):  # 3: gave up after too many rollbacks, still a result
        raise RuntimeError(f"{arch} {sets} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    rows = read_metrics(run)
    train_rows = [r for r in rows if r["kind"] == "train"]
    valid = [r for r in rows if r["kind"] == "valid"]
    start = next(e for e in read_events(run) if e["event"] == "start")
    return {
        "params": start["params"],
        "tokens": train_rows[-1]["tokens"],
        "gave_up": proc.returncode == 3,
        "val_loss": valid[-1]["val_loss"],
        "val_bpb": valid[-1]["val_bpb"],
        "rollbacks": sum(e["event"] == "rollback" for e in read_events(run)),
        "curve": [(r["tokens"], r["loss"]) for r in train_rows],
        "valid_curve": [(r["tokens"], r["val_bpb"]) for r in valid],
    }


def plot(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    for arch, r in results.items():
        a.plot(*zip(*r["curve"], strict=True), lw=1, label=f"{arch} ({r['params'] / 1e6:.2f}M)")
        b.plot(*zip(*r["valid_curve"], strict=True), "o-", ms=3, label=arch)
    a.set(xlabel="tokens", ylabel="training loss", title="training loss")
    b.set(xlabel="tokens", ylabel="bits per byte", title="held-out bits per byte")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)


def main():
    p = arg_parser(__doc__)
    p.add_argument("--plot", metavar="FILE", help="draw the two architectures' curves to FILE")
    p.add_argument("--lr-factor", type=float, default=10.0)
    p.add_argument("--spike-tokens", type=float, default=6e5)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-arch-"))
    data = stdlib_data(work, vocab_size=8192, sample_bytes=int(5e6), valid_fraction=0.01)  # as make demo
    base = {arch: train(work / arch, arch, data, []) for arch in CONFIGS}
    print_table(
        "GPT-3 and llama at equal parameters, 1.2M tokens of the stdlib corpus, 2 ranks",
        ["arch", "parameters", "tokens", "held-out loss", "held-out bits/byte"],
        [[a, r["params"], r["tokens"], r["val_loss"], r["val_bpb"]] for a, r in base.items()],
    )
    if args.plot:
        plot(base, Path(args.plot))
    spikes, rows = {}, []
    for arch in CONFIGS:
        for label, extra in (("plain", []), ("qk_norm + z_loss", STABILISERS)):
            peak = load_config(CONFIGS[arch], []).optim.lr
            sets = [f"optim.lr={peak * args.lr_factor}", f"train.max_tokens={args.spike_tokens}", *extra]
            r = train(work / f"{arch}-{label.replace(' ', '')}", arch, data, sets)
            spikes[f"{arch} {label}"] = {k: v for k, v in r.items() if "curve" not in k}
            rows.append(
                [arch, label, r["rollbacks"], "yes" if r["gave_up"] else "no", r["val_loss"], r["val_bpb"]]
            )
    print_table(
        f"learning rate x{args.lr_factor:g}, {args.spike_tokens:,.0f} tokens: spikes (rollbacks)",
        ["arch", "options", "rollbacks", "gave up", "held-out loss", "held-out bits/byte"],
        rows,
    )
    shutil.rmtree(work, ignore_errors=True)
    write_json(
        args.json,
        {
            "machine": machine(),
            "lr_factor": args.lr_factor,
            "base": {a: {k: v for k, v in r.items() if "curve" not in k} for a, r in base.items()},
            "spikes": spikes,
        },
    )


if __name__ == "__main__":
    main()
