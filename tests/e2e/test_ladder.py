"""The model ladder end to end (launch/ladder.py): two sizes of the tests' tiny model, two
budgets each as a warmup-stable-decay trunk and a cooldown branch; stopped and run again it
reuses what finished."""

from __future__ import annotations

import json

from helpers import TINY_CONFIG, run_script

from megatrain.scaling import ladder


def test_a_small_ladder_trains_collects_and_resumes_without_retraining(tmp_path, small_data):
    out = tmp_path / "ladder"
    args = ("--config", TINY_CONFIG, "--set", f"data.path={small_data}", "--set", "train.eval_samples=32")
    shape = ("--out", out, "--sizes", "2", "--smallest", "3e3", "--largest", "2.5e4", "--ratio", "0.1")
    first = run_script("ladder.py", *args, *shape, "--multiples", "1", "2", timeout=900)
    rows = json.loads((out / "ladder.json").read_text())
    assert len(rows) == 4 and len({r["rung"] for r in rows}) == 2, first.stdout
    by_rung = {}
    for r in rows:
        by_rung.setdefault(r["rung"], []).append(r)
        assert (
            r["params"] > r["non_embedding_params"] > 0 and r["flops"] > 6 * r["params"] * r["tokens"] * 0.5
        )
        assert 0 < r["loss"] < 8 and r["bpb"] > 0
    for runs in by_rung.values():
        short, long = sorted(runs, key=lambda r: r["tokens"])
        assert long["tokens"] >= 2 * short["tokens"] - 512 and short["branch_of"] == long["run"]
        assert long["branch_of"] is None
    assert (out / "ladder.csv").read_text().splitlines()[0].startswith("run,rung,params,non_embedding_params")
    # stopped before the last branch finished: run again, only that one trains
    last = [r for r in rows if r["branch_of"]][-1]
    kept = {r["run"]: (tmp_path / r["run"]).stat().st_mtime_ns for r in rows if r is not last}
    events = ladder.Path(last["run"]) / "events.jsonl"
    events.write_text("".join(line for line in events.read_text().splitlines(True) if '"end"' not in line))
    again = run_script("ladder.py", *args, *shape, "--multiples", "1", "2", timeout=900)
    assert again.stdout.count("finished before, reused") == 3 and again.stdout.count(": training") == 1
    assert {r["run"]: r["loss"] for r in json.loads((out / "ladder.json").read_text())} == {
        r["run"]: r["loss"] for r in rows
    }
    assert all((tmp_path / run).stat().st_mtime_ns == t for run, t in kept.items())
