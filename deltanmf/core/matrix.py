"""Access to an expression matrix by batches of cells, whatever its storage.

``CellMatrix`` hands out blocks of cells (cells x genes) on a device, so the consensus
initialisation and the evaluation code run the same way in full-batch and minibatch
mode. Dense input gives dense blocks. Sparse input stays sparse end to end: a scipy
sparse matrix, or a *row source* (any object with ``.shape`` and ``read_rows``, e.g. a
file on disk), gives torch sparse CSR blocks, and even the full matrix is only ever
held in CSR form. The products the math needs from a sparse block (``X W`` and
``X^T U``) are :func:`matmul` and :func:`t_matmul`.
"""
from __future__ import annotations

import warnings
from collections.abc import Iterator

import numpy as np
import scipy.sparse as sp
import torch

# Values (cells x genes entries) per read of a pass over a matrix on disk: 2**26 float32
# values are 256 MB even when the file stores the matrix dense. A fixed number of rows
# would not do: 65,536 rows of 30,000 genes are 8 GB.
SCAN_VALUES = 1 << 26


def scan_rows(n_genes: int) -> int:
    """Rows per read of a pass over a matrix on disk (at least one): as many as hold
    :data:`SCAN_VALUES` values, so a dense file is never densified in larger pieces.

    The same rule serves sparse files, where it bounds the stored values per read too;
    a few million values per read is far above what one HDF5 read call costs.
    """
    return max(1, SCAN_VALUES // max(1, int(n_genes)))


# Stored values per piece of a pass over a sparse block: a pass makes a few float64 and int64
# arrays as long as a piece's stored values (8 MiB each at this size), so they stay small
# however dense the block that was read.
PASS_STORED = 1 << 20


def row_pieces(block, limit: int | None = None) -> list[tuple[int, int]]:
    """Row ranges ``(lo, hi)`` cutting ``block`` into pieces of whole rows: one piece for a dense
    block or a sparse one of at most ``limit`` (:data:`PASS_STORED`) stored values, else pieces
    of at most ``limit`` stored values plus one row each."""
    limit = PASS_STORED if limit is None else limit
    if not sp.issparse(block) or block.nnz <= limit:
        return [(0, block.shape[0])]
    indptr = sp.csr_matrix(block).indptr
    ends = np.searchsorted(indptr, np.arange(limit, block.nnz, limit), side="right") - 1
    cuts = np.unique(np.concatenate([[0], ends, [block.shape[0]]]))
    return [(int(lo), int(hi)) for lo, hi in zip(cuts[:-1], cuts[1:])]


def is_row_source(data) -> bool:
    """True for the row-source duck type: ``.shape`` (cells, genes) and
    ``read_rows(sorted int64 index) -> scipy.sparse.csr_matrix``."""
    return (hasattr(data, "read_rows") and hasattr(data, "shape") and not sp.issparse(data)
            and not isinstance(data, (np.ndarray, torch.Tensor)))


def is_sparse_tensor(x: torch.Tensor) -> bool:
    return x.layout != torch.strided


def canonical_csr(data) -> sp.csr_matrix:
    """``data`` as a CSR matrix with sorted, unique column indices (torch's CSR invariant).

    A CSR matrix already in canonical form is returned as it is (wrapping it again would
    copy a view of a larger matrix: scipy's constructor copies arrays that are views of
    less than half their base).
    """
    if sp.isspmatrix_csr(data) and data.has_canonical_format:
        return data
    csr = sp.csr_matrix(data)
    if not csr.has_canonical_format:
        csr = csr.copy()
        csr.sum_duplicates()  # also sorts the indices
    return csr


def _numpy_dtype(dtype: torch.dtype):
    return torch.empty((), dtype=dtype).numpy().dtype


def _tensor(array: np.ndarray) -> torch.Tensor:
    # torch.from_numpy shares memory; a read-only array (e.g. memory-mapped) must be copied
    return torch.from_numpy(array if array.flags.writeable else array.copy())


def csr_tensor(block, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> torch.Tensor:
    """A torch sparse CSR tensor of a scipy sparse matrix, on ``device``.

    On the CPU, with matching dtypes, the tensor shares the scipy arrays (no copy).
    """
    block = canonical_csr(block)
    index_dtype = np.int32 if block.indices.dtype == np.int32 and block.indptr.dtype == np.int32 else np.int64
    values = block.data.astype(_numpy_dtype(dtype), copy=False)
    tensor = csr_from_parts(_tensor(block.indptr.astype(index_dtype, copy=False)),
                            _tensor(block.indices.astype(index_dtype, copy=False)), _tensor(values), block.shape)
    return tensor.to(device)


def csr_from_parts(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, shape) -> torch.Tensor:
    """A torch sparse CSR tensor from arrays already known to be valid (no invariant check)."""
    with warnings.catch_warnings():
        # torch flags CSR support as "beta" once per process; the operations used here are covered by tests
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(crow, col, values, size=tuple(shape), check_invariants=False)


def as_csr_tensor(x: torch.Tensor) -> torch.Tensor:
    """A sparse COO tensor converted to CSR; a CSR tensor unchanged."""
    if x.layout == torch.sparse_csr:
        return x
    if x.layout == torch.sparse_coo:
        return x.coalesce().to_sparse_csr()
    raise ValueError(f"expected a sparse CSR or COO tensor, got layout {x.layout}")


def _scipy_view(x: torch.Tensor, transposed: bool = False) -> sp.csr_matrix | sp.csc_matrix:
    """A scipy CSR matrix sharing the arrays of a CPU torch CSR tensor; ``transposed``:
    its transpose, the CSC matrix of the same arrays.

    The arrays are assigned, not passed to scipy's constructor (which ``.T`` calls too):
    the constructor narrows int64 indices to int32, a copy of them on every call.
    """
    shape = tuple(x.shape)[::-1] if transposed else tuple(x.shape)
    view = (sp.csc_matrix if transposed else sp.csr_matrix)(shape, dtype=_numpy_dtype(x.dtype))
    view.data, view.indices, view.indptr = x.values().numpy(), x.col_indices().numpy(), x.crow_indices().numpy()
    return view


# Attribute of a sparse block marked by :func:`reused`: what the products derive from it.
_REUSED = "_deltanmf_reused"


def reused(x: torch.Tensor, transposed_copy: bool = False) -> torch.Tensor:
    """Mark a sparse block that is used many times unchanged (a full batch), and return it.

    The products then keep what they derive from it on the tensor itself (:func:`derived`):
    its squared norm, and with ``transposed_copy`` on the CPU a transposed copy
    of its non-zeros, built by the first :func:`t_matmul` and used by every later one
    (torch's multithreaded CSR product on the copy is about 3x faster than scipy's
    single-threaded one on the CSR arrays, for one more copy of the non-zeros). What is
    kept goes with the tensor. The block must not be modified in place afterwards.
    Dense blocks are returned unmarked; a block already marked keeps its mark.
    """
    if is_sparse_tensor(x) and _kept(x) is None:
        setattr(x, _REUSED, {"transposed_copy": bool(transposed_copy) and x.device.type == "cpu"})
    return x


def _kept(x: torch.Tensor) -> dict | None:
    return getattr(x, _REUSED, None)


def holds_transposed_copy(x: torch.Tensor) -> bool:
    """Whether :func:`t_matmul` has built (and keeps) a transposed copy of ``x``."""
    kept = _kept(x)
    return kept is not None and "transposed" in kept


def derived(x: torch.Tensor, key: str, compute):
    """``compute()``, a value derived from the block ``x`` alone: computed once and kept on a
    block marked by :func:`reused` (under ``key``), computed on every call otherwise."""
    kept = _kept(x)
    if kept is None:
        return compute()
    if key not in kept:
        kept[key] = compute()
    return kept[key]


def t_matmul(x: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
    """``x^T @ dense`` for a block ``x`` (cells x genes, dense or sparse) and ``dense`` (cells x K).

    torch computes the transposed sparse product by first converting the whole block
    to CSR of its transpose (an extra copy of the non-zeros each call); on the CPU,
    scipy's CSC kernel reads the CSR arrays as they are instead, unless the block was
    marked by :func:`reused` with ``transposed_copy``: then a transposed copy is built
    once and torch's CSR product runs on it.
    """
    if not is_sparse_tensor(x):
        return x.T @ dense
    x = as_csr_tensor(x)
    kept = _kept(x)
    if kept is not None and kept["transposed_copy"]:
        return derived(x, "transposed", lambda: transpose(x)) @ dense.detach()
    if x.device.type == "cpu":
        out = _scipy_view(x, transposed=True) @ dense.detach().contiguous().numpy()
        return torch.from_numpy(np.ascontiguousarray(out, dtype=_numpy_dtype(dense.dtype)))
    return _t_matmul_torch(x, dense)


def transpose(x: torch.Tensor) -> torch.Tensor:
    """``x^T`` of a sparse block as a CSR tensor of its own (a copy of the non-zeros).

    For code that needs ``x^T U`` many times from the same block: ``matmul(transpose(x), u)``
    then runs torch's multithreaded CSR product, without :func:`t_matmul`'s per-call cost.
    """
    x = as_csr_tensor(x)
    if x.device.type == "cpu":
        return csr_tensor(_scipy_view(x).T.tocsr(), x.dtype)
    return x.t().to_sparse_csr()


def _t_matmul_torch(x: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
    """torch's own ``x^T @ dense`` for a CSR ``x`` (used off the CPU)."""
    return x.t() @ dense


class _SparseMatmul(torch.autograd.Function):
    """``x @ w`` for a sparse CSR ``x`` (no gradient) and a dense ``w``; backward is ``x^T g``."""

    @staticmethod
    def forward(ctx, x, w):
        ctx.x = x  # kept as an attribute: sparse CSR tensors are not saved as tensors for backward
        return x @ w

    @staticmethod
    def backward(ctx, grad):
        return None, t_matmul(ctx.x, grad)


def matmul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``x @ w`` for a block ``x`` (dense, sparse CSR or COO) and a dense ``w``, differentiable in ``w``."""
    if not is_sparse_tensor(x):
        return x @ w
    x = as_csr_tensor(x)
    if w.requires_grad:
        return _SparseMatmul.apply(x, w)
    return x @ w


def row_block(x: torch.Tensor, start: int, stop: int, bounds: tuple[int, int] | None = None) -> torch.Tensor:
    """Rows ``[start, stop)`` of a block: a view of a dense one; for a sparse one, a CSR
    tensor on the same column and value arrays (only its row pointers are new).
    ``bounds``: the rows' range of non-zeros, when the caller knows it already."""
    if not is_sparse_tensor(x):
        return x[start:stop]
    x = as_csr_tensor(x)
    crow = x.crow_indices()
    lo, hi = bounds if bounds is not None else (int(crow[start]), int(crow[stop]))
    return csr_from_parts(crow[start:stop + 1] - crow[start], x.col_indices()[lo:hi], x.values()[lo:hi],
                          (stop - start, x.shape[1]))


def reconstruction_at_nonzeros(x: torch.Tensor, programs: torch.Tensor, usage: torch.Tensor,
                               chunk_nnz: int = 1 << 18) -> Iterator[tuple[slice, torch.Tensor]]:
    """``(U W^T)`` at the non-zeros of a sparse block ``x``, by chunks of at most ``chunk_nnz``.

    Yields ``(part, values)``: ``values`` are the reconstruction at ``x``'s non-zeros
    ``part`` (a slice of its CSR values). Each chunk is a run of whole rows, computed by
    torch's sampled product (SDDMM, ``torch.sparse.sampled_addmm``) on the chunk's
    pattern: only one value per non-zero is formed, never ``nnz x K`` gathers, and the
    reconstruction is never formed for all cells x genes. A row with more than
    ``chunk_nnz`` non-zeros is a chunk of its own.
    """
    x = as_csr_tensor(x)
    bounds = x.crow_indices().cpu().numpy()
    n_rows = x.shape[0]
    programs_t = programs.T.to(x.dtype)
    usage = usage.to(x.dtype)
    start = 0
    while start < n_rows:
        # rows [start, stop) hold at most chunk_nnz non-zeros (always at least one row)
        stop = int(np.searchsorted(bounds, bounds[start] + chunk_nnz, side="right")) - 1
        stop = min(max(stop, start + 1), n_rows)
        lo, hi = int(bounds[start]), int(bounds[stop])
        if hi > lo:
            pattern = row_block(x, start, stop, bounds=(lo, hi))
            sampled = torch.sparse.sampled_addmm(pattern, usage[start:stop], programs_t, beta=0.0)
            yield slice(lo, hi), sampled.values()
        start = stop


class CellMatrix:
    """Cells x genes expression, served as torch blocks of cells.

    Parameters
    ----------
    data
        numpy array (dense blocks), scipy sparse matrix (CSR preferred; sparse CSR blocks)
        or a row source: an object with ``.shape`` (cells, genes) and
        ``read_rows(index) -> scipy.sparse.csr_matrix`` for a sorted int64 ``index``
        (sparse CSR blocks, rows read on demand).
    batch_size
        Cells per block; ``None`` serves all cells as one block.
    device
        Where blocks are placed.
    dtype
        torch dtype of the blocks.
    transposed_copy
        Sparse data in full-batch mode on the CPU: the full block keeps a transposed copy
        of its non-zeros for the ``X^T U`` products once one is needed (see :func:`reused`;
        one more copy of the non-zeros while the block is kept). False: every ``X^T U``
        reads the CSR arrays (scipy, single-threaded), no copy.
    """

    def __init__(self, data, batch_size: int | None = None, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, transposed_copy: bool = True):
        if sp.issparse(data):
            data = canonical_csr(data)
        elif not is_row_source(data):
            data = np.asarray(data)
        if len(data.shape) != 2:
            raise ValueError(f"expression must be 2-D (cells x genes), got shape {tuple(data.shape)}")
        self.data = data
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.dtype = dtype
        self.transposed_copy = bool(transposed_copy)
        self._full: torch.Tensor | None = None
        self._squared_norm: float | None = None

    @property
    def n_cells(self) -> int:
        return int(self.data.shape[0])

    @property
    def n_genes(self) -> int:
        return int(self.data.shape[1])

    @property
    def sparse(self) -> bool:
        """Blocks are torch sparse CSR tensors."""
        return not isinstance(self.data, np.ndarray)

    @property
    def full_batch(self) -> bool:
        return self.batch_size is None or self.batch_size >= self.n_cells

    def _read(self, index: np.ndarray):
        """Rows ``index`` as a numpy array or scipy CSR matrix (in the order given)."""
        index = np.asarray(index, dtype=np.int64)
        if not is_row_source(self.data):
            return self.data[index]
        unique, inverse = np.unique(index, return_inverse=True)
        block = canonical_csr(self.data.read_rows(unique))
        if block.shape != (len(unique), self.n_genes):
            raise ValueError(f"read_rows returned shape {block.shape} for {len(unique)} rows of {self.n_genes} genes")
        return block if len(unique) == len(index) and np.array_equal(unique, index) else block[inverse]

    def _tensor(self, block) -> torch.Tensor:
        if sp.issparse(block):
            return csr_tensor(block, self.dtype, self.device)
        return torch.as_tensor(np.asarray(block), dtype=self.dtype).to(self.device)

    def rows(self, index: np.ndarray) -> torch.Tensor:
        """Block of the given cells: sparse CSR for sparse data, dense otherwise."""
        return self._tensor(self._read(index))

    def full(self) -> torch.Tensor:
        """All cells as one block, built once and kept on the device (sparse data stays sparse)."""
        if self._full is None:
            if sp.issparse(self.data) or isinstance(self.data, np.ndarray):
                full = self._tensor(self.data)  # on the CPU this shares the input's memory
            else:
                full = self.rows(np.arange(self.n_cells))
            self._full = reused(full, self.transposed_copy)
        return self._full

    def release(self) -> None:
        """Forget the block :meth:`full` keeps, with its transposed copy if it made one. On a
        GPU the block is a copy of the matrix, and the training loader keeps one of its own:
        the pipeline releases this one between the initialisation and training, so the
        device never holds two (it is rebuilt when needed again). On the CPU the block
        shares the input's memory; its transposed copy does not."""
        self._full = None

    def batches(self) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        """Yield ``(cell_index, block)`` pairs covering every cell once, in order (consecutive
        cells: the cheapest reads from a file). Training's shuffled batches come from
        :class:`~deltanmf.train.datamodule.CellDataModule`, not from here."""
        if self.full_batch:
            yield np.arange(self.n_cells), self.full()
            return
        for start in range(0, self.n_cells, self.batch_size):
            index = np.arange(start, min(start + self.batch_size, self.n_cells))
            yield index, self.rows(index)

    def subset(self, index: np.ndarray) -> "CellMatrix":
        """A :class:`CellMatrix` of the cells ``index`` only (read into memory), same settings."""
        return CellMatrix(self._read(np.asarray(index, dtype=np.int64)), self.batch_size, self.device, self.dtype,
                          self.transposed_copy)

    def squared_norm(self) -> float:
        """``||X||_F^2`` computed without densifying (float64)."""
        if self._squared_norm is None:
            if sp.issparse(self.data):
                total = _sum_of_squares(self.data.data)
            elif isinstance(self.data, np.ndarray):
                total = _sum_of_squares(self.data.reshape(-1))
            else:
                # a read spans the source's full width (e.g. a file's genes before filtering)
                total, step = 0.0, scan_rows(getattr(self.data, "scan_width", self.n_genes))
                for start in range(0, self.n_cells, step):
                    block = self._read(np.arange(start, min(start + step, self.n_cells)))
                    total += _sum_of_squares(block.data)
            self._squared_norm = total
        return self._squared_norm


def _sum_of_squares(values: np.ndarray, chunk: int = 1 << 20) -> float:
    """``sum(values**2)`` in float64 (no overflow of integer or float32 values), by chunks so
    that no float64 copy of all values is made."""
    return float(sum(np.sum(np.square(values[i:i + chunk], dtype=np.float64)) for i in range(0, values.size, chunk)))
