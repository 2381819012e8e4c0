"""Soak: random kills and injected loss spikes on a tiny 2-rank run, trial after trial.

Each trial runs a 40-step tiny run under launch/supervise.py (--resume auto, with a start
and a hang timeout) and draws:
  - with probability 1/2, a SIGKILL of a random rank while the first launch starts (a
    random moment between its ranks' appearance and its first step: loading ops, data,
    model), which must not stop the relaunch from starting;
  - 0 to 2 SIGKILLs of a random rank, each at a random moment inside a random step of a
    launch (never two in one launch: a kill ends it), checkpoint writes included;
  - a loss spike, one of: a poisoned stretch of data (random tokens, 2 steps' worth) at a
    random step from 24 on, a NaN loss at a random step from 12 on, or none.
With --async-save the checkpoints are written in the background (checkpoint.async_save), and
each trial also draws a checkpoint step whose background write is cut short: a rank is
SIGKILLed from its writer thread halfway through its files (the whole run goes), besides
the random kills, which may land in background writes too.
A trial passes when the run finishes, every step 1..40 is in metrics.jsonl, no data is
lost, and its losses equal, step for step, those of a reference run that never crashed
and skipped from the start what the trial skipped (the sampler's record in the final
checkpoint, replayed through data.skip). The poison is part of the data, so the
reference sees it too; a NaN loss is an event, so it does not. "Data lost" counts samples
the reference trained on and the trial did not: it must be 0. "Poison trained" counts
poisoned samples the trial trained on anyway: the guard skips to the end of the step
that spiked, and a remainder that moves the loss less than the threshold goes by.

    python bench/soak.py [--trials 20] [--seed S] [--async-save] [--json FILE]

Not a CI test: 20 trials take ~20 minutes on 2 cores.
"""

from __future__ import annotations

from _bench import SHARED_DATA, arg_parser, machine, print_table, write_json

import json
import random
import subprocess
import sysconfig
import tempfile
import time
from pathlib import Path

from helpers import (
    REPO,
    kill_a_rank,
    last_train_row,
    launches,
    pretrain_command,
    rank_processes,
    supervise_command,
)

from megatrain.data import prepare_dataset
from megatrain.train.checkpoint import Checkpointer
from megatrain.train.metrics import read_metrics
from tokenizer import TrainerOptions, train_tokenizer

STEPS = 40
SAMPLES_PER_STEP = 16  # micro_batch 4 x 2 micro-batches x 2 ranks
# The tests' tiny model on configs/tiny-cpu.yaml; a rollback point every 5 steps, the
# guard judging from step 8 on.
RUN = [
    "model.n_layer=2",
    "model.n_head=2",
    "model.d_model=32",
    "train.seq_len=32",
    "train.micro_batch=4",
    f"train.max_steps={STEPS}",
    "train.max_tokens=null",
    "train.eval_every=0",
    "train.peak_flops=5e10",
    "optim.lr=3e-3",
    "optim.grad_clip=0.6",
    "schedule.lr_shape=constant",
    "schedule.warmup_tokens=0",
    "schedule.batch_final_tokens=512",
    "schedule.batch_ramp_tokens=0",
    "parallel.zero_stage=1",
    "checkpoint.every_steps=5",
    "checkpoint.keep=3",
    "logging.progress=false",
    "spike.min_history=8",
    "spike.window=16",
    "spike.snapshot_every=5",
    "spike.skip=4",
    "spike.threshold=5",
]


def corpus() -> list[str]:
    shakespeare = SHARED_DATA / "tinyshakespeare.txt"
    if shakespeare.exists():
        return [str(shakespeare)]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return [str(stdlib / name) for name in ("json", "email", "html", "http")]


def plan(rng: random.Random, async_save: bool) -> dict:
    spike = rng.choice(["poison", "nan", "none"])
    return {
        "writer_kill": rng.randrange(5, STEPS, 5) if async_save else None,  # a checkpoint step
        "start_kill": rng.random() < 0.5,  # in the first launch's start, after this many seconds
        "start_kill_after": rng.uniform(0.0, 6.0),
        "kills": sorted(rng.sample(range(2, STEPS - 3), rng.randint(0, 2))),  # after these steps
        "spike": spike,
        "poison_step": rng.randint(24, STEPS - 6) if spike == "poison" else None,
        "nan_step": rng.randint(12, STEPS - 2) if spike == "nan" else None,
    }


