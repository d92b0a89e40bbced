"""Access to an expression matrix by batches of cells, whatever its storage.

The math in this package only ever needs dense blocks of cells (cells x genes) on a
device. ``CellMatrix`` hands those out from a dense array or a scipy sparse matrix
(kept sparse; only the requested rows are densified), so the consensus initialisation
and the evaluation code run the same way in full-batch and minibatch mode.
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import scipy.sparse as sp
import torch


class CellMatrix:
    """Cells x genes expression, served as dense torch blocks.

    Parameters
    ----------
    data
        numpy array or scipy sparse matrix (CSR preferred), cells x genes.
    batch_size
        Cells per block; ``None`` serves all cells as one block.
    device
        Where blocks are placed.
    dtype
        torch dtype of the blocks.
    """

    def __init__(self, data, batch_size: int | None = None, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32):
        if sp.issparse(data):
            data = sp.csr_matrix(data)
        else:
            data = np.asarray(data)
        if data.ndim != 2:
            raise ValueError(f"expression must be 2-D (cells x genes), got shape {data.shape}")
        self.data = data
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.dtype = dtype
        self._full: torch.Tensor | None = None

    @property
    def n_cells(self) -> int:
        return self.data.shape[0]

    @property
    def n_genes(self) -> int:
        return self.data.shape[1]

    @property
    def full_batch(self) -> bool:
        return self.batch_size is None or self.batch_size >= self.n_cells

    def rows(self, index: np.ndarray) -> torch.Tensor:
        """Dense block of the given cells."""
        block = self.data[index]
        if sp.issparse(block):
            block = block.toarray()
        return torch.as_tensor(np.asarray(block), dtype=self.dtype).to(self.device)

    def full(self) -> torch.Tensor:
        """All cells as one dense block, built once and kept on the device."""
        if self._full is None:
            self._full = self.rows(np.arange(self.n_cells))
        return self._full

    def batches(self, shuffle: bool = False, generator: np.random.Generator | None = None
                ) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        """Yield ``(cell_index, block)`` pairs covering every cell once."""
        if self.full_batch:
            yield np.arange(self.n_cells), self.full()
            return
        order = np.arange(self.n_cells)
        if shuffle:
            (generator or np.random.default_rng()).shuffle(order)
        for start in range(0, self.n_cells, self.batch_size):
            index = np.sort(order[start:start + self.batch_size])
            yield index, self.rows(index)

    def squared_norm(self) -> float:
        """``||X||_F^2`` computed without densifying."""
        if sp.issparse(self.data):
            return float(np.sum(np.square(self.data.data, dtype=np.float64)))  # float64 before squaring: no overflow
        return float(np.sum(np.square(self.data, dtype=np.float64)))
