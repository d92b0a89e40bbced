"""Cells streamed from an ``.h5ad`` file on disk (``data.backed=true``).

The expression matrix (``.X`` or a layer) is never loaded whole. :class:`H5adFile` holds
the small parts of the file (``.obs``, ``.var``, ``.uns``, ``.obsm``, ``.varm``) in memory
and reads the matrix by rows (:class:`H5Matrix`); :func:`~deltanmf.data.prepare.prepare`
passes over it by blocks and returns an :class:`H5adRows`, a *row source*:

- ``.shape`` (cells, genes) of the processed matrix;
- ``read_rows(index)`` the processed rows ``index`` (sorted) as float32 CSR, equal to the
  same rows of the in-memory preparation;
- ``rows[index]`` a view of a subset of the cells (e.g. the controls), costing only the index;
- ``batch_indices(batch_size, rng)`` one epoch of minibatches, each made of a few randomly
  chosen runs of consecutive cells, so reading a batch is a few slices of the file instead
  of one read per cell.

The on-disk layout read here is anndata's (encoding ``csr_matrix``: a group with ``data``,
``indices``, ``indptr`` and the ``shape`` attribute), read with h5py directly: anndata's own
backed mode reads a row selection one row at a time, far slower for minibatches. A dense
``.X`` is read by blocks of rows, never more than
:data:`~deltanmf.core.matrix.SCAN_VALUES` values at once; CSC cannot be read by cells
and is refused.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import scipy.sparse as sp
from anndata.io import read_elem

from ..core import matrix as core_matrix
from ..core.matrix import scan_rows
from ..errors import InputError

log = logging.getLogger(__name__)

# Minibatches are cut from runs of consecutive cells; this many runs make one batch.
BLOCKS_PER_BATCH = 16
# Rows further apart than this many stored values are read with separate slices
# (below it one slice over the gap is cheaper than another HDF5 read call).
GAP_VALUES = 16_384


def _csr_help(key: str) -> str:
    """How to make the matrix at ``key`` (``"X"`` or ``"layers/<name>"``) streamable: the
    code to run names that matrix, since converting ``.X`` leaves a CSC layer as it was."""
    target = "adata.X" if key == "X" else f"adata.layers[{key.removeprefix('layers/')!r}]"
    return (f"use data.backed=false to load the file into memory, or store {target} as CSR and write the "
            f"file again: adata = anndata.read_h5ad(path); {target} = scipy.sparse.csr_matrix({target}); "
            "adata.write_h5ad(path)")


class H5Matrix:
    """One matrix of an h5ad file (``"X"`` or ``"layers/<name>"``), read by rows.

    The file is opened lazily and once per process, so a DataLoader worker forked after
    the first read opens its own handle (h5py handles must not cross a fork).

    Parameters
    ----------
    path
        The ``.h5ad`` file.
    key
        Location of the matrix inside it.
    """

    def __init__(self, path: str | Path, key: str):
        self.path, self.key = str(path), key
        self._file, self._pid, self._arrays = None, None, None
        node = self._node()
        if isinstance(node, h5py.Dataset):
            if node.ndim != 2:
                raise InputError(f"{key} in {path} is a {node.ndim}-D array, not cells x genes")
            self.format, self.shape, self.indptr = "dense", tuple(node.shape), None
            self.dtype = np.dtype(np.float32) if node.dtype == np.float16 else node.dtype
            return
        encoding = node.attrs.get("encoding-type", "")
        encoding = encoding.decode() if isinstance(encoding, bytes) else str(encoding)
        if encoding == "csc_matrix":
            raise InputError(f"{key} in {path} is stored as CSC (by genes), which cannot be read by cells; "
                             + _csr_help(key))
        if encoding != "csr_matrix" or not {"data", "indices", "indptr"} <= set(node):
            raise InputError(f"{key} in {path} is not a CSR matrix or a dense array (encoding {encoding!r}); "
                             + _csr_help(key))
        self.format = "csr"
        self.shape = tuple(int(s) for s in node.attrs["shape"])
        self.dtype = _scipy_dtype(node["data"][:0]).dtype
        # n_cells + 1 offsets (8 MB per million cells): every read needs them
        self.indptr = node["indptr"][:].astype(np.int64)
        # rows [0, _canonical_upto) were read in order and found canonical (sorted, unique
        # genes per row): once a whole pass has covered the file, later reads skip the O(nnz)
        # check (a pass over 300,000 cells spent seconds in it); None: a row was not canonical
        self._canonical_upto: int | None = 0

    def _node(self):
        if self._file is None or self._pid != os.getpid():
            self._file, self._pid = h5py.File(self.path, "r"), os.getpid()
            node = self._file[self.key]
            # the arrays' handles, looked up once (a lookup costs about as much as a small read)
            self._arrays = (node["data"], node["indices"]) if isinstance(node, h5py.Group) else None
        return self._file[self.key]

    def __getstate__(self):  # pickled into DataLoader workers: without the open handle
        return {**self.__dict__, "_file": None, "_pid": None, "_arrays": None}

    @property
    def n_stored(self) -> int:
        """Stored values (non-zeros of CSR, all entries when dense)."""
        return int(self.indptr[-1]) if self.format == "csr" else self.shape[0] * self.shape[1]

    def block(self, start: int, stop: int) -> sp.csr_matrix:
        """Rows ``start:stop`` in the file's dtype, one read per array. Callers keep the span
        within :data:`~deltanmf.core.matrix.SCAN_VALUES` values (:meth:`rows`, the passes)."""
        if self.format == "dense":
            return sp.csr_matrix(_scipy_dtype(self._node()[start:stop]))
        if self._file is None or self._pid != os.getpid():
            self._node()
        data, indices = self._arrays
        a, b = self.indptr[start], self.indptr[stop]
        block = sp.csr_matrix((_scipy_dtype(data[a:b]), indices[a:b], self.indptr[start:stop + 1] - a),
                              shape=(stop - start, self.shape[1]))
        if self._canonical_upto == self.shape[0]:
            block.has_canonical_format = True  # checked on an earlier pass over the whole file
        elif not block.has_canonical_format:
            # other writers may leave a row's genes unsorted or store a gene twice: sorted and
            # summed, as scipy (the in-memory path) does, so both count and scale the same
            self._canonical_upto = None
            block.sum_duplicates()
        elif self._canonical_upto is not None and start <= self._canonical_upto < stop:
            self._canonical_upto = stop  # the checked rows now reach further
        return block

    def rows(self, rows: np.ndarray) -> sp.csr_matrix:
        """The given rows (sorted, unique file positions); runs of nearby rows share one read,
        of at most :data:`~deltanmf.core.matrix.SCAN_VALUES` values (rows skipped included)."""
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) == 0:
            return sp.csr_matrix((0, self.shape[1]), dtype=self.dtype)
        if self.format == "dense":
            start, end = rows * self.shape[1], (rows + 1) * self.shape[1]
        else:
            start, end = self.indptr[rows], self.indptr[rows + 1]
        breaks = np.flatnonzero(start[1:] - end[:-1] > GAP_VALUES) + 1
        pieces = []
        for run in np.split(np.arange(len(rows)), breaks):
            for part in _capped(run, start, end):
                first, last = int(rows[part[0]]), int(rows[part[-1]]) + 1
                block = self.block(first, last)
                pieces.append(block if len(part) == last - first else _canonical_like(block, block[rows[part] - first]))
        return pieces[0] if len(pieces) == 1 else _canonical_like(pieces[0], sp.vstack(pieces, format="csr"))


def _canonical_like(source: sp.csr_matrix, rows: sp.csr_matrix) -> sp.csr_matrix:
    """``rows`` (whole rows of canonical blocks, selected or stacked) flagged canonical when
    ``source``'s cached flag says so, so that no later step checks its values again."""
    if source.has_canonical_format:
        rows.has_canonical_format = True
    return rows


