"""The LightningDataModule serving cells to a stage.

Full-batch mode yields the whole matrix (cells x genes) with all cell indices; it is
moved to the device once, then reused every step. Minibatch mode yields shuffled
batches of cells; each epoch's batches depend on the seed and the epoch alone, and a
fit resumed in the middle of an epoch continues with that epoch's remaining batches,
so it equals the uninterrupted fit. Dense input gives dense blocks. Sparse input stays
sparse: a scipy sparse matrix, or a *row source* (any object with ``.shape`` (cells,
genes) and ``read_rows(index) -> scipy.sparse.csr_matrix`` for a sorted int64 index,
e.g. a file read on demand), gives torch sparse CSR blocks, the full batch included;
the loss works on them directly (:func:`deltanmf.nmf.losses.squared_error`).
"""
from __future__ import annotations

import itertools
from collections.abc import Callable

import lightning as L
import numpy as np
import scipy.sparse as sp
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..nmf.matrix import canonical_csr, csr_tensor, is_row_source, reused
from .errors import InputError


class _Rows(Dataset):
    """Index with a list of cells; returns ``(block, cell indices)``, the block float32 and
    dense for dense input, torch sparse CSR for scipy sparse input or a row source."""

    def __init__(self, data):
        if sp.issparse(data):
            self.data = canonical_csr(data)
        elif is_row_source(data):
            self.data = data
        else:
            self.data = np.asarray(data)
        if len(self.data.shape) != 2:
            raise ValueError(f"expression must be 2-D (cells x genes), got shape {tuple(self.data.shape)}")

    @property
    def sparse(self) -> bool:
        return not isinstance(self.data, np.ndarray)

    def __len__(self) -> int:
        return int(self.data.shape[0])

    def block(self, index: np.ndarray) -> torch.Tensor:
        """Rows ``index`` (sorted, unique) as a float32 tensor."""
        if is_row_source(self.data):
            return csr_tensor(self.data.read_rows(index))
        if self.sparse:
            return csr_tensor(self.data[index])
        return torch.as_tensor(np.asarray(self.data[index], dtype=np.float32))

    def full(self) -> torch.Tensor:
        """All cells as one float32 block (sparse data stays sparse; on the CPU float32 input
        is shared, not copied)."""
        if sp.issparse(self.data):
            return csr_tensor(self.data)
        if self.sparse:
            return self.block(np.arange(len(self), dtype=np.int64))
        return torch.as_tensor(np.asarray(self.data, dtype=np.float32))

    def __getitem__(self, index):
        index = np.sort(np.asarray(index, dtype=np.int64))
        return self.block(index), torch.as_tensor(index)


class _Repeat(Dataset):
    """The same full batch, ``steps`` times (one epoch = ``steps`` full-batch steps)."""

    def __init__(self, batch, steps: int):
        self.batch, self.steps = batch, steps

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, i):
        return self.batch


