"""The exceptions megatrain raises for problems a user should read in one line."""


class UserError(ValueError):
    """Bad input from the user (config, data directory, checkpoint). The message is one
    line naming the file or key and the problem; entry scripts print it without a
    traceback and exit 2, which launch/supervise.py does not retry."""


class RunError(RuntimeError):
    """The run cannot go on for a reason outside its input: a checkpoint write failed
    (disk full, or a peer rank died mid-write). One line like UserError, but exit status
    1: launch/supervise.py restarts the run, which resumes from the last good checkpoint."""
