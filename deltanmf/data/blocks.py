"""The matrix a fit uses (``.X``, a layer, or ``.raw``), in memory or in an ``.h5ad`` on disk,
read as blocks of the cells in use, and the per-gene moments gathered over blocks. The
preparation's passes (:mod:`deltanmf.data.prepare`) and the highly-variable-gene statistics
(:mod:`deltanmf.data.genes`) read the matrix only through :class:`Blocks`.
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..core.matrix import row_pieces, scan_rows
from ..errors import InputError
from ..settings import DataSettings
from .backed import H5adFile


def matrix_genes(source, data: DataSettings) -> pd.DataFrame:
    """The ``.var`` of the matrix a run factorises: ``.raw.var`` with ``data.use_raw``, else ``.var``."""
    if not data.use_raw:
        return source.var
    raw = source.raw_var if isinstance(source, H5adFile) else (source.raw.var if source.raw is not None else None)
    if raw is None:
        raise InputError(f"data.use_raw=true but the AnnData has no .raw; {other_matrices(source, data)}")
    return raw


def other_matrices(source, data: DataSettings) -> str:
    """The matrices of ``source`` besides the one in use, as the settings that choose them."""
    if isinstance(source, H5adFile):
        x_present, layers, has_raw = source.x_key is not None, list(source.layers), source.raw_var is not None
    else:
        x_present, layers, has_raw = source.X is not None, list(source.layers), source.raw is not None
    options = [f"data.layer={name}" for name in layers if name != data.layer or data.use_raw]
    if has_raw and not data.use_raw:
        options.append("data.use_raw=true (.raw)")
    if x_present and (data.layer is not None or data.use_raw):
        options.append("data.layer=null (.X)")
    return (f"the other matrices of this AnnData: {', '.join(options)}" if options else
            "this AnnData has no other matrix (no layers, no .raw)")


def check_choice(source, data: DataSettings) -> None:
    """The matrix ``data.layer`` / ``data.use_raw`` name exists."""
    if isinstance(source, H5adFile):
        x_present, layers = source.x_key is not None, source.layers
    else:
        x_present, layers = source.X is not None, source.layers
    if data.layer is not None and data.layer not in layers:
        raise InputError(f"data.layer={data.layer} not found; {other_matrices(source, data)}")
    if data.layer is None and not data.use_raw and not x_present:
        raise InputError(f"the AnnData has no .X; {other_matrices(source, data)}")


def looks_like_counts(source, data: DataSettings, n_cells: int = 2000) -> bool:
    """Whether the matrix the settings choose holds counts: its first ``n_cells`` cells'
    stored values are all whole numbers (log-normalised or scaled values are not)."""
    n = source.n_obs if hasattr(source, "n_obs") else source.shape[0]
    for _, block in Blocks(source, data, np.arange(min(n, n_cells))):
        values = block.data if sp.issparse(block) else np.asarray(block).ravel()
        if values.size and not np.allclose(values, np.round(values), rtol=0, atol=1e-6):
            return False
    return True


class Blocks:
    """The raw matrix of the cells in use, read as ``(positions, block)`` pairs in file order:
    ``positions`` index ``cells``, ``block`` holds those cells' rows (float32, CSR or dense).

    An in-memory matrix is served in blocks of at most
    :data:`~deltanmf.core.matrix.SCAN_VALUES` values too, so no float64 or boolean copy of a
    large dense matrix is ever made whole; a file is read with
    :meth:`~deltanmf.data.backed.H5Matrix.block`. A sparse block is served in pieces of at most
    :data:`~deltanmf.core.matrix.PASS_STORED` stored values (whole rows).
    """

    def __init__(self, source, data: DataSettings, cells: np.ndarray, pass_cells: int | None = None):
        self.cells = cells
        check_choice(source, data)
        self.n_genes = len(matrix_genes(source, data))
        if isinstance(source, H5adFile):
            self.file = source.matrix(data.layer, raw=data.use_raw)
            self.memory = None
            self.dtype = self.file.dtype
        else:
            self.file = None
            self.memory = source.raw.X if data.use_raw else source.X if data.layer is None else source.layers[data.layer]
            self.dtype = self.memory.dtype
        # a dense block in memory gets float64 and boolean copies: a quarter of the values
        dense = self.memory is not None and not sp.issparse(self.memory)
        self.size = pass_cells or max(1, scan_rows(self.n_genes) // (4 if dense else 1))

    def __iter__(self) -> Iterator[tuple[np.ndarray, sp.csr_matrix | np.ndarray]]:
        for where, block in self._read():
            pieces = row_pieces(block)
            if len(pieces) == 1:
                yield where, block
                continue
            for lo, hi in pieces:
                yield where[lo:hi], block[lo:hi]

    def _read(self) -> Iterator[tuple[np.ndarray, sp.csr_matrix | np.ndarray]]:
        if self.file is None:
            for start in range(0, len(self.cells), self.size):
                where = np.arange(start, min(start + self.size, len(self.cells)))
                yield where, canonical(self.memory[self.cells[where]])
            return
        # a file is read in its own order, in runs of rows (cells not in use are read and dropped)
        position = np.full(self.file.shape[0], -1, dtype=np.int64)
        position[self.cells] = np.arange(len(self.cells))
        first, last = int(self.cells.min()), int(self.cells.max()) + 1
        for start in range(first, last, self.size):
            where = position[start:min(start + self.size, last)]
            used = where >= 0
            if used.any():
                block = self.file.block(start, start + len(where))
                yield where[used], canonical(block if used.all() else block[np.flatnonzero(used)])


def canonical(x):
    """A raw block as CSR with summed duplicates (other writers may store a gene twice in a row:
    summed, as scipy does), or a C-contiguous array; its own dtype, except float16 (which scipy
    cannot hold) as float32."""
    if sp.issparse(x):
        x = sp.csr_matrix(x)
        if not x.has_canonical_format:
            x = x.copy()
            x.sum_duplicates()
        return x
    x = np.asarray(x)
    return np.ascontiguousarray(x, dtype=np.float32 if x.dtype == np.float16 else None)


def as_float32(x):
    """A raw block in the precision the model trains in."""
    if sp.issparse(x):
        return sp.csr_matrix(x, dtype=np.float32)
    return np.ascontiguousarray(x, dtype=np.float32)


def stored_entries(block: sp.csr_matrix) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(values, rows, columns)`` of a sparse block's stored entries."""
    return block.data, np.repeat(np.arange(block.shape[0]), np.diff(block.indptr)), block.indices


