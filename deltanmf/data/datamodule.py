"""The LightningDataModule serving cells to a stage.

Full-batch mode yields the whole matrix (cells x genes, dense) with all cell indices;
it is densified and moved to the device once, then reused every step. Minibatch mode
yields shuffled batches of cells, densifying only the batch from the sparse matrix.
"""
from __future__ import annotations

import lightning as L
import numpy as np
import scipy.sparse as sp
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler


class _Rows(Dataset):
    """Index with a list of cells; returns ``(dense block, cell indices)``."""

    def __init__(self, data):
        self.data = sp.csr_matrix(data) if sp.issparse(data) else np.asarray(data)

    def __len__(self) -> int:
        return self.data.shape[0]

    def __getitem__(self, index):
        index = np.sort(np.asarray(index, dtype=np.int64))
        block = self.data[index]
        if sp.issparse(block):
            block = block.toarray()
        return torch.as_tensor(np.asarray(block, dtype=np.float32)), torch.as_tensor(index)


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

    Parameters
    ----------
    data
        cells x genes, numpy or scipy sparse (kept sparse).
    batch_size
        Cells per batch; ``None`` for full batch.
    num_workers
        DataLoader workers in minibatch mode.
    seed
        Seed of the batch shuffling.
    steps_per_epoch
        Full-batch mode only: steps that make one epoch (Lightning runs its per-epoch
        machinery this often instead of after every step).
    """

    def __init__(self, data, batch_size: int | None = None, num_workers: int = 0, seed: int = 0,
                 steps_per_epoch: int = 10):
        super().__init__()
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1 or null (full batch), got {batch_size}")
        self.rows = _Rows(data)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.steps_per_epoch = steps_per_epoch
        self._device_batch = None

    @property
    def n_cells(self) -> int:
        return len(self.rows)

    @property
    def full_batch(self) -> bool:
        return self.batch_size is None or self.batch_size >= self.n_cells

    def train_dataloader(self) -> DataLoader:
        if self.full_batch:
            full = self.rows[np.arange(self.n_cells)]
            return DataLoader(_Repeat(full, self.steps_per_epoch), batch_size=None, shuffle=False)
        generator = torch.Generator().manual_seed(self.seed)
        sampler = BatchSampler(RandomSampler(self.rows, generator=generator), self.batch_size, drop_last=False)
        pin = torch.cuda.is_available()
        return DataLoader(self.rows, sampler=sampler, batch_size=None, num_workers=self.num_workers,
                          pin_memory=pin, persistent_workers=self.num_workers > 0)

    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        if not self.full_batch:
            return super().transfer_batch_to_device(batch, device, dataloader_idx)
        # The full matrix goes to the device once and stays there.
        if self._device_batch is None or self._device_batch[0].device != device:
            self._device_batch = super().transfer_batch_to_device(batch, device, dataloader_idx)
        return self._device_batch
