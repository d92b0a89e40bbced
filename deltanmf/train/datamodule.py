"""The LightningDataModule serving cells to a stage (the samplers are in :mod:`.samplers`).

Full-batch mode yields the whole matrix (cells x genes) with all cell indices; it is
moved to the device once, then reused every step. Minibatch mode yields shuffled
batches of cells; each epoch's batches depend on the seed and the epoch alone, and a
fit resumed in the middle of an epoch continues with that epoch's remaining batches,
so it equals the uninterrupted fit. Dense input gives dense blocks. Sparse input stays
sparse: a scipy sparse matrix, or a *row source* (any object with ``.shape`` (cells,
genes) and ``read_rows(index) -> scipy.sparse.csr_matrix`` for a sorted int64 index,
e.g. a file read on demand), gives torch sparse CSR blocks, the full batch included;
the loss works on them directly (:func:`deltanmf.core.losses.squared_error`).
"""
from __future__ import annotations

import lightning as L
import numpy as np
import scipy.sparse as sp
import torch
from torch.utils.data import DataLoader, Dataset

from ..core.matrix import canonical_csr, csr_tensor, is_row_source, reused
from .samplers import EpochBatches, RankShare, ResumableBatches


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


class CellDataModule(L.LightningDataModule):
    """Cells of one stage (e.g. the controls for stage 1).

    Under DDP it gives each process its share of the cells itself (:class:`~.samplers.RankShare`),
    so the Trainer must be built with ``use_distributed_sampler=False``, as
    :func:`deltanmf.train.build_trainer` builds it (Lightning's sampler would split each
    process's share again).

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
        step (:func:`deltanmf.core.matrix.reused`): faster steps for one more copy of the
        non-zeros. The batch's squared norm is computed once either way.
    """

    def __init__(self, data, *, batch_size: int | None, num_workers: int, seed: int, steps_per_epoch: int,
                 transposed_copy: bool):
        super().__init__()
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
