"""Predictable scaling, validated on this machine: a ladder of tiny models on the built-in
corpus, a fit, and a prediction of a model trained at 10x the ladder's largest compute,
written down before that model trains (docs/scaling.md).

    python bench/scaling.py [--work DIR] [--sizes 3] [--multiples 0.05 0.1 0.2] [--compute-factor 10]
        [--json FILE]

Steps: a 4096-piece tokenizer and shards of the stdlib (valid split 1%); launch/ladder.py
on configs/tiny-cpu.yaml (branches mode, one rank per run); fits of L(N, D) and L(C); the
target, the first shape of the same rule above the largest rung whose tokens per parameter,
trained to --compute-factor x the ladder's largest run's compute, are at most the ladder's
largest (or --target-ratio); its predicted final held-out loss
and 95% interval are written to WORK/prediction.json before it trains; then its measured
loss, the error and whether it fell inside. Rerun with the same --work to reuse what is
done. Not a CI test: the default takes about an hour on 2 cores, alone.
"""

from __future__ import annotations

from _bench import REPO, arg_parser, machine, print_table, stdlib_data, write_json

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from megatrain.config import load_config
from megatrain.model import flops_per_token
from megatrain.scaling import ladder as lad
from megatrain.scaling.fit import fit_compute, fit_loss

TARGET = REPO / "configs" / "tiny-cpu.yaml"


def main():
    p = arg_parser(__doc__)
    p.add_argument("--work", type=Path, help="where data, runs and the prediction go (default: a temp dir)")
    p.add_argument("--sizes", type=int, default=3)
    p.add_argument(
        "--smallest", type=float, default=1e4, help="non-embedding parameters of the smallest rung"
    )
    p.add_argument("--largest", type=float, default=2e5, help="non-embedding parameters of the largest rung")
    p.add_argument(
        "--multiples", type=float, nargs="+", default=[0.05, 0.1, 0.2], help="of 20 tokens/parameter"
    )
    p.add_argument("--compute-factor", type=float, default=10.0)
    p.add_argument(
        "--target-ratio",
        type=float,
        help="the target's tokens per parameter at most (default: the ladder's largest, so the prediction"
        " extrapolates in N and C but not in tokens per parameter)",
    )
    args = p.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-scaling-"))
    work.mkdir(parents=True, exist_ok=True)
    data = work / "data" if (work / "data" / "valid").exists() else stdlib_data(work, valid_fraction=0.01)
    sets = [f"data.path={data}", "train.eval_samples=256", "logging.progress=false"]
    t0 = time.time()
    ladder_args = [
        "--config",
        str(TARGET),
        *(a for s in sets for a in ("--set", s)),
        "--out",
        str(work / "ladder"),
    ]
    ladder_args += [
        "--sizes",
        str(args.sizes),
        "--smallest",
        str(args.smallest),
        "--largest",
        str(args.largest),
    ]
    ladder_args += ["--multiples", *map(str, args.multiples)]
    subprocess.run([sys.executable, str(REPO / "launch" / "ladder.py"), *ladder_args], check=True)
    ladder_seconds = time.time() - t0
    rows = json.loads((work / "ladder" / "ladder.json").read_text())
    n, d, loss = ([r[k] for r in rows] for k in ("params", "tokens", "loss"))
    by_size = fit_loss(n, d, loss)
    by_compute = fit_compute([r["flops"] for r in rows], loss)

    cfg = load_config(TARGET, sets)
    vocab = json.loads((data / "train" / "manifest.json").read_text())["vocab_size"]
    largest = max(rows, key=lambda r: r["flops"])
    ratio = args.target_ratio or max(r["tokens"] / r["params"] for r in rows)
    target, tokens, aim = None, 0, 2 * args.largest
    # the next shape of the family up, grown until the target's tokens per parameter is within the ladder's
    while target is None or target.params <= largest["params"] or tokens / target.params > ratio:
        [target], aim = lad.rungs(cfg, vocab, 1, aim, aim), aim * 1.5
        tokens = int(args.compute_factor * largest["flops"] / flops_per_token(target.model))
    batch = load_config(Path(largest["run"]) / "config.yaml").schedule.batch_final_tokens  # the ladder's
    [job] = lad.jobs([target], 1.0, [tokens / target.params], work / "target", "runs", 0.2, batch, 60000)
    prediction = work / "prediction.json"
    if not prediction.exists():  # written once, before the target trains
        lo, hi = by_size.interval(target.params, job.tokens)
        prediction.write_text(
            json.dumps(
                {
                    "params": target.params,
                    "tokens": job.tokens,
                    "flops": flops_per_token(target.model) * job.tokens,
                    "predicted": by_size.predict(target.params, job.tokens),
                    "interval": [lo, hi],
                    "by_compute": by_compute.predict(flops_per_token(target.model) * job.tokens),
                    "fit": by_size.as_dict(),
                    "written": time.strftime("%Y-%m-%d %H:%M:%S"),
                },
                indent=1,
            )
            + "\n"
        )
    predicted = json.loads(prediction.read_text())
    t1 = time.time()
    if lad.result(job.run_dir) is None:
        script = [str(REPO / "launch" / "pretrain.py"), "--config", str(TARGET)]
        script += [a for s in [*sets, *job.sets] for a in ("--set", s)]
        subprocess.run([sys.executable, *script, "--resume", "auto"], check=True, stdout=subprocess.DEVNULL)
    measured = lad.result(job.run_dir)["loss"]
    error = (predicted["predicted"] - measured) / measured
    inside = predicted["interval"][0] <= measured <= predicted["interval"][1]
    print_table(
        f"Predictable scaling: {len(rows)} ladder runs, the target at {args.compute_factor:g}x their compute",
        ["", "params", "tokens", "FLOPs", "loss"],
        [
            *([r["rung"], r["params"], r["tokens"], f"{r['flops']:.3g}", f"{r['loss']:.4f}"] for r in rows),
            ["target (measured)", target.params, job.tokens, f"{predicted['flops']:.3g}", f"{measured:.4f}"],
        ],
    )
    lo, hi = predicted["interval"]
    where = "inside" if inside else "outside"
    print(f"predicted {predicted['predicted']:.4f} [{lo:.4f}, {hi:.4f}] by L(N, D)")
    print(f"          {predicted['by_compute']:.4f} by L(C)")
    print(f"measured  {measured:.4f}: error {error:+.2%}, {where} the interval")
    for warning in by_size.warnings:
        print(f"the fit: {warning}")
    write_json(
        args.json,
        {
            "machine": machine(),
            "ladder": rows,
            "prediction": predicted,
            "measured": measured,
            "error": error,
            "inside_interval": inside,
            "ladder_seconds": ladder_seconds,
            "target_seconds": time.time() - t1,
        },
    )


if __name__ == "__main__":
    main()
