"""The one exception type the tokenizer package raises for bad input."""


class InputError(ValueError):
    """Bad user input (a file, an option). The message is one line that names the file
    or option and the problem; command-line entry points print it without a traceback."""
