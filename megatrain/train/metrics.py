"""Run logs, written by rank 0: metrics.jsonl, events.jsonl, wandb, a progress bar.

metrics.jsonl holds one JSON object per optimizer step ({"kind": "train", ...}) and
one per validation pass ({"kind": "valid", ...}). On resume, rows past the restored
step are dropped (they belong to a timeline that was rolled back), so the file always
reads as one run; events.jsonl keeps what happened (resumes, rollbacks, stops).
"""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path

import yaml
from tqdm import tqdm

from megatrain.files import read_jsonl, write_atomically

METRICS = "metrics.jsonl"
EVENTS = "events.jsonl"


class RunLog:
    def __init__(self, run, logging, train, resolved: dict, enabled: bool):
        """cfg.run, cfg.logging, cfg.train (the bar's length), and the resolved config (for
        config.yaml and wandb). `enabled` on rank 0 only: it writes config.yaml and the logs."""
        run_dir, t = Path(run.dir), train
        self.enabled = enabled
        self.metrics_path, self.events_path = run_dir / METRICS, run_dir / EVENTS
        self._bar = self._wandb = None
        self._wandb_step = 0
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        write_atomically(run_dir / "config.yaml", yaml.safe_dump(resolved, sort_keys=False))
        name = run.name or run_dir.name
        if logging.progress:  # counts tokens when the run ends by tokens (the batch may grow), else steps
            self._by_tokens = t.max_steps is None
            self._bar = tqdm(
                total=t.max_tokens if self._by_tokens else t.max_steps,
                desc=name,
                unit="tok" if self._by_tokens else "step",
                unit_scale=self._by_tokens,
                dynamic_ncols=True,
            )
        if logging.wandb:
            import wandb

            os.environ.setdefault("WANDB_MODE", "offline")  # no network unless the user asks for it
            os.environ.setdefault("WANDB_SILENT", "true")
            self._wandb = wandb.init(
                project=logging.wandb_project,
                name=name,
                dir=str(run_dir),
                config=resolved,
                resume="allow",
                id=_wandb_id(run_dir),
            )

    def truncate_after(self, step: int) -> None:
        """Drop rows of steps after `step` (resume from a checkpoint at `step`)."""
        if not self.enabled or not self.metrics_path.exists():
            return
        kept = [r for r in read_jsonl(self.metrics_path) if r.get("step", 0) <= step]
        write_atomically(self.metrics_path, "".join(json.dumps(r) + "\n" for r in kept))

    def log(self, row: dict) -> None:
        if not self.enabled:
            return
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self._wandb is not None:
            values = wandb_values(row)
            for block, shares in row.get("moe_load", {}).items():  # one bar per expert
                import wandb

                edges = list(range(len(shares) + 1))
                values[f"train/moe_load/{block}"] = wandb.Histogram(np_histogram=(shares, edges))
            # Rows about an earlier step (a rollback's, a background checkpoint's) go at the
            # newest step: wandb drops values logged at a step below one it has seen.
            self._wandb_step = max(row["step"], self._wandb_step)
            self._wandb.log(values, step=self._wandb_step)

    def event(self, name: str, **fields) -> None:
        if not self.enabled:
            return
        row = {"event": name, "time": time.time(), **fields}
        with open(self.events_path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def progress(self, step: int, tokens: int, **postfix) -> None:
        if self._bar is not None:
            self._bar.n = tokens if self._by_tokens else step
            self._bar.set_postfix(postfix, refresh=False)
            self._bar.refresh()

    def print(self, message: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(message)
        else:
            print(message, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._wandb is not None:
            self._wandb.finish()


def wandb_values(row: dict) -> dict:
    """A metrics row as wandb keys: its numbers under train/, valid/SET/ or checkpoint/, each source's
    token count of a blend as train/source_tokens/NAME, strings and the step left out."""
    kind = row.get("kind")
    prefix = (
        f"valid/{row['set']}/" if kind == "valid" else "checkpoint/" if kind == "checkpoint" else "train/"
    )
    flat = {**row, **{f"source_tokens/{k}": v for k, v in row.get("source_tokens", {}).items()}}
    return {prefix + k: v for k, v in flat.items() if isinstance(v, (int, float)) and k != "step"}


def _wandb_id(run_dir: Path) -> str:
    """A stable wandb run id per run directory, so a resumed run continues the same wandb run."""
    path = run_dir / ".wandb_id"
    if not path.exists():
        path.write_text(uuid.uuid4().hex[:12])
    return path.read_text().strip()


def read_metrics(run_dir: str | Path) -> list[dict]:
    return read_jsonl(Path(run_dir) / METRICS)


def read_events(run_dir: str | Path) -> list[dict]:
    return read_jsonl(Path(run_dir) / EVENTS)