class EpochBatches(Sampler):
    """Minibatches of cells for one epoch at a time, drawn from ``(seed, epoch)`` alone.

    Parameters
    ----------
    n_cells, batch_size
        Cells, and cells per batch (the last batch may be smaller).
    seed
        Seed of the batch order.
    draw
        ``draw(batch_size, rng) -> list of index arrays`` making one epoch's batches from
        a numpy Generator; ``None`` shuffles the cells uniformly. (Cells on disk use
        :meth:`~deltanmf.data.backed.H5adRows.batch_indices`: batches of a few runs of
        consecutive cells, quick to read.)

    :class:`ResumableBatches` sets the epoch before each pass. Since an epoch's order does
    not depend on the epochs before it, an interrupted fit resumed at epoch ``e`` sees the
    batches the uninterrupted fit saw.
    """

    def __init__(self, n_cells: int, batch_size: int, seed: int = 0,
                 draw: Callable[[int, np.random.Generator], list] | None = None):
        self.n_cells, self.batch_size, self.seed = int(n_cells), int(batch_size), int(seed)
        self.draw, self.epoch = draw, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return -(-self.n_cells // self.batch_size)

    def __iter__(self):
        rng = np.random.default_rng([self.seed % 2**64, self.epoch])  # SeedSequence takes no negative seed
        if self.draw is not None:
            yield from self.draw(self.batch_size, rng)
            return
        order = rng.permutation(self.n_cells)
        for start in range(0, self.n_cells, self.batch_size):
            yield order[start:start + self.batch_size]


class ResumableBatches(Sampler):
    """The batches of an epoch-keyed sampler (``set_epoch``), from where training stands.

    ``position() -> (epoch, done)`` is asked when the epoch's first batch is wanted:
    the sampler is set to ``epoch`` and its first ``done`` batches are skipped. ``done``
    is 0 except when a fit resumes from a checkpoint taken in the middle of an epoch,
    where it is the number of that epoch's batches already trained. Without
    ``position``, each pass is the next epoch.
    """

    def __init__(self, sampler, position: Callable[[], tuple[int, int]] | None = None):
        self.sampler, self.position = sampler, position
        self._passes = 0

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self):
        # a generator: the position is read when the first batch is drawn, after Lightning
        # has restored its loop state (in-process loading: also after its loop reset)
        if self.position is None:
            epoch, done = self._passes, 0
            self._passes += 1
        else:
            epoch, done = self.position()
            if done >= len(self.sampler):
                # read before Lightning's loop reset (DataLoader workers draw indices as soon as
                # the iterator exists): a checkpoint after an epoch's last batch resumes the next epoch
                epoch, done = epoch + 1, 0
        self.sampler.set_epoch(epoch)
        yield from itertools.islice(iter(self.sampler), done, None)


