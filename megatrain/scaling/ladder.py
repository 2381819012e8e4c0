"""The model ladder: smaller models of a target's family, each trained to several token
budgets, whose final held-out losses feed the scaling-law fits (docs/scaling.md).

Shape rule: the target's head width (d_model / n_head) and aspect ratio (d_model / n_layer)
are kept; a rung with N' non-embedding parameters (~12 L d^2 for the blocks) has
L = (N' / (12 a^2))^(1/3) layers (a = the aspect ratio), d = a L rounded to whole heads, and
the target's ratio of query to key/value heads where it divides. Rungs are spaced
geometrically in non-embedding parameters between `smallest` and `largest`.
Learning rate: lr = target lr x (target d_model / d)^lr_exponent (0.8 by default: GPT-3's
table 2.1, 6e-4 at d 768 to 0.6e-4 at d 12288, is close to d^-0.83), overridable.
Budgets: each multiple m of `ratio` tokens per parameter (Chinchilla's 20) gives
D = m x ratio x N, N counting every parameter as Chinchilla did.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
from dataclasses import dataclass
from pathlib import Path

from megatrain.errors import UserError
from megatrain.model import GPTConfig, flops_per_token, param_count
from megatrain.model.gpt import blocks_params, norm_params

WARMUP_SHARE = 0.1  # of a rung's smallest budget, at most the target's warmup


@dataclass(frozen=True)
class Rung:
    name: str
    model: GPTConfig
    lr: float

    @property
    def params(self) -> int:
        return param_count(self.model)

    @property
    def non_embedding(self) -> int:
        m = self.model
        return blocks_params(m) + norm_params(m, m.d_model)

    def sets(self) -> list[str]:
        m = self.model
        shape = ("n_layer", "n_head", "n_kv_head", "d_model", "ffn_hidden")  # ffn_hidden: not the target's
        return [f"model.{k}={getattr(m, k)}" for k in shape] + [f"optim.lr={self.lr:.6g}"]


@dataclass(frozen=True)
class Job:
    """One run of the ladder: a rung trained to `tokens`, its own or a branch of `trunk`."""

    rung: Rung
    tokens: int
    run_dir: Path
    sets: list[str]
    trunk: Path | None = None  # a cooldown branch of this run (branches mode)


def rungs(target, vocab: int, count: int, smallest: float, largest: float, lr_exponent: float = 0.8):
    """Up to `count` models of the family of `target` (a Config), geometric in non-embedding
    parameters from `smallest` to `largest` (sizes that round to one shape give one rung)."""
    m = target.model
    head, aspect = m.d_model // m.n_head, m.d_model / m.n_layer
    kv_ratio = m.n_head // (m.n_kv_head or m.n_head)
    out = []
    for i in range(count):
        wanted = smallest * (largest / smallest) ** (i / max(count - 1, 1))
        layers = max(1, round((wanted / (12 * aspect**2)) ** (1 / 3)))
        heads = max(1, round(aspect * layers / head))
        kv = heads // kv_ratio if heads % kv_ratio == 0 else heads
        shape = dict(n_layer=layers, n_head=heads, n_kv_head=kv, d_model=heads * head, ffn_hidden=None)
        cfg = dataclasses.replace(target, model=dataclasses.replace(m, **shape))
        lr = target.optim.lr * (m.d_model / (heads * head)) ** lr_exponent
        if not any(r.model.n_layer == layers and r.model.d_model == heads * head for r in out):
            out.append(Rung(f"r{len(out)}-d{heads * head}-l{layers}", GPTConfig.from_config(cfg, vocab), lr))
    if len(out) < min(count, 2):
        raise UserError(
            f"{smallest:.3g} to {largest:.3g} non-embedding parameters give {len(out)} distinct shape(s) "
            f"of the target's family: widen the range"
        )
    return out


def jobs(
    rungs_: list[Rung],
    ratio: float,
    multiples: list[float],
    out: Path,
    mode: str,
    fraction: float,
    batch_tokens: int,
    warmup_tokens: int,
) -> list[Job]:
    """Every run, in the order they can run: in branches mode each rung's longest budget is
    a warmup-stable-decay trunk and the others cool down from its checkpoints."""
    found = []
    for rung in rungs_:
        budgets = sorted({int(m * ratio * rung.params) // batch_tokens * batch_tokens for m in multiples})
        budgets = [b for b in budgets if b > 0]
        warmup = min(warmup_tokens, int(WARMUP_SHARE * budgets[0]))
        every = max(1, int(fraction * budgets[0] / batch_tokens) // 2)  # branch points near every budget
        common = [
            *rung.sets(),
            "schedule.decay=wsd",
            "schedule.lr_shape=cosine",  # the default; lr_shape is cosine decay's
            f"schedule.warmup_tokens={warmup}",
            f"schedule.cooldown_fraction={fraction}",
            f"schedule.batch_final_tokens={batch_tokens}",
            "schedule.batch_ramp_tokens=0",
            "train.max_steps=null",
            "train.eval_every=0",
        ]
        longest = budgets[-1]
        trunk = out / rung.name / f"tokens-{longest}"
        for tokens in budgets if mode == "runs" else [longest]:
            run_dir = out / rung.name / f"tokens-{tokens}"
            sets = [
                *common,
                f"run.dir={run_dir}",
                f"schedule.decay_tokens={tokens}",
                f"train.max_tokens={tokens}",
            ]
            if mode == "branches":
                sets += [f"checkpoint.every_steps={every}", "checkpoint.keep=100000"]
            found.append(Job(rung, tokens, run_dir, sets))
        if mode == "branches":
            found += [Job(rung, t, out / rung.name / f"tokens-{t}", common, trunk) for t in budgets[:-1]]
    return found


def result(run_dir: Path) -> dict | None:
    """A finished run's final held-out loss and bits per byte, or None if it has not finished."""
    from megatrain.train.metrics import read_events, read_metrics

    if not (run_dir / "events.jsonl").exists():
        return None
    ends = [e for e in read_events(run_dir) if e["event"] == "end"]
    if not ends or ends[-1].get("outcome") != "done" or "val_loss" not in ends[-1]:
        return None
    end = ends[-1]
    valid = [r for r in read_metrics(run_dir) if r["kind"] == "valid" and r["step"] == end["steps"]]
    return {
        "tokens": end["tokens"],
        "loss": end["val_loss"],
        "bpb": valid[0].get("val_bpb") if valid else None,
    }


def table(jobs_: list[Job]) -> list[dict]:
    """One row per finished run, with parameters (all, and without embeddings), tokens and
    FLOPs (flops_per_token x tokens: 6N + attention, the count MFU uses)."""
    rows = []
    for job in jobs_:
        done = result(job.run_dir)
        if done is None:
            continue
        rung = job.rung
        rows.append(
            {
                "run": str(job.run_dir),
                "rung": rung.name,
                "params": rung.params,
                "non_embedding_params": rung.non_embedding,
                "tokens": done["tokens"],
                "flops": flops_per_token(rung.model) * done["tokens"],
                "loss": done["loss"],
                "bpb": done["bpb"],
                "lr": rung.lr,
                "branch_of": str(job.trunk) if job.trunk else None,
            }
        )
    return rows


def write_table(rows: list[dict], out: Path) -> None:
    """ladder.json and ladder.csv in `out`, each written under a temporary name and renamed."""
    from megatrain.files import write_atomically

    write_atomically(out / "ladder.json", json.dumps(rows, indent=1) + "\n")
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=list(rows[0]) if rows else ["run"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_atomically(out / "ladder.csv", table.getvalue())
