"""The one error type for bad input, so the command line can print it without a traceback."""


class InputError(ValueError):
    """Raised when user input (a file, a key, a value) cannot be used; the message says how to fix it."""