class Moments:
    """Per-gene mean and sum of squared deviations over blocks of cells, combined in
    float64 by Chan et al.'s pairwise update (no E[x^2] - E[x]^2 cancellation)."""

    def __init__(self, n_genes: int):
        self.n, self.mean, self.m2 = 0, np.zeros(n_genes), np.zeros(n_genes)

    def add(self, values: np.ndarray, columns: np.ndarray, n_cells: int) -> None:
        n_genes = len(self.mean)
        mean = np.bincount(columns, weights=values, minlength=n_genes) / n_cells
        stored = np.bincount(columns, minlength=n_genes)
        m2 = np.bincount(columns, weights=(values - mean[columns]) ** 2, minlength=n_genes) \
            + (n_cells - stored) * mean**2
        self._combine(mean, m2, n_cells)

    def add_dense(self, values: np.ndarray) -> None:
        """A dense block (cells x genes, float64)."""
        mean = values.mean(axis=0)
        self._combine(mean, ((values - mean) ** 2).sum(axis=0), values.shape[0])

    def _combine(self, mean: np.ndarray, m2: np.ndarray, n_cells: int) -> None:
        total = self.n + n_cells
        delta = mean - self.mean
        self.m2 += m2 + delta**2 * (self.n * n_cells / total)
        self.mean += delta * (n_cells / total)
        self.n = total

    def std(self, scale: float = 1.0) -> np.ndarray:
        """Per-gene standard deviation (ddof=0) of the values times ``scale``; a deviation
        below float32 resolution relative to the gene's mean is 0: the rounding noise of a
        constant gene, which dividing by would blow up."""
        mean, sd = self.mean * scale, np.sqrt(self.m2 / max(self.n, 1)) * scale
        return np.where(sd > 1e-6 * np.abs(mean), sd, 0.0)
