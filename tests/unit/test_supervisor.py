"""launch/supervise.py's policy: which exits it retries, signals, the hostfile."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from megatrain.errors import UserError
from megatrain.supervisor import hostfile_ranks, supervise


def test_supervisor_restarts_crashes_and_stops_on_final_exits(tmp_path):
    """Exit 0, 2 (bad input) and 3 (gave up) end supervision; anything else is retried."""

    def child(*codes: int) -> list[str]:
        """A command that exits with codes[n] on its n-th run (negative: killed by that signal)."""
        count = tmp_path / f"runs-{'_'.join(map(str, codes))}"
        code = (
            f"import os, pathlib, signal; p = pathlib.Path({str(count)!r}); n = int(p.read_text()) if "
            "p.exists() "
            f"else 0; p.write_text(str(n + 1)); c = {list(codes)!r}[min(n, {len(codes) - 1})]; "
            "os.kill(os.getpid(), -c) if c < 0 else os._exit(c)"
        )
        return [sys.executable, "-c", code]

    log = []
    assert supervise(child(1, -9, 0), max_restarts=5, delay=0, log=log.append) == 0
    assert [m for m in log if "restart" in m] == [
        "supervise: restart 1/5 in 0s",
        "supervise: restart 2/5 in 0s",
    ]
    assert "supervise: the run exited -9 (killed by SIGKILL)" in log
    for final in (2, 3):
        log = []
        assert supervise(child(final, 0), max_restarts=5, delay=0, log=log.append) == final
        assert not any("restart" in m for m in log)
    log = []
    assert supervise(child(1), max_restarts=2, delay=0, log=log.append) == 1
    assert log[-1] == "supervise: giving up after 2 restarts"


def test_sigterm_during_the_restart_delay_is_not_lost(tmp_path):
    """A SIGTERM that reaches the supervisor while it waits to restart ends supervision
    there: no new run starts."""
    runs = tmp_path / "runs"
    cmd = [
        sys.executable,
        "-c",
        f"import pathlib; p = pathlib.Path({str(runs)!r}); "
        "p.write_text(p.read_text() + 'x' if p.exists() else 'x'); raise SystemExit(1)",
    ]
    log = []
    timer = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGTERM))  # inside the 30 s delay
    timer.start()
    try:
        code = supervise(cmd, max_restarts=3, delay=30, log=log.append)
    finally:
        timer.cancel()
    assert code == 1 and runs.read_text() == "x"  # one run, no restart
    assert log[-1] == "supervise: stopped by SIGTERM before restart 1"


def test_sigterm_goes_to_the_ranks_and_the_run_ends_by_itself(tmp_path):
    """SIGTERM to the supervisor reaches the ranks (the processes with --local_rank), not
    the launcher: DeepSpeed's launcher would kill them 30 s later. The rank writes its
    "checkpoint" and exits 0, the launcher with it, and supervision ends with that 0."""
    ready, written = tmp_path / "ready", tmp_path / "written"
    rank = (
        f"import pathlib, signal, sys, time\n"
        f"def end(*_): time.sleep(0.5); pathlib.Path({str(written)!r}).touch(); sys.exit(0)\n"
        f"signal.signal(signal.SIGTERM, end)\n"
        f"pathlib.Path({str(ready)!r}).touch()\n"
        f"while True: time.sleep(1)"
    )
    launcher = (
        f"import subprocess, sys; "  # dies at once on SIGTERM, as DeepSpeed's runner does
        f"sys.exit(subprocess.call([sys.executable, '-c', {rank!r}, '--local_rank=0']))"
    )

    def signal_when_ready():
        while not ready.exists():
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=signal_when_ready, daemon=True).start()
    log = []
    assert supervise([sys.executable, "-c", launcher], max_restarts=3, delay=0, log=log.append) == 0
    assert written.exists()
    assert log == ["supervise: stopped by SIGTERM; the run exited 0"]


def test_sigterm_goes_to_the_whole_run_without_local_ranks_or_the_second_time(tmp_path):
    """Without a --local_rank process below the launcher (ranks still starting, or on other
    nodes through pdsh) the first SIGTERM goes to the whole process group; with one, the
    first goes to the rank alone and a second to the whole group."""
    plain = "import time; time.sleep(1000)"  # no ranks: SIGTERM ends it
    log = []
    threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGTERM)).start()
    assert (
        supervise([sys.executable, "-c", plain], max_restarts=3, delay=0, log=log.append) == -signal.SIGTERM
    )
    assert log == ["supervise: stopped by SIGTERM; the run exited -15"]

    got, launcher_pid = tmp_path / "got", tmp_path / "launcher"  # a line per SIGTERM; it ends at the second
    rank = (
        f"import os, pathlib, signal, sys, time\n"
        f"def note(*_):\n"
        f"    with open({str(got)!r}, 'a') as f: f.write('SIGTERM\\n')\n"
        f"    if pathlib.Path({str(got)!r}).read_text().count('SIGTERM') == 2: sys.exit(0)\n"
        f"signal.signal(signal.SIGTERM, note)\n"
        f"pathlib.Path({str(got)!r}).touch()\n"
        f"pathlib.Path({str(launcher_pid)!r}).write_text(str(os.getppid()))\n"
        f"for _ in range(60): time.sleep(1)"
    )
    launcher = f"import subprocess, sys; subprocess.call([sys.executable, '-c', {rank!r}, '--local_rank=0'])"
    launcher_lived = []

    def signal_twice():
        while not launcher_pid.exists() or not launcher_pid.read_text():
            time.sleep(0.05)
        launcher = psutil.Process(int(launcher_pid.read_text()))
        os.kill(os.getpid(), signal.SIGTERM)  # the rank alone
        while got.read_text().count("SIGTERM") < 1:
            time.sleep(0.05)
        time.sleep(0.3)
        launcher_lived.append(launcher.is_running() and launcher.status() != psutil.STATUS_ZOMBIE)
        if launcher_lived[0]:  # (else supervision has ended and the signal would reach pytest)
            os.kill(os.getpid(), signal.SIGTERM)  # the whole group: the launcher too

    threading.Thread(target=signal_twice, daemon=True).start()
    log = []
    assert (
        supervise([sys.executable, "-c", launcher], max_restarts=3, delay=0, log=log.append)
        == -signal.SIGTERM
    )
    assert launcher_lived == [True] and got.read_text().count("SIGTERM") == 2
    assert log == ["supervise: stopped by SIGTERM; the run exited -15"]


def test_hostfile_is_read_before_every_launch(tmp_path):
    """The command gets the hostfile's rank count as {ranks}; when the hostfile shrinks the
    next launch uses the ranks left, and below --min-ranks supervision ends."""
    hostfile, seen = tmp_path / "hosts", tmp_path / "seen"
    hostfile.write_text("# two nodes\nnode-a slots=2\nnode-b slots=2\n")
    # Each run records its {ranks} and, like a scheduler after a lost node, drops node-b.
    code = (
        f"import pathlib, sys; s = pathlib.Path({str(seen)!r}); s.write_text((s.read_text() if s.exists() "
        "else '')"
        f" + sys.argv[1] + ' '); pathlib.Path({str(hostfile)!r}).write_text('node-a slots=2\\n'); "
        "raise SystemExit(0 if s.read_text().count(' ') == 2 else 1)"
    )
    log = []
    assert (
        supervise(
            [sys.executable, "-c", code, "{ranks}"],
            max_restarts=3,
            delay=0,
            log=log.append,
            hostfile=hostfile,
            min_ranks=2,
        )
        == 0
    )
    assert seen.read_text() == "4 2 "
    assert f"supervise: {hostfile}: 4 rank(s)" in log
    assert f"supervise: {hostfile}: 2 rank(s) (was 4: the run resumes on the new layout)" in log
    log = []
    failing = [sys.executable, "-c", "raise SystemExit(1)"]
    assert supervise(failing, max_restarts=3, delay=0, log=log.append, hostfile=hostfile, min_ranks=3) == 1
    assert log[-1] == f"supervise: {hostfile} has 2 rank(s), fewer than --min-ranks 3; stopping"


def test_a_malformed_hostfile_is_one_line(tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("node-a slots=2\nnode-b 4\n")
    with pytest.raises(UserError, match=r"hosts:2: expected 'HOST slots=N', got 'node-b 4'"):
        hostfile_ranks(hostfile)


def test_a_hung_run_is_stopped_and_relaunched(tmp_path):
    """With a heartbeat and --hang-timeout: a run that keeps touching its heartbeat runs on
    past the timeout; once the touches stop it is taken as hung, its process group gets
    SIGTERM, and the rank it leaves behind (one that ignores SIGTERM, as a rank stuck in a
    collective does) SIGKILL; the relaunch then finishes."""
    beat, count, rank_pid, beaten = (tmp_path / n for n in ("heartbeat", "runs", "rank.pid", "beaten"))
    code = f"""
