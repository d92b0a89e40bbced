"""The one error type for bad input, so the command line can print it without a traceback."""

import numbers


class InputError(ValueError):
    """Raised when user input (a file, a key, a value) cannot be used; the message says how to fix it."""


def whole_number(value) -> bool:
    """Whether a setting is an integer (Python or numpy), not a bool (``True`` is an int to Python)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def real_number(value) -> bool:
    """Whether a setting is a real number (int or float, Python or numpy), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)
