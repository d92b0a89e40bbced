"""Checkpoints a long fit can be resumed from: periodic, on SIGINT/SIGTERM, and final.

Each stage writes into the run's ``checkpoints/`` directory:

- ``<name>-last.ckpt`` while training: every ``every_n_steps`` steps or ``every_minutes``
  minutes (whichever comes first), and when the process gets SIGINT (Ctrl+C) or SIGTERM
  (e.g. a cluster's time limit). It is only ever replaced by a checkpoint whose loss is
  finite, so a run that goes NaN keeps the last good state.
- ``<name>.ckpt`` when the stage has finished (written by the pipeline).

Every file is written to a temporary name and renamed, so a crash mid-write never
leaves a truncated checkpoint.
"""
from __future__ import annotations

import logging
import signal
import threading
import time
from pathlib import Path

import lightning as L
import torch

log = logging.getLogger(__name__)

_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_POLL_STEPS = 10  # with several processes, how often they compare notes


class TrainingInterrupted(RuntimeError):
    """Training stopped on SIGINT/SIGTERM after saving a checkpoint it can be resumed from."""

    def __init__(self, message: str, checkpoint: Path, signum: int):
        super().__init__(message)
        self.checkpoint, self.signum = checkpoint, signum


def save_checkpoint(trainer: L.Trainer, path: Path) -> None:
    """Full trainer state (weights, optimiser, loops, callbacks) to ``path``, atomically.

    Every process calls it; only the first (global rank 0) writes.
    """
    tmp = path.with_name(f".{path.name}.tmp")
    if trainer.is_global_zero:
        path.parent.mkdir(parents=True, exist_ok=True)
    trainer.save_checkpoint(tmp, weights_only=False)
    if trainer.is_global_zero:
        tmp.replace(path)
    trainer.strategy.barrier("deltanmf.save_checkpoint")


class RunCheckpoint(L.Callback):
    """Periodic and on-signal checkpoints of one stage (see the module docstring).

    Parameters
    ----------
    directory
        The run's checkpoint directory.
    name
        The stage's name (``stage1``, ``stage2``, ...); files are ``<name>-last.ckpt``
        and ``<name>.ckpt``.
    every_n_steps
        Steps between periodic checkpoints (0 or None: no step-based checkpoints).
    every_minutes
        Minutes between periodic checkpoints (0 or None: no time-based checkpoints).
    """

    def __init__(self, directory: str | Path, name: str, every_n_steps: int | None = 500,
                 every_minutes: float | None = 10.0):
        if (every_n_steps or 0) < 0 or (every_minutes or 0) < 0:
            raise ValueError("checkpoint.every_n_steps and checkpoint.every_minutes must be >= 0 (0 = off)")
        self.directory = Path(directory)
        self.name = name
        self.every_n_steps = every_n_steps or 0
        self.every_seconds = 60.0 * (every_minutes or 0)
        self.resume_from: Path | None = None  # set by the pipeline when continuing a run
        self._signal: int | None = None
        self._previous: dict = {}
        self._last_step = 0
        self._last_time = 0.0

    @property
    def last_path(self) -> Path:
        return self.directory / f"{self.name}-last.ckpt"

    @property
    def final_path(self) -> Path:
        return self.directory / f"{self.name}.ckpt"

    def resume_path(self) -> Path | None:
        """The checkpoint to continue this stage from: the finished one, else the last one."""
        for path in (self.final_path, self.last_path):
            if path.is_file():
                return path
        return None

    # -- signals: note the request, act on it at the end of the step --------------------
    def _handler(self, signum, frame) -> None:
        self._signal = signum

    def on_train_start(self, trainer, pl_module) -> None:
        self._last_step = trainer.global_step
        self._last_time = time.monotonic()
        self._signal = None
        if threading.current_thread() is threading.main_thread():  # signal handlers live there only
            for sig in _SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handler)

    def _restore_handlers(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def on_train_end(self, trainer, pl_module) -> None:
        self._restore_handlers()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._restore_handlers()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        several = trainer.world_size > 1
        if several and trainer.global_step % _POLL_STEPS:
            return  # processes agree on signals and clocks only every few steps (one collective each time)
        interrupted = self._signal is not None
        steps_due = bool(self.every_n_steps) and trainer.global_step - self._last_step >= self.every_n_steps
        time_due = bool(self.every_seconds) and time.monotonic() - self._last_time >= self.every_seconds
        if several:  # a signal to any process, and the first process's clock, decide for all
            interrupted = trainer.strategy.reduce_boolean_decision(interrupted, all=False)
            time_due = trainer.strategy.broadcast(time_due, src=0)
        if interrupted:
            if self._signal is None:  # another process was signalled
                self._signal = signal.SIGTERM
            name = signal.Signals(self._signal).name
            self._save_if_finite(trainer, pl_module)
            raise TrainingInterrupted(
                f"{name} received: stopped {self.name} after step {trainer.global_step} and saved "
                f"{self.last_path}; continue with resume=true in the same run directory",
                self.last_path, self._signal)
        if steps_due or time_due:
            self._save_if_finite(trainer, pl_module)

    def _save_if_finite(self, trainer, pl_module) -> None:
        self._last_step, self._last_time = trainer.global_step, time.monotonic()
        loss = getattr(pl_module, "last_terms", {}).get("loss")
        finite = loss is None or bool(torch.isfinite(loss))  # one host sync per checkpoint
        if trainer.world_size > 1:
            finite = trainer.strategy.reduce_boolean_decision(finite, all=True)
        if not finite:
            log.warning("%s: loss not finite at step %d; keeping the previous checkpoint", self.name,
                        trainer.global_step)
            return
        save_checkpoint(trainer, self.last_path)
