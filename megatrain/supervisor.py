"""Relaunching a training command after a crash, for runs that must finish unattended.

    supervise(["deepspeed", "launch/pretrain.py", "--config", "c.yaml", "--resume", "auto"], max_restarts=10)

The command runs in its own process group. Exit 0 ends supervision; so do the exits a
restart cannot fix (megatrain.errors.ExitCode): 2 (bad input) and 3 (the loss kept
spiking: the run gave up on purpose). Any other exit (a crash, a rank killed by the kernel, a node lost) is
retried after `delay` seconds, up to `max_restarts` times; with `--resume auto` the
run continues from its newest intact checkpoint. SIGTERM/SIGINT to the supervisor go
to the whole process group (the ranks checkpoint and exit) and end supervision.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading

from megatrain.errors import ExitCode

FINAL_EXITS = {ExitCode.OK: "finished", ExitCode.BAD_INPUT: "bad input",
               ExitCode.GAVE_UP: "the loss kept spiking (spike.max_rollbacks)"}


def supervise(cmd: list[str], max_restarts: int, delay: float = 5.0, log=print) -> int:
    stop = {"signal": None}
    stopping = threading.Event()  # also ends a restart delay early
    child: subprocess.Popen | None = None
    code = int(ExitCode.RUN_ERROR)  # the last run's exit status

    def forward(signum, frame):
        stop["signal"] = signum
        stopping.set()
        if child is not None and child.poll() is None:
            os.killpg(child.pid, signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        for attempt in range(max_restarts + 1):
            if attempt:
                log(f"supervise: restart {attempt}/{max_restarts} in {delay:g}s")
                if stopping.wait(delay):  # a signal during the delay: no restart
                    log(f"supervise: stopped by {signal.Signals(stop['signal']).name} before restart {attempt}")
                    return code
            child = subprocess.Popen(cmd, start_new_session=True)
            code = child.wait()
            if stop["signal"] is not None:
                log(f"supervise: stopped by {signal.Signals(stop['signal']).name}; the run exited {code}")
                return code
            if code in FINAL_EXITS:
                log(f"supervise: exit {code} ({FINAL_EXITS[code]})")
                return code
            log(f"supervise: the run exited {code} ({_describe(code)})")
        log(f"supervise: giving up after {max_restarts} restarts")
        return code
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _describe(code: int) -> str:
    return f"killed by {signal.Signals(-code).name}" if code < 0 else "a crash or a killed rank"

