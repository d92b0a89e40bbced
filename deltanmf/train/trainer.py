"""How a stage is trained: the Lightning Trainer, its callbacks, the cells' loader, resuming.

:class:`TrainingPlan` holds everything about training that is not the model's math (where
the run writes, the Trainer's arguments, the stop and checkpoint settings, how cells are
batched, where an interrupted run left its checkpoints); :func:`fit_module` trains one
stage's module with it and writes the stage's final checkpoint.
"""
from __future__ import annotations

import logging
import signal
import sys
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.exceptions import SIGTERMException

from ..errors import InputError, NonFiniteLossError
from ..settings import CheckpointSettings, StopSettings
from .callbacks import ConvergenceStop, ProgressBar
from .checkpoint import (AtomicCheckpointIO, InterruptCheckpoint, final_path, interruption, last_path,
                         periodic_checkpoints)
from .datamodule import CellDataModule

log = logging.getLogger(__name__)

# Whether a stage is training in this process: a SIGTERM then belongs to Lightning, which stops at
# the end of the step and saves a checkpoint (the command line's own handler stands aside).
FITTING = False


@dataclass(frozen=True)
class Resume:
    """Where an interrupted run's checkpoints are: a directory, and optionally one checkpoint
    file whose stage continues from that file (``ckpt_path``)."""

    directory: Path
    file: Path | None = None

    def checkpoint(self, name: str) -> Path | None:
        """The checkpoint stage ``name`` continues from: the given file for its stage, else the
        stage's finished checkpoint, else its last one; None when it has none."""
        if self.file is not None and stage_of(self.file) == name:
            return self.file
        for path in (final_path(self.directory, name), last_path(self.directory, name)):
            if path.is_file():
                return path
        return None


def stage_of(path: Path) -> str:
    """The stage a checkpoint file belongs to (``stage1-last.ckpt`` -> ``stage1``)."""
    return Path(path).name.removesuffix(".ckpt").removesuffix("-last")


@dataclass(frozen=True)
class TrainingPlan:
    """How the stages are trained (everything but the model's math).

    Attributes
    ----------
    trainer
        Lightning ``Trainer`` arguments (``trainer.*``: accelerator, devices, max_steps, ...).
    stop, checkpoint
        ``model.stop`` and ``checkpoint`` settings.
    batch_size, num_workers
        ``data.batch_size`` (None: full batch) and ``data.num_workers``.
    transposed_copy
        ``data.transposed_copy``: ``"auto"``, True or False (see :meth:`keeps_transposed_copy`).
    max_cells
        ``model.consensus.max_cells``: ``transposed_copy=auto`` copies stages of at most this many cells.
    run_dir
        Where ``checkpoints/`` (and the logger's folders) go.
    logger
        A stage's logger by name (``stage1`` -> ``tensorboard/stage1/``), or None.
    resume
        Where an interrupted run's checkpoints are, or None for a fresh run.
    settings_record
        The settings a continuation must share with this run, carried by every checkpoint.
    """

    trainer: Mapping[str, Any]
    stop: StopSettings
    checkpoint: CheckpointSettings
    batch_size: int | None
    num_workers: int
    transposed_copy: Any
    max_cells: int | None
    run_dir: Path
    logger: Callable[[str], Any] | None = None
    resume: Resume | None = None
    settings_record: str = ""

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.run_dir) / "checkpoints"

    def keeps_transposed_copy(self, n_cells: int) -> bool:
        """Whether a stage's initialisation and full-batch training keep a transposed copy of
        the cells' non-zeros (sparse data on the CPU): ``auto`` when the stage has at most
        ``max_cells`` cells (tens of MB buy ~2x faster steps), not above, where memory matters
        more (see docs/benchmarks.md, memory)."""
        if isinstance(self.transposed_copy, bool):
            return self.transposed_copy
        return self.max_cells is None or n_cells <= self.max_cells

    def resume_from(self, name: str) -> Path | None:
        """The checkpoint stage ``name`` continues from, or None."""
        return None if self.resume is None else self.resume.checkpoint(name)


def _trainer(args: Mapping[str, Any], **kwargs) -> L.Trainer:
    """A Lightning Trainer; settings Lightning refuses raise :class:`InputError`."""
    try:
        # under DDP the data module gives each process its share of the cells itself (RankShare)
        return L.Trainer(**args, use_distributed_sampler=False, **kwargs)
    except MisconfigurationException as err:
        raise InputError(f"the trainer settings cannot run here: {err} (trainer.accelerator="
                         f"{args.get('accelerator')}, trainer.devices={args.get('devices')}); trainer=default uses "
                         "a GPU only when there is one, trainer=cpu never does") from None
    except TypeError as err:
        raise InputError(f"the trainer settings are not Lightning Trainer arguments: {err}; see "
                         "conf/trainer/default.yaml for the keys in use") from None


def check_trainer(plan: TrainingPlan) -> None:
    """Let Lightning check the trainer settings before any work: a Trainer is cheap to build
    and starts nothing, so a refused setting leaves nothing behind. Its banner (GPU/TPU
    available) is kept quiet: a command refused later prints only its error."""
    banner = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    level = banner.level
    banner.setLevel(logging.WARNING)
    try:
        _trainer(plan.trainer, logger=False, callbacks=[], enable_checkpointing=False)
    finally:
        banner.setLevel(level)


