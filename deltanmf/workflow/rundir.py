"""A run directory belongs to one run: the lock, what the directory already holds, and the
check Hydra runs before it creates a directory.

- :class:`RunLock`: an exclusive lock (``flock`` on the directory; ``<run>/.lock`` names the
  holder) held for the whole command; a second command there is refused at once, naming the
  holder's PID and start time.
- :func:`check_run_dir`: a finished run's results are kept unless ``overwrite=true``; an
  interrupted run's checkpoints are continued (``resume=true``) or cleared (``overwrite=true``),
  never silently mixed with a new run's.
- :class:`RunDirectoryCheck`: a Hydra callback refusing an unwritable run or sweep directory
  with one line, before Hydra writes its log there.
"""
from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

from hydra.experimental.callback import Callback

from ..errors import InputError
from ..files import RESULTS, remove_stale, results_dir
from ..settings import RunSettings

try:  # POSIX; elsewhere the directory is not locked
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

LOCK = ".lock"


def unwritable(directory: Path) -> str | None:
    """Why ``directory`` cannot be created or written, or None when it can."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".deltanmf-write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        return err.strerror or str(err)
    return None


def check_writable(directory: Path, key: str) -> None:
    """Refuse a run directory that cannot be written, naming it and the setting to change."""
    reason = unwritable(directory)
    if reason:
        raise InputError(f"cannot write the run directory {directory} ({reason}); choose a writable one with "
                         f"{key}=<folder>")


class RunLock:
    """An exclusive lock on a run directory for the whole command.

    ``with RunLock(run_dir):`` holds an ``fcntl.flock`` on the directory itself and writes
    ``<run>/.lock``, naming the holder's PID and start time; a second command (in this process
    or another) is refused at once with :class:`InputError`, naming the holder. On release
    ``.lock`` is removed and the directory unlocked. The lock is on the directory, which is
    never removed, not on the ``.lock`` file: a lock on a file that release removes lets a
    process that opened the file just before the release lock the removed file while the next
    command locks a new one, both then holding "the" lock.
    """

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / LOCK
        self._descriptor: int | None = None

    def __enter__(self) -> RunLock:
        check_writable(self.path.parent, "hydra.run.dir")
        if fcntl is None:
            return self
        descriptor = os.open(self.path.parent, os.O_RDONLY)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(descriptor)
            try:
                holder = self.path.read_text(errors="replace").strip() or "unknown"
            except OSError:
                holder = "unknown"
            raise InputError(f"another DeltaNMF command is running in {self.path.parent} ({holder}); wait for it to "
                             "end, or choose another directory (hydra.run.dir=...)") from None
        self.path.write_text(f"PID {os.getpid()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}")
        self._descriptor = descriptor
        return self

    def __exit__(self, *exc) -> None:
        if self._descriptor is not None:
            self.path.unlink(missing_ok=True)  # who holds it: information only, the lock is the directory's
            os.close(self._descriptor)  # closing releases the lock
            self._descriptor = None


def interrupted_checkpoints(run_dir: Path) -> list[str]:
    """The checkpoints an interrupted run left in ``run_dir`` (none once it has finished)."""
    directory = run_dir / "checkpoints"
    return sorted(p.name for p in directory.glob("*.ckpt")) if directory.is_dir() else []


def check_run_dir(settings: RunSettings, run_dir: Path) -> None:
    """What the directory already holds decides what this command may do (module docstring).

    Also removes what an interrupted commit of results left behind.
    """
    remove_stale(run_dir)
    link = run_dir / RESULTS
    if link.exists() and not link.is_symlink():
        raise InputError(f"{link} is not DeltaNMF's results link but a folder of its own; move it away or choose "
                         "another directory (hydra.run.dir=...)")
    finished = (results_dir(run_dir) / "results.h5ad").is_file()
    if settings.resume and finished:
        raise InputError(f"resume=true: the run in {run_dir} has already finished (its results exist)")
    if finished and not settings.overwrite:
        raise InputError(f"{run_dir} already holds the results of a run; choose another directory "
                         "(hydra.run.dir=...) or replace them with overwrite=true")
    kept = interrupted_checkpoints(run_dir)
    if kept and not finished and not (settings.resume or settings.overwrite or settings.ckpt_path):
        raise InputError(f"{run_dir} holds the checkpoints of an interrupted run ({', '.join(kept)}): continue it "
                         "with resume=true, start over with overwrite=true (which deletes them), or choose another "
                         "directory (hydra.run.dir=...)")


def clear_for_overwrite(run_dir: Path) -> None:
    """``overwrite=true``, once every check has passed: the earlier run's checkpoints and
    TensorBoard logs go (its results stay until the new ones replace them in one step)."""
    for name in ("checkpoints", "tensorboard"):
        shutil.rmtree(run_dir / name, ignore_errors=True)


class RunDirectoryCheck(Callback):
    """Hydra callback: refuse an unwritable run (or sweep) directory with one line and exit
    code 2, before Hydra creates it and opens its log there."""

    def on_run_start(self, config, **kwargs) -> None:
        self._check(Path(str(config.hydra.run.dir)), "hydra.run.dir")

    def on_multirun_start(self, config, **kwargs) -> None:
        self._check(Path(str(config.hydra.sweep.dir)), "hydra.sweep.dir")

    @staticmethod
    def _check(directory: Path, key: str) -> None:
        reason = unwritable(directory)
        if reason:
            print(f"deltanmf: error: cannot write the run directory {directory} ({reason}); choose a writable one "
                  f"with {key}=<folder>", file=sys.stderr)
            raise SystemExit(2)
