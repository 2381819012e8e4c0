"""On a lent GPU machine every test's outcome is written as it ends (one JSON line to
$MEGATRAIN_GPU_RESULTS, when set: tests/gpu/on_device.sh sets it), so that a phase cut off
at its time limit still says which tests passed."""

from __future__ import annotations

import json
import os


def pytest_runtest_logreport(report):
    path = os.environ.get("MEGATRAIN_GPU_RESULTS")
    if not path or (report.when != "call" and report.outcome == "passed"):
        return  # setup and teardown lines only when they fail or skip
    with open(path, "a") as f:
        f.write(
            json.dumps(
                {
                    "test": report.nodeid,
                    "when": report.when,
                    "outcome": report.outcome,
                    "seconds": round(report.duration, 2),
                }
            )
            + "\n"
        )