def _scipy_dtype(values: np.ndarray) -> np.ndarray:
    """Values scipy's sparse matrices can hold: float16 (which they cannot) as float32."""
    return values.astype(np.float32) if values.dtype == np.float16 else values


def _capped(run: np.ndarray, start: np.ndarray, end: np.ndarray) -> Iterator[np.ndarray]:
    """``run`` (positions into ``start``/``end``, the values' span of each row) cut into parts
    whose read, from the first row's start to the last row's end, holds at most
    :data:`~deltanmf.core.matrix.SCAN_VALUES` values (at least one row each)."""
    ends = end[run]
    i = 0
    while i < len(run):
        j = max(i + 1, int(np.searchsorted(ends, start[run[i]] + core_matrix.SCAN_VALUES, side="right")))
        yield run[i:j]
        i = j


class H5adFile:
    """An ``.h5ad`` file opened for streaming: the annotations in memory, the matrices on disk.

    Has the parts of the AnnData interface the pipeline reads before preparation
    (``obs``, ``var``, ``obs_names``, ``var_names``, ``uns``, ``obsm``, ``varm``,
    ``n_obs``, ``n_vars``); ``layers`` maps each layer's name to its location in the file.
    Use :func:`open_h5ad` to create one.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        with h5py.File(self.path, "r") as f:
            if "obs" not in f or "var" not in f or "encoding-type" not in f.attrs:
                raise InputError(f"data.path: {self.path} is not an .h5ad file written by anndata >= 0.8 "
                                 "(no encoding attributes); re-save it: anndata.read_h5ad(path).write_h5ad(path)")
            parts = {k: read_elem(f[k]) for k in ("obs", "var", "uns", "obsm", "varm") if k in f}
            self.x_key = "X" if "X" in f else None
            self.layers = {name: f"layers/{name}" for name in f.get("layers", {})}
            has_raw = "raw" in f and "X" in f["raw"] and "var" in f["raw"]
            self.raw_var = read_elem(f["raw/var"]) if has_raw else None  # .raw's genes, when it has any
        self.meta = ad.AnnData(**parts)

    obs = property(lambda self: self.meta.obs)
    var = property(lambda self: self.meta.var)
    obs_names = property(lambda self: self.meta.obs_names)
    var_names = property(lambda self: self.meta.var_names)
    uns = property(lambda self: self.meta.uns)
    obsm = property(lambda self: self.meta.obsm)
    varm = property(lambda self: self.meta.varm)
    n_obs = property(lambda self: self.meta.n_obs)
    n_vars = property(lambda self: self.meta.n_vars)

    def matrix(self, layer: str | None = None, raw: bool = False) -> H5Matrix:
        """``.X`` (``layer=None``), a layer, or ``.raw.X`` (``raw``), on disk."""
        key = "raw/X" if raw else "X" if layer is None else self.layers[layer]
        matrix = H5Matrix(self.path, key)
        genes = len(self.raw_var) if raw else self.n_vars
        if matrix.shape != (self.n_obs, genes):
            raise InputError(f"{key} in {self.path} has shape {matrix.shape} but .obs/.var describe "
                             f"{(self.n_obs, genes)} cells x genes")
        return matrix

    def __repr__(self) -> str:
        return f"H5adFile({str(self.path)!r}, {self.n_obs} cells x {self.n_vars} genes, matrices on disk)"


def _generator(rng) -> np.random.Generator:
    """A numpy Generator from a numpy Generator or a seed."""
    if isinstance(rng, np.random.Generator):
        return rng
    if rng is None or isinstance(rng, (int, np.integer)):
        return np.random.default_rng(rng)
    raise TypeError(f"expected a numpy random generator or a seed, got {type(rng).__name__}")


class H5adRows:
    """Processed cells x genes of an h5ad matrix on disk, read by rows (a *row source*).

    Row ``i`` is the file's row ``cells[i]`` restricted to the file columns ``genes``,
    multiplied by ``cell_scale[i]`` and divided by ``gene_scale`` — in that order and in
    float32, the operations :func:`~deltanmf.data.prepare.prepare` applies, so a row
    equals the in-memory one bit for bit given the same scales.

    Parameters
    ----------
    matrix
        The matrix on disk.
    cells
        File row of each row (unique).
    genes
        File column of each column (unique).
    cell_scale, gene_scale
        Per-row factor and per-column divisor.
    """

    def __init__(self, matrix: H5Matrix, cells: np.ndarray, genes: np.ndarray, cell_scale: np.ndarray,
                 gene_scale: np.ndarray):
        self.matrix = matrix
        self.cells = np.asarray(cells, dtype=np.int64)
        self.genes = np.asarray(genes, dtype=np.int64)
        self.cell_scale = np.asarray(cell_scale, dtype=np.float64)
        self.gene_scale = np.asarray(gene_scale, dtype=np.float64)
        if self.cell_scale.shape != self.cells.shape or self.gene_scale.shape != self.genes.shape:
            raise ValueError("cell_scale/gene_scale must have one value per cell/gene")
        self._cell_factor = self.cell_scale.astype(np.float32)
        self._gene_factor = (1.0 / self.gene_scale).astype(np.float32)  # as prepare's _scale_columns
        self._column = np.full(matrix.shape[1], -1, dtype=np.int64)
        self._column[self.genes] = np.arange(len(self.genes))
        self._sorted_genes = bool(np.all(np.diff(self.genes) > 0))
        self._all_genes = len(self.genes) == matrix.shape[1] and self._sorted_genes

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.cells), len(self.genes)

    @property
    def scan_width(self) -> int:
        """Values a read of one row takes from the file: all of its columns, kept or not."""
        return int(self.matrix.shape[1])

    @property
    def dtype(self):
        return np.dtype(np.float32)

    def __len__(self) -> int:
        return len(self.cells)

    def __getitem__(self, index) -> H5adRows:
        """A view of some of the cells (integer positions or a boolean mask); reads nothing."""
        index = np.asarray(index)
        if index.dtype == bool:
            index = np.flatnonzero(index)
        view = H5adRows.__new__(H5adRows)
        view.__dict__.update(self.__dict__)
        view.cells, view.cell_scale, view._cell_factor = self.cells[index], self.cell_scale[index], \
            self._cell_factor[index]
        return view

    def _process(self, raw: sp.csr_matrix, factor: np.ndarray) -> sp.csr_matrix:
        """Keep the columns in use, renumbered, and scale by row and column (float32)."""
        if self._all_genes:  # nothing to drop or renumber
            return scale_rows(raw, factor, self._gene_factor)
        column = self._column[raw.indices]
        keep = column >= 0
        kept_before = np.zeros(len(keep) + 1, dtype=np.int64)
        np.cumsum(keep, out=kept_before[1:])
        kept = sp.csr_matrix((raw.data[keep], column[keep].astype(np.int32, copy=False), kept_before[raw.indptr]),
                             shape=(raw.shape[0], len(self.genes)))
        return scale_rows(kept, factor, self._gene_factor)

    def read_rows(self, index: np.ndarray) -> sp.csr_matrix:
        """Processed rows ``index`` (positions in this source, sorted) as float32 CSR."""
        index = np.asarray(index, dtype=np.int64)
        rows = self.cells[index]
        order = np.argsort(rows, kind="stable")
        raw = self.matrix.rows(rows[order])
        if np.any(np.diff(order) != 1):  # back from file order to the order asked for
            raw = raw[np.argsort(order)]
        return self._process(raw, self._cell_factor[index])

    def blocks(self, size: int | None = None) -> Iterator[tuple[np.ndarray, sp.csr_matrix]]:
        """``(index, rows)`` for consecutive runs of ``size`` rows, covering every row once
        (by default as many rows as :func:`~deltanmf.core.matrix.scan_rows` allows for the file)."""
        size = size or scan_rows(self.matrix.shape[1])
        for start in range(0, len(self), size):
            index = np.arange(start, min(start + size, len(self)))
            yield index, self.read_rows(index)

    def batch_indices(self, batch_size: int, generator=None, blocks_per_batch: int = BLOCKS_PER_BATCH
                      ) -> list[np.ndarray]:
        """One epoch of minibatches quick to read from the file: :func:`run_batches`."""
        return run_batches(len(self), batch_size, generator, blocks_per_batch)

    def to_memory(self) -> sp.csr_matrix:
        """All rows as one in-memory CSR matrix (for a subset small enough to hold)."""
        return self.read_rows(np.arange(len(self)))

    def __repr__(self) -> str:
        return f"H5adRows({len(self)} cells x {len(self.genes)} genes of {self.matrix.key} in {self.matrix.path})"


def scale_rows(x: sp.csr_matrix, row_factor: np.ndarray, column_factor: np.ndarray) -> sp.csr_matrix:
    """``diag(row_factor) @ x @ diag(column_factor)`` of a CSR block in float32, one product
    per stored value in that order (the preparation of memory and file rows alike), with
    sorted column indices."""
    values = x.data.astype(np.float32, copy=False) * np.repeat(row_factor, np.diff(x.indptr))
    values *= column_factor[x.indices]
    out = sp.csr_matrix((values, x.indices, x.indptr), shape=x.shape)
    if x.has_canonical_format:  # the same rows and genes: canonical too (the flag is cached on x)
        out.has_canonical_format = True
    elif not out.has_sorted_indices:
        out.sort_indices()
    return out


def run_batches(n: int, batch_size: int, generator=None, blocks_per_batch: int = BLOCKS_PER_BATCH
                ) -> list[np.ndarray]:
    """One epoch of minibatches of ``n`` rows (sorted positions), every row exactly once.

    The rows are cut into runs of ``batch_size / blocks_per_batch`` consecutive rows,
    with boundaries shifted by a random offset each epoch; the runs are shuffled and
    dealt out in order, so each batch is ``blocks_per_batch`` runs from random places
    in the file — read with that many slices — and no two epochs share their batches.
    """
    rng = _generator(generator)
    if batch_size >= n:
        return [np.arange(n)]
    block = max(1, batch_size // max(1, blocks_per_batch))
    offset = int(rng.integers(block))
    starts = np.concatenate([[0], np.arange(offset, n, block)]) if offset else np.arange(0, n, block)
    starts = np.unique(starts)
    stops = np.append(starts[1:], n)
    order = rng.permutation(len(starts))
    flat = np.concatenate([np.arange(starts[i], stops[i]) for i in order])
    return [np.sort(flat[i:i + batch_size]) for i in range(0, n, batch_size)]