def run_trial(work: Path, data: Path, p: dict, rng: random.Random) -> dict:
    run = work / "run"
    work.mkdir(parents=True)
    faults = [f"nan_loss@{p['nan_step']}"] if p["nan_step"] is not None else []
    faults += [f"writer_kill@{p['writer_kill']}:{rng.randrange(2)}"] if p["writer_kill"] else []
    background = [f"checkpoint.async_save={str(p['writer_kill'] is not None).lower()}"]
    cmd = supervise_command(
        pretrain_command(
            REPO / "configs" / "tiny-cpu.yaml",
            [*RUN, *background, f"run.dir={run}", f"data.path={data}"],
            faults=faults,
            poison=poison(p),
            fault_state=work / "faults",
        ),
        8,
        0,
        *("--heartbeat", str(run / "heartbeat"), "--hang-timeout", "120", "--start-timeout", "90"),
    )
    kills, killed_in = list(p["kills"]), set()
    start_kill, ranks_seen = p["start_kill"], None
    with open(work / "supervise.log", "w") as log:
        sup = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + 600
        while sup.poll() is None and time.time() < deadline:
            launch, row = launches(run), last_train_row(run)
            if start_kill and launch == 0:  # the first launch is still starting
                ranks_seen = ranks_seen or (rank_processes(sup.pid) and time.time())
                if ranks_seen and time.time() - ranks_seen >= p["start_kill_after"]:
                    start_kill = not kill_a_rank(sup.pid, rng, 0.0)
            if kills and launch not in killed_in and launch > 0 and row["step"] >= kills[0]:
                if kill_a_rank(sup.pid, rng, row.get("step_time", 0.1)):
                    killed_in.add(launch)
                    kills.pop(0)
            time.sleep(0.02)
        if sup.poll() is None:
            sup.kill()
        code = sup.wait()
    output = (work / "supervise.log").read_text()
    latest = Checkpointer(run, keep=99).latest() if code == 0 else None
    rollbacks = [r for r in read_metrics(run) if r["kind"] == "rollback"]
    return {
        "exit": code,
        "start_killed": p["start_kill"] and not start_kill,
        "hung": output.count("supervise: the run hung"),
        "kills": len(p["kills"]) - len(kills),
        "restarts": output.count("supervise: restart"),
        "rollbacks": len(rollbacks),
        "steps": [r["step"] for r in read_metrics(run) if r["kind"] == "train"],
        "losses": [r["loss"] for r in read_metrics(run) if r["kind"] == "train"],
        "final": Checkpointer.read_state(latest) if latest else None,
    }


def poison(p: dict) -> str | None:
    """--poison START:COUNT for tests/faulty_pretrain.py: two steps' worth of samples."""
    if p["poison_step"] is None:
        return None
    return f"{(p['poison_step'] - 1) * SAMPLES_PER_STEP}:{2 * SAMPLES_PER_STEP}"


def reference(work: Path, data: Path, skipped: list, poisoned: str | None, cache: dict) -> dict:
    """A run on the same data (poison included) that never crashed and skipped `skipped` from the start."""
    skip = json.dumps(skipped)
    key = (skip, poisoned)
    if key not in cache:
        run = work / f"reference-{len(cache)}"
        cmd = pretrain_command(
            REPO / "configs" / "tiny-cpu.yaml",
            [*RUN, f"run.dir={run}", f"data.path={data}", f"data.skip={skip}"],
            resume="none",
            poison=poisoned,
        )
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"reference run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        cache[key] = {
            "losses": [r["loss"] for r in read_metrics(run) if r["kind"] == "train"],
            "final": Checkpointer.read_state(Checkpointer(run, keep=99).latest()),
        }
    return cache[key]


def sampler(run: dict) -> dict:
    """The sampler's state in a run's final checkpoint."""
    return run["final"]["state"]["data"]["sampler"]


