"""Writing a file so that a reader sees the old file or the new one, never a part of it.

The one helper every writer uses (checkpoints, the cached demo, similarity resources,
recorded settings); a set of result files is committed as a whole by
:func:`deltanmf.workflow.outputs.write_outputs`.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: str | Path, write: Callable, handle: bool = False) -> Path:
    """Call ``write(tmp)`` on a temporary name beside ``path`` (``handle``: ``write(fh)`` on it
    opened for binary writing), flush it to disk, then rename it to ``path``.

    The rename replaces any earlier file in one step, and the data reach the disk before
    it, so a crash leaves the old file or the new one. If ``write`` fails the temporary file
    is removed and ``path`` is left as it was.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        if handle:
            with open(tmp, "wb") as fh:
                write(fh)
        else:
            write(tmp)
        descriptor = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """:func:`atomic_write` of a text file."""
    return atomic_write(path, lambda tmp: tmp.write_text(text))
