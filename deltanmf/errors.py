"""The errors a user sees as one line, and the number tests the settings use.

The bottom layer: it imports nothing from the package, so every layer can raise these.
The command line (:mod:`deltanmf.workflow.main`) turns :class:`InputError` into exit code 2,
:class:`NonFiniteLossError` into exit code 3 and :class:`TrainingInterrupted` into 128 + the
signal's number, each with its message and no traceback.
"""
import numbers


class InputError(ValueError):
    """User input (a file, a key, a value) that cannot be used; the message says how to fix it."""


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss; the message names the steps and the term."""


class TrainingInterrupted(RuntimeError):
    """Training stopped on SIGINT/SIGTERM after saving a checkpoint it can be resumed from."""

    def __init__(self, message: str, checkpoint, signum: int):
        super().__init__(message)
        self.checkpoint, self.signum = checkpoint, signum


def whole_number(value) -> bool:
    """Whether a setting is an integer (Python or numpy), not a bool (``True`` is an int to Python)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def real_number(value) -> bool:
    """Whether a setting is a real number (int or float, Python or numpy), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)