class RankShare(Sampler):
    """One process's share of every minibatch under DDP: part ``rank`` of each batch of
    ``batches`` cut into ``world_size`` near-equal parts.

    Every process draws the same batches (same seed), so each epoch every cell is trained
    exactly once, by one process, and all processes take the same number of steps (DDP
    averages their gradients at every step). A last batch with fewer cells than processes
    joins the batch before it, so no process ever gets an empty batch. (Lightning's own
    distributed sampler hands out whole batches instead, padding the list by repeating
    some, so a few cells were trained twice per epoch.)
    """

    def __init__(self, batches, n_cells: int, batch_size: int, rank: int, world_size: int):
        if batch_size < world_size:
            raise InputError(f"data.batch_size={batch_size} is smaller than the {world_size} processes; each "
                             f"process needs cells of every batch: use data.batch_size >= {world_size}")
        self.batches, self.rank, self.world_size = batches, int(rank), int(world_size)
        self.n_cells, self.batch_size = int(n_cells), int(batch_size)

    def _merges_last(self) -> bool:
        tail = self.n_cells % self.batch_size
        return self.n_cells > self.batch_size and 0 < tail < self.world_size

    def __len__(self) -> int:
        return -(-self.n_cells // self.batch_size) - self._merges_last()

    def __iter__(self):
        batches = iter(self.batches)
        previous = next(batches, None)
        for batch in batches:
            if len(batch) < self.world_size:  # the short last batch: served with the one before
                previous = np.concatenate([np.asarray(previous), np.asarray(batch)])
                continue
            yield self._share(previous)
            previous = batch
        if previous is not None:
            yield self._share(previous)

    def set_epoch(self, epoch: int) -> None:
        self.batches.set_epoch(epoch)

    def _share(self, batch) -> np.ndarray:
        return np.array_split(np.asarray(batch, dtype=np.int64), self.world_size)[self.rank]


def _check_own_sharding(trainer) -> None:
    """Under DDP this module shares the cells out itself; Lightning's distributed sampler
    would split each process's share again (the pipeline turns it off)."""
    if getattr(getattr(trainer, "_accelerator_connector", None), "use_distributed_sampler", False):
        raise InputError("CellDataModule gives each DDP process its share of the cells itself: create the "
                         "Trainer with use_distributed_sampler=False (train.py and the deltanmf API do)")


class CellDataModule(L.LightningDataModule):
    """Cells of one stage (e.g. the controls for stage 1).

    Parameters
    ----------
    data
        cells x genes: numpy, scipy sparse (kept sparse), or a row source (``.shape`` and
        ``read_rows(sorted int64 index) -> scipy.sparse.csr_matrix``; kept sparse).
    batch_size
        Cells per batch; ``None`` for full batch.
    num_workers
        DataLoader workers in minibatch mode.
    seed
        Seed of the batch shuffling.
    steps_per_epoch
        Full-batch mode only: steps that make one epoch (Lightning runs its per-epoch
        machinery this often instead of after every step).
    transposed_copy
        Full-batch mode, sparse data on the CPU: the batch keeps a transposed copy of its
        non-zeros, built at the first backward pass, for the ``X^T U`` product of every
        step (:func:`deltanmf.nmf.matrix.reused`): faster steps for one more copy of the
        non-zeros. The batch's squared norm is computed once either way.
    """

    def __init__(self, data, batch_size: int | None = None, num_workers: int = 0, seed: int = 0,
                 steps_per_epoch: int = 10, transposed_copy: bool = False):
        super().__init__()
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1 or null (full batch), got {batch_size}")
        self.rows = _Rows(data)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.steps_per_epoch = steps_per_epoch
        self.transposed_copy = bool(transposed_copy)
        self._device_batch = None

    @property
    def n_cells(self) -> int:
        return len(self.rows)

    @property
    def full_batch(self) -> bool:
        return self.batch_size is None or self.batch_size >= self.n_cells

    @property
    def pin_memory(self) -> bool:
        """Whether the minibatch loader pins its batches: with a GPU, so each batch is copied
        to it from page-locked memory. Sparse CSR batches are pinned too (torch pins their
        three arrays). The full batch is moved once, so it is not pinned."""
        return torch.cuda.is_available() and not self.full_batch

    def train_dataloader(self) -> DataLoader:
        if self.full_batch:
            return self._full_batch_loader()
        return self._minibatch_loader()

    def _full_batch_loader(self) -> DataLoader:
        trainer = self.trainer
        if trainer is not None and trainer.world_size > 1:
            _check_own_sharding(trainer)
            # DDP: each process holds its share of the cells (every world_size-th one); the
            # averaged gradients are those of the whole matrix
            full = self.rows[np.arange(trainer.global_rank, self.n_cells, trainer.world_size)]
        else:
            full = (self.rows.full(), torch.arange(self.n_cells))
        full = (reused(full[0], self.transposed_copy), full[1])  # the same block every step
        return DataLoader(_Repeat(full, self.steps_per_epoch), batch_size=None, shuffle=False)

    def _minibatch_loader(self) -> DataLoader:
        draw = getattr(self.rows.data, "batch_indices", None)  # cells on disk: batches quick to read
        sampler = EpochBatches(self.n_cells, self.batch_size, self.seed, draw)
        trainer = self.trainer
        if trainer is not None and trainer.world_size > 1:
            _check_own_sharding(trainer)
            sampler = RankShare(sampler, self.n_cells, self.batch_size, trainer.global_rank, trainer.world_size)
        sampler = ResumableBatches(sampler, self._position if isinstance(trainer, L.Trainer) else None)
        return DataLoader(self.rows, sampler=sampler, batch_size=None, num_workers=self.num_workers,
                          pin_memory=self.pin_memory, persistent_workers=self.num_workers > 0)

    def _position(self) -> tuple[int, int]:
        """``(epoch, batches of it already trained)`` for the epoch the trainer starts.

        The second is non-zero only in a fit resumed from a mid-epoch checkpoint, where
        Lightning has restored its batch count (the data loader holds no state of its own).
        """
        loop = self.trainer.fit_loop
        return loop.epoch_progress.current.processed, loop.epoch_loop.batch_progress.current.ready

    def teardown(self, stage: str) -> None:
        """After training: drop the device copy of the full batch (a GPU's memory)."""
        self._device_batch = None

    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        if not self.full_batch:
            return super().transfer_batch_to_device(batch, device, dataloader_idx)
        # The full matrix goes to the device once and stays there.
        if self._device_batch is None or self._device_batch[0].device != device:
            x, index = super().transfer_batch_to_device(batch, device, dataloader_idx)
            self._device_batch = (reused(x, self.transposed_copy), index)  # a copy on a GPU: marked again
        return self._device_batch
