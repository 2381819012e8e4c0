"""Relaunching a training command after a crash, for runs that must finish unattended.

    supervise(["deepspeed", "launch/pretrain.py", "--config", "c.yaml", "--resume", "auto"], max_restarts=10)

The command runs in its own process group. Exit 0 ends supervision; so do the exits a
restart cannot fix (megatrain.errors.ExitCode): 2 (bad input) and 3 (the loss kept
spiking: the run gave up on purpose). Any other exit (a crash, a rank killed by the kernel, a node lost) is
retried after `delay` seconds, up to `max_restarts` times; with `--resume auto` the
run continues from its newest intact checkpoint. SIGTERM/SIGINT to the supervisor go
to the ranks (they checkpoint and exit) and end supervision once the run has exited.

With a `hostfile` (DeepSpeed's format, "HOST slots=N" per line; the same file the command
passes to the launcher), it is read again before every launch: when a node was lost and
the scheduler or an operator took it out, the run goes on with the ranks that are left,
resuming its checkpoint on the new layout (docs/checkpoints.md); fewer than `min_ranks`
ends supervision. "{ranks}" in the command becomes the hostfile's rank count (for one node:
`deepspeed --num_gpus {ranks} ...`; across nodes DeepSpeed reads the hostfile itself).

With a `heartbeat` file (RUN_DIR/heartbeat, touched by the run after every step) and a
`hang_timeout`, a run whose heartbeat has not moved for that long (counted from its launch
at the earliest) is taken as hung, a collective waiting on a rank that will never come or
a filesystem that stopped answering: its process group gets SIGTERM, SIGKILL after
`hang_grace` seconds, and it is relaunched as after a crash. Until the run's first beat
(when it has started, just before step 1) the limit is `start_timeout` (default: the same):
a start that never starts (a lock, a filesystem, a rendezvous that never completes) is
relaunched too.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import psutil

from megatrain.errors import ExitCode, UserError

FINAL_EXITS = {
    ExitCode.OK: "finished",
    ExitCode.BAD_INPUT: "bad input",
    ExitCode.GAVE_UP: "the loss kept spiking (spike.max_rollbacks)",
}


def hostfile_ranks(path: Path) -> dict[str, int]:
    """{host: slots} of a DeepSpeed hostfile (comments and blank lines ignored)."""
    hosts = {}
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"(\S+)\s+slots=(\d+)", line)
        if match is None:
            raise UserError(f"{path}:{n}: expected 'HOST slots=N', got {line!r}")
        hosts[match.group(1)] = int(match.group(2))
    return hosts


def rank_processes(pid: int) -> list[psutil.Process]:
    """The training ranks below process `pid`: the processes DeepSpeed's launcher started
    with --local_rank (as it does unless told --no_local_rank)."""
    try:
        procs = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    return [p for p in procs if any(a.startswith("--local_rank=") for a in _cmdline(p))]


def _cmdline(p: psutil.Process) -> list[str]:
    try:
        return p.cmdline()
    except psutil.Error:
        return []


def supervise(
    cmd: list[str],
    max_restarts: int,
    delay: float = 5.0,
    log=print,
    hostfile: Path | None = None,
    min_ranks: int = 1,
    heartbeat: Path | None = None,
    hang_timeout: float = 0.0,
    hang_grace: float = 60.0,
    start_timeout: float | None = None,
) -> int:
    stop = {"signal": None}
    limits = (start_timeout or hang_timeout, hang_timeout)
    stopping = threading.Event()  # also ends a restart delay early
    child: subprocess.Popen | None = None
    code = int(ExitCode.RUN_ERROR)  # the last run's exit status
    launched_ranks = 0  # ranks in the hostfile at the last launch

    def forward(signum, frame):
        first = stop["signal"] is None
        stop["signal"] = signum
        stopping.set()
        if child is not None and child.poll() is None:
            # The first signal goes to the ranks themselves: they agree with the others, write
            # their checkpoint however long it takes and exit 0, and the launcher with them.
            # Signalled, DeepSpeed's launcher would kill its ranks 30 s later. Without local
            # ranks (still starting; across nodes, where pdsh starts them) and on a second
            # signal, the whole process group gets it.
            ranks = rank_processes(child.pid) if first else []
            for rank in ranks:
                try:
                    rank.send_signal(signum)
                except psutil.NoSuchProcess:
                    pass
            if not ranks:
                _signal_group(child.pid, signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        for attempt in range(max_restarts + 1):
            if attempt:
                log(f"supervise: restart {attempt}/{max_restarts} in {delay:g}s")
                if stopping.wait(delay):  # a signal during the delay: no restart
                    log(
                        f"supervise: stopped by {signal.Signals(stop['signal']).name} before restart "
                        f"{attempt}"
                    )
                    return code
            if hostfile is not None:
                ranks = sum(hostfile_ranks(hostfile).values())
                if ranks != launched_ranks:
                    change = (
                        f" (was {launched_ranks}: the run resumes on the new layout)"
                        if launched_ranks
                        else ""
                    )
                    log(f"supervise: {hostfile}: {ranks} rank(s){change}")
                if ranks < min_ranks:
                    log(
                        f"supervise: {hostfile} has {ranks} rank(s), fewer than --min-ranks {min_ranks}; "
                        "stopping"
                    )
                    return code
                launched_ranks = ranks
            launch = [a.replace("{ranks}", str(launched_ranks)) for a in cmd] if hostfile is not None else cmd
            child = subprocess.Popen(launch, start_new_session=True)
            code = (
                _wait(child, heartbeat, limits, hang_grace, stopping, log) if hang_timeout else child.wait()
            )
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


def _wait(
    child: subprocess.Popen,
    heartbeat: Path,
    limits: tuple[float, float],
    hang_grace: float,
    stopping: threading.Event,
    log,
) -> int:
    """The child's exit status; if its heartbeat does not move for the limit (before its first
    beat after the launch, then after), it is stopped (SIGTERM to its group, SIGKILL to what
    is left of the group after hang_grace) and its status returned. Once a signal was passed
    on to it, it is left to write its checkpoint, however long."""
    launched = time.time()
    while True:
        try:
            return child.wait(timeout=min(10.0, min(limits) / 4))
        except subprocess.TimeoutExpired:
            if stopping.is_set():
                return child.wait()
        try:
            beat = heartbeat.stat().st_mtime
        except FileNotFoundError:
            beat = 0.0
        started = beat > launched  # an older beat is a previous launch's
        last, limit = (beat, limits[1]) if started else (launched, limits[0])
        if time.time() - last > limit:
            break
    if started:
        log(
            f"supervise: the run hung: {heartbeat} not touched for {time.time() - last:.0f}s "
            f"(--hang-timeout {limit:g}); stopping it"
        )
    else:
        log(
            f"supervise: the run hung before its first step: no beat of {heartbeat} in the "
            f"{time.time() - last:.0f}s since its launch (--start-timeout {limit:g}); stopping it"
        )
    _signal_group(child.pid, signal.SIGTERM)
    # The whole group gets the grace, not only the child: DeepSpeed's runner exits at once
    # on SIGTERM while its launcher is still ending the ranks.
    deadline = time.time() + hang_grace
    while (child.poll() is None or _group_alive(child.pid)) and time.time() < deadline:
        time.sleep(0.2)
    if child.poll() is None or _group_alive(child.pid):
        log(f"supervise: still running {hang_grace:g}s after SIGTERM; SIGKILL")
        _signal_group(child.pid, signal.SIGKILL)  # ranks left behind, hung, holding their devices
    return child.wait()


def _group_alive(pgid: int) -> bool:
    """Whether a live process is left in group `pgid` (zombies, which a container's init may
    never reap, do not count)."""
    for p in psutil.process_iter(["status"]):
        try:
            if os.getpgid(p.pid) == pgid and p.info["status"] != psutil.STATUS_ZOMBIE:
                return True
        except (ProcessLookupError, psutil.Error):
            pass
    return False


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:  # nothing left in it
        pass


def _describe(code: int) -> str:
    return f"killed by {signal.Signals(-code).name}" if code < 0 else "a crash or a killed rank"
