"""The exceptions megatrain raises for problems a user should read in one line, and the
exit codes every entry script and launch/supervise.py agree on."""

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0  # finished, or stopped by SIGTERM/SIGINT with a checkpoint
    RUN_ERROR = 1  # a crash or a RunError: a restart may succeed
    BAD_INPUT = 2  # a UserError: fix the input; a restart would fail the same way
    GAVE_UP = 3  # the loss kept spiking (spike.max_rollbacks); checkpoint written


class UserError(ValueError):
    """Bad input from the user (config, data directory, checkpoint). The message is one
    line naming the file or key and the problem; entry scripts print it without a
    traceback and exit ExitCode.BAD_INPUT, which launch/supervise.py does not retry."""


class RunError(RuntimeError):
    """The run cannot go on for a reason outside its input: a checkpoint write failed
    (disk full, or a peer rank died mid-write). One line like UserError, but exit
    ExitCode.RUN_ERROR: launch/supervise.py restarts the run, which resumes from the last
    good checkpoint."""


def reason(e: BaseException) -> str:
    """An exception's cause in one line: an OSError's strerror ("No space left on device"),
    else the first line of its message."""
    strerror = getattr(e, "strerror", None) if isinstance(e, OSError) else None
    return strerror or (str(e).splitlines() or [type(e).__name__])[0]