import os, pathlib, signal, subprocess, sys, time
count = pathlib.Path({str(count)!r}); n = int(count.read_text()) if count.exists() else 0
count.write_text(str(n + 1))
if n:  # the relaunch: one beat, done
    pathlib.Path({str(beat)!r}).touch(); sys.exit(0)
ignores_sigterm = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(1000)"
rank = subprocess.Popen([sys.executable, "-c", ignores_sigterm])
pathlib.Path({str(rank_pid)!r}).write_text(str(rank.pid))
for _ in range(8):  # 2.4 s of progress: longer than the timeout, never silent for as long
    pathlib.Path({str(beat)!r}).touch(); time.sleep(0.3)
pathlib.Path({str(beaten)!r}).touch()
time.sleep(1000)  # hung; SIGTERM ends this process (as DeepSpeed's launcher exits), not its rank
"""
    log = []
    assert (
        supervise(
            [sys.executable, "-c", code],
            max_restarts=2,
            delay=0,
            log=log.append,
            heartbeat=beat,
            hang_timeout=1.0,
            hang_grace=1.0,
        )
        == 0
    )
    assert count.read_text() == "2" and beaten.exists()  # relaunched once, and only after the beats stopped
    assert any(m.startswith(f"supervise: the run hung: {beat} not touched for ") for m in log), log
    assert "supervise: still running 1s after SIGTERM; SIGKILL" in log  # the group's grace, not the child's
    status = Path(f"/proc/{rank_pid.read_text()}/status")
    assert (
        not status.exists() or "State:\tZ" in status.read_text()
    )  # the left-behind rank is gone (or a zombie)


def test_a_start_that_never_starts_is_relaunched_and_a_slow_one_is_not(tmp_path):
    """--start-timeout: the first launch never beats (a previous run's heartbeat is there: it
    does not count) and is stopped as hung before its first step; the relaunch takes longer
    than --hang-timeout to its first beat, within --start-timeout, and runs to its end."""
    beat, count = tmp_path / "heartbeat", tmp_path / "runs"
    beat.touch()
    code = f"""