def stage_device(plan: TrainingPlan):
    """The device the stages train on (the Trainer's root device), for work done beside
    training, such as NNLS on reference programs."""
    return _trainer(plan.trainer, logger=False, callbacks=[], enable_checkpointing=False).strategy.root_device


def build_trainer(plan: TrainingPlan, name: str) -> L.Trainer:
    """The Trainer of stage ``name``: its logger, the convergence stop, its checkpoints."""
    directory = plan.checkpoint_dir
    callbacks = [ConvergenceStop(plan.stop), InterruptCheckpoint(directory, name),
                 *periodic_checkpoints(directory, name, plan.checkpoint.every_n_steps, plan.checkpoint.every_minutes)]
    # a bar only on a terminal: in a log file (python train.py > run.log, batch jobs) its carriage-return
    # updates would fill hundreds of lines; the stages' own log lines say how each ended
    bar = bool(plan.trainer.get("enable_progress_bar", True)) and _terminal()
    if bar:
        callbacks.append(ProgressBar(refresh_rate=plan.stop.check_every))  # reading the loss syncs: not every step
    logger = plan.logger(name) if plan.logger is not None else False
    return _trainer({**plan.trainer, "enable_progress_bar": bar}, logger=logger, callbacks=callbacks,
                    plugins=[AtomicCheckpointIO()], default_root_dir=str(plan.run_dir))


def _terminal() -> bool:
    """Whether the progress bar's stream (stderr) is a terminal."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed streams
        return False


def make_datamodule(x, plan: TrainingPlan, seed: int, transposed_copy: bool) -> CellDataModule:
    """The cells of a stage, in full batch or minibatches (an epoch of full-batch steps is one
    convergence window)."""
    return CellDataModule(x, batch_size=plan.batch_size, num_workers=plan.num_workers, seed=seed,
                          steps_per_epoch=plan.stop.check_every, transposed_copy=transposed_copy)


def lazy_usage(datamodule: CellDataModule, trainer: L.Trainer) -> bool:
    """Row-lazy usage updates (sparse gradients) in minibatch mode; DDP averages dense gradients only."""
    return not datamodule.full_batch and trainer.world_size == 1


def saved_init(plan: TrainingPlan, name: str) -> dict | None:
    """What the initialisation of the stage reported, from the checkpoint it continues from
    (None: a fresh stage). Such a stage need not initialise again: the checkpoint replaces
    every parameter. The checkpoint is memory-mapped, so only this small record is read."""
    path = plan.resume_from(name)
    if path is None:
        return None
    checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    return checkpoint.get("deltanmf", {}).get("init") or None


def placeholder_start(n_genes: int, n_cells: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Programs and usage of the right shapes for a module whose checkpoint will replace them."""
    return torch.full((n_genes, k), 1.0 / n_genes), torch.ones(n_cells, k)


def fit_module(module: L.LightningModule, datamodule: CellDataModule, trainer: L.Trainer, plan: TrainingPlan,
               name: str) -> float:
    """Train (continuing from a checkpoint when resuming), write the stage's final checkpoint
    and return the training time in seconds."""
    resume_from = plan.resume_from(name)
    if resume_from is not None:
        log.info("%s: continuing from %s", name, resume_from)
    last = last_path(plan.checkpoint_dir, name)
    start = time.perf_counter()
    global FITTING
    FITTING = True
    try:
        with warnings.catch_warnings():
            # Lightning warns that the loader keeps no state of its own; it needs none: every full-batch
            # step sees the same data, and minibatches resume from Lightning's restored batch count
            warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before")
            # steps are logged every log_every_n_steps across epochs, however few batches an epoch has
            warnings.filterwarnings("ignore", message="The number of training batches .* is smaller than the logging")
            # the stages of a run share checkpoints/ on purpose
            warnings.filterwarnings("ignore", message="Checkpoint directory .* exists and is not empty")
            trainer.fit(module, datamodule=datamodule, ckpt_path=resume_from)
    except SIGTERMException:  # Lightning stopped at the end of the step; the checkpoint is written
        raise interruption(signal.SIGTERM, name, trainer.global_step, last) from None
    except NonFiniteLossError as err:
        if last.is_file():
            raise NonFiniteLossError(f"{err} The last checkpoint with a finite loss is {last}.") from None
        raise
    finally:
        FITTING = False
    elapsed = time.perf_counter() - start
    final = final_path(plan.checkpoint_dir, name)
    trainer.save_checkpoint(final)
    if trainer.is_global_zero and not final.is_file():
        raise NonFiniteLossError(f"{name}: the loss is not finite at its last step {trainer.global_step}; no results "
                                 "were written. Lower model.lr, keep data.scale_genes=true, or check the input for "
                                 "extreme values.")
    trainer.strategy.barrier("deltanmf.final_checkpoint")
    last.unlink(missing_ok=True)  # the final checkpoint supersedes it
    return elapsed
