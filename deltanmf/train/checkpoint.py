"""Checkpoints a long fit can be resumed from: periodic, on SIGINT/SIGTERM, and final.

Each stage writes into the run's ``checkpoints/`` directory:

- ``<name>-last.ckpt`` while training: every ``every_n_steps`` steps and every
  ``every_minutes`` minutes (Lightning's ``ModelCheckpoint``, one per clock), and when the
  process gets SIGINT (Ctrl+C) or SIGTERM (e.g. a cluster's time limit;
  :class:`InterruptCheckpoint`, on Lightning's exception hook). It is only ever replaced by
  a checkpoint whose loss is finite (:class:`AtomicCheckpointIO`), so a run that goes NaN
  keeps the last good state; it is removed when the stage finishes.
- ``<name>.ckpt`` when the stage has finished (:func:`deltanmf.train.trainer.fit_module`).

Every file is written through :class:`AtomicCheckpointIO` (a temporary name, then a
rename), so a crash mid-write never leaves a truncated checkpoint.

Signals: Lightning handles SIGTERM itself, stopping at the end of the current step with its
``SIGTERMException``; the checkpoint is written on its exception hook and the stage's code
turns the exception into :class:`~deltanmf.errors.TrainingInterrupted` (exit code 143).
Ctrl+C, which Lightning turns into a ``KeyboardInterrupt`` that can land in the middle of
an optimiser step and ends the process with exit code 1, is noted by a handler of its own
and acted on at the end of the step (exit code 130): either way the checkpoint holds the
state after a whole step. Lightning's
``OnExceptionCheckpoint`` is not used: with one present, ``fit()`` resumes from its file
whenever that file exists, where a run here continues only when asked (``resume=true``).
"""
from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path

from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import Checkpoint, ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

from ..errors import TrainingInterrupted
from ..files import atomic_write

log = logging.getLogger(__name__)

_POLL_STEPS = 10  # with several processes, how often they compare notes about signals


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, writing to a temporary name and renaming it into place,
    and never replacing a checkpoint by one whose loss is not finite (the module records
    ``loss_finite`` in every checkpoint it makes; one host synchronisation per checkpoint)."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        if checkpoint.get("deltanmf", {}).get("loss_finite") is False:
            log.warning("the loss is not finite at step %s; %s keeps its previous state", checkpoint.get("global_step"),
                        Path(path).name)
            return
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: super(AtomicCheckpointIO, self).save_checkpoint(checkpoint, tmp,
                                                                                       storage_options))


def last_path(directory: Path, name: str) -> Path:
    """``<name>-last.ckpt``: the checkpoint of a stage still training or interrupted."""
    return Path(directory) / f"{name}-last.ckpt"


def final_path(directory: Path, name: str) -> Path:
    """``<name>.ckpt``: the checkpoint of a finished stage."""
    return Path(directory) / f"{name}.ckpt"


def periodic_checkpoints(directory: Path, name: str, every_n_steps: int, every_minutes: float
                         ) -> list[ModelCheckpoint]:
    """Lightning's ``ModelCheckpoint`` writing ``<name>-last.ckpt`` every ``every_n_steps``
    steps and every ``every_minutes`` minutes (one callback per clock: Lightning's clocks are
    exclusive); 0 turns a clock off."""
    from datetime import timedelta

    clocks = []
    if every_n_steps:
        clocks.append({"every_n_train_steps": every_n_steps})
    if every_minutes:
        clocks.append({"train_time_interval": timedelta(minutes=every_minutes)})
    return [ModelCheckpoint(dirpath=directory, filename=f"{name}-last", monitor=None, save_top_k=1,
                            enable_version_counter=False, save_on_train_epoch_end=False, **clock)
            for clock in clocks]


class InterruptCheckpoint(Checkpoint):
    """``<name>-last.ckpt`` when SIGINT or SIGTERM stops training (module docstring).

    Ctrl+C is noted by a handler of its own while the stage trains; at the end of the step
    that follows, training stops with :class:`TrainingInterrupted`. SIGTERM stops it with
    Lightning's ``SIGTERMException``. Either way the checkpoint is written on Lightning's
    ``on_exception`` hook. With several processes, Ctrl+C to any of them stops all, every
    ``_POLL_STEPS`` steps. Other exceptions write nothing: a stage that failed keeps its last
    periodic checkpoint.
    """

    def __init__(self, directory: Path, name: str):
        self.stage = name
        self.ckpt_path = last_path(directory, name)
        self._signal: int | None = None
        self._previous = None

    def _note(self, signum, frame) -> None:
        self._signal = signum

    def on_train_start(self, trainer, pl_module) -> None:
        self._signal = None
        if threading.current_thread() is threading.main_thread():  # signal handlers live there only
            self._previous = signal.signal(signal.SIGINT, self._note)

    def _restore_handler(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def on_train_end(self, trainer, pl_module) -> None:
        self._restore_handler()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        interrupted = self._signal is not None
        if trainer.world_size > 1:
            if trainer.global_step % _POLL_STEPS:
                return  # processes agree on signals only every few steps (one collective each time)
            interrupted = trainer.strategy.reduce_boolean_decision(interrupted, all=False)
        if interrupted:
            raise interruption(signal.SIGINT, self.stage, trainer.global_step, self.ckpt_path)

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._restore_handler()
        if isinstance(exception, (TrainingInterrupted, SIGTERMException)):
            trainer.save_checkpoint(self.ckpt_path)


def interruption(signum: int, stage: str, step: int, checkpoint: Path) -> TrainingInterrupted:
    """The error a stage stopped by a signal ends with: what was saved and how to continue."""
    return TrainingInterrupted(f"{signal.Signals(signum).name} received: stopped {stage} after step {step} and "
                               f"saved {checkpoint}; continue with resume=true in the same run directory",
                               checkpoint, signum)