import pathlib, sys, time
count = pathlib.Path({str(count)!r}); n = int(count.read_text()) if count.exists() else 0
count.write_text(str(n + 1))
if not n:
    time.sleep(1000)  # waits on something that never comes
time.sleep(1.5)  # a slow start
for _ in range(3):
    pathlib.Path({str(beat)!r}).touch(); time.sleep(0.3)
"""
    log = []
    options = dict(heartbeat=beat, hang_timeout=1.0, start_timeout=2.5, hang_grace=1.0)
    assert supervise([sys.executable, "-c", code], max_restarts=2, delay=0, log=log.append, **options) == 0
    assert count.read_text() == "2" and log.count("supervise: restart 1/2 in 0s") == 1, log
    hung = [m for m in log if m.startswith("supervise: the run hung")]
    assert len(hung) == 1, log
    assert hung[0].startswith(f"supervise: the run hung before its first step: no beat of {beat} in the ")
    assert hung[0].endswith("since its launch (--start-timeout 2.5); stopping it")


def test_a_hung_runs_ranks_get_the_grace_after_its_launcher_exits(tmp_path):
    """DeepSpeed's runner dies at once on SIGTERM while its ranks are still ending: the
    ranks get the grace too (a rank that takes 0.5 s to end on SIGTERM ends by itself, no
    SIGKILL)."""
    count, ended = tmp_path / "runs", tmp_path / "ended"
    rank = (
        f"import pathlib, signal, sys, time\n"
        f"def end(*_): time.sleep(0.5); pathlib.Path({str(ended)!r}).touch(); sys.exit(0)\n"
        f"signal.signal(signal.SIGTERM, end)\n"
        f"while True: time.sleep(1)"
    )
    code = f"""
import pathlib, subprocess, sys, time
count = pathlib.Path({str(count)!r}); n = int(count.read_text()) if count.exists() else 0
count.write_text(str(n + 1))
if n:
    sys.exit(0)
subprocess.Popen([sys.executable, "-c", {rank!r}])
time.sleep(1000)  # no heartbeat at all: hung from the start
"""
    log = []
    assert (
        supervise(
            [sys.executable, "-c", code],
            max_restarts=1,
            delay=0,
            log=log.append,
            heartbeat=tmp_path / "heartbeat",
            hang_timeout=1.0,
            hang_grace=30.0,
        )
        == 0
    )
    assert ended.exists() and count.read_text() == "2"
    assert not any("SIGKILL" in m for m in log), log


def test_the_heartbeat_is_touched_by_rank_0_at_most_once_a_second(tmp_path):
    from megatrain.train.callbacks import Heartbeat

    path = tmp_path / "heartbeat"
    Heartbeat(path, enabled=False).on_start(None)  # not rank 0
    assert not path.exists()
    beat = Heartbeat(path, enabled=True)
    beat.on_start(None)
    os.utime(path, (0, 0))
    assert beat.on_step(None, {}, False) is False and path.stat().st_mtime == 0  # within the second: no I/O
    beat.last -= Heartbeat.EVERY_S
    beat.on_step(None, {}, False)
    assert path.stat().st_mtime > 0
