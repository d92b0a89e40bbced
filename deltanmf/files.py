"""Writing so that a reader sees the old version or the new one, never a part of it.

:func:`atomic_write` writes one file (checkpoints, the cached demo, similarity resources);
:func:`commit_results` makes a whole set of files a run's results in one step: the files are
written into a folder of their own under ``<run>/.results/``, and ``<run>/results`` (a link to
that folder) is switched to it by one rename. A reader of ``<run>/results/`` sees the old
complete set or the new complete set, whenever a writer is killed.
"""
from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

RESULTS = "results"      # <run>/results: the run's results (a link to the committed set)
COMMITTED = ".results"   # <run>/.results/<set>: the sets, the committed one and any being written


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
        _fsync(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """:func:`atomic_write` of a text file."""
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def _fsync(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def results_dir(run_dir: str | Path) -> Path:
    """Where a run's results are: ``<run>/results/``, or the run directory itself for a run
    written before results were committed as a set (``results.h5ad`` beside ``train.log``)."""
    run_dir = Path(run_dir)
    if not (run_dir / RESULTS).exists() and (run_dir / "results.h5ad").is_file():
        return run_dir
    return run_dir / RESULTS


def commit_results(run_dir: str | Path, write: Callable[[Path], None]) -> Path:
    """Write a set of files with ``write(folder)`` and make it ``<run>/results`` in one step.

    Returns the link ``<run>/results``. The set's folder is flushed to disk before the link
    is switched (one ``rename`` of a new link over the old), and the previous set is removed
    after. If ``write`` fails, its folder is removed and the previous results stand.
    """
    run_dir = Path(run_dir)
    committed = run_dir / COMMITTED
    committed.mkdir(parents=True, exist_ok=True)
    folder = committed / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{time.monotonic_ns()}"
    folder.mkdir()
    link = run_dir / RESULTS
    previous = Path(os.readlink(link)) if link.is_symlink() else None
    try:
        write(folder)
        for path in folder.iterdir():
            _fsync(path)
        _fsync(folder)
        tmp = run_dir / f".{RESULTS}.{os.getpid()}.link"
        tmp.unlink(missing_ok=True)
        os.symlink(os.path.relpath(folder, run_dir), tmp)
        os.replace(tmp, link)  # the one step that makes the new set the results
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    if previous is not None and not previous.is_absolute():
        shutil.rmtree(run_dir / previous, ignore_errors=True)
    return link


def remove_stale(run_dir: str | Path) -> list[Path]:
    """Remove what an interrupted commit left: sets not linked as the results, and links
    being switched; returns what was removed."""
    run_dir = Path(run_dir)
    link = run_dir / RESULTS
    current = (run_dir / os.readlink(link)).resolve() if link.is_symlink() else None
    removed = []
    committed = run_dir / COMMITTED
    if committed.is_dir():
        for folder in committed.iterdir():
            if folder.resolve() != current:
                shutil.rmtree(folder, ignore_errors=True) if folder.is_dir() else folder.unlink(missing_ok=True)
                removed.append(folder)
    for tmp in run_dir.glob(f".{RESULTS}.*.link"):
        tmp.unlink(missing_ok=True)
        removed.append(tmp)
    return removed
