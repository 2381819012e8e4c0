"""The exception megatrain raises for bad user input."""


class UserError(ValueError):
    """Bad input from the user (config, data directory, checkpoint). The message is one
    line naming the file or key and the problem; entry scripts print it without a
    traceback."""