def trained(state: dict) -> set[int]:
    """Global sample positions a run trained on: all it went past, less what it skipped."""
    taken = set(range(state["consumed"]))
    for position, count in state["skipped"]:
        taken -= set(range(position, position + count))
    return taken


def main():
    ap = arg_parser(__doc__)
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--seed", type=int, default=None, help="default: a random one (printed)")
    ap.add_argument("--async-save", action="store_true", help="checkpoints written in the background")
    args = ap.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(10**6)
    rng = random.Random(seed)
    work = Path(tempfile.mkdtemp(prefix="bench-soak-"))
    print(f"soak: {args.trials} trials, seed {seed}, work dir {work}", flush=True)
    tok, data = work / "tokenizer", work / "data"
    train_tokenizer(corpus(), tok, TrainerOptions(vocab_size=1024), progress=False)
    prepare_dataset(tok, corpus(), data, valid_fraction=0.0, workers=2, progress=False)

    cache, rows = {}, []
    for i in range(args.trials):
        p = plan(rng, args.async_save)
        t0 = time.perf_counter()
        trial = run_trial(work / f"trial-{i:02d}", data, p, rng)
        ok_run = (
            trial["exit"] == 0 and trial["steps"] == list(range(1, STEPS + 1)) and trial["final"] is not None
        )
        lost = poison_trained = None
        matched = False
        if ok_run:
            ref = reference(work, data, sampler(trial)["skipped"], poison(p), cache)
            lost = len(trained(sampler(ref)) - trained(sampler(trial)))
            matched = trial["losses"] == ref["losses"]
            if p["poison_step"] is not None:
                start = (p["poison_step"] - 1) * SAMPLES_PER_STEP
                poison_trained = len(
                    trained(sampler(trial)) & set(range(start, start + 2 * SAMPLES_PER_STEP))
                )
        row = {
            "trial": i,
            "start_kill": trial["start_killed"],
            "kills": trial["kills"],
            "writer_kill": p["writer_kill"] or "-",
            "spike": p["spike"],
            "at_step": p["poison_step"] or p["nan_step"],
            "restarts": trial["restarts"],
            "hung": trial["hung"],
            "rollbacks": trial["rollbacks"],
            "finished": ok_run,
            "data_lost": lost,
            "poison_trained": poison_trained,
            "matched": matched,
            "seconds": round(time.perf_counter() - t0, 1),
        }
        rows.append(row)
        print(f"trial {i}: {row}", flush=True)

    shown = [
        "trial",
        "start_kill",
        "kills",
        *(["writer_kill"] if args.async_save else []),
        "spike",
        "at_step",
        "restarts",
        "hung",
        "rollbacks",
        "finished",
    ]
    shown += ["data_lost", "poison_trained", "matched"]
    print_table(
        f"Soak: {args.trials} trials of a {STEPS}-step tiny run, 2 ranks (seed {seed})",
        [name.replace("_", " ") for name in shown],
        [["-" if r[name] is None else r[name] for name in shown] for r in rows],
    )
    summary = {
        "trials": len(rows),
        "recoveries": sum(r["restarts"] + r["rollbacks"] for r in rows),
        "kills": sum(r["kills"] for r in rows),
        "start_kills": sum(r["start_kill"] for r in rows),
        "writer_kills": sum(r["writer_kill"] != "-" for r in rows),
        "hung": sum(r["hung"] for r in rows),
        "spikes": sum(r["spike"] != "none" for r in rows),
        "finished": sum(r["finished"] for r in rows),
        "data_lost": sum(r["data_lost"] or 0 for r in rows),
        "all_matched": all(r["matched"] for r in rows),
    }
    print(
        f"\ntrials {summary['trials']}, recoveries {summary['recoveries']} "
        f"({summary['kills']} kills in steps, {summary['start_kills']} in starts, "
        f"{summary['writer_kills']} in background writes, "
        f"{summary['spikes']} injected spikes; {summary['hung']} hung), finished {summary['finished']}, "
        f"data lost {summary['data_lost']} samples, every final trajectory matched: {summary['all_matched']}"
    )
    write_json(args.json, {"seed": seed, "machine": machine(), "summary": summary, "trials": rows})
    return 0 if summary["all_matched"] and summary["finished"] == summary["trials"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
