"""From an AnnData (in memory, or an ``.h5ad`` opened for streaming) to the matrix the
factorisation sees: one preparation for both.

Steps, in order: choose ``.X`` or a layer; split cells into controls and cases; keep genes
detected in at least ``min_cells`` of the cells in use and drop a user list; keep the genes
of a boolean ``.var`` column (``gene_mask_key``), of a similarity resource and of reference
programs; keep the ``n_top_genes`` most variable of those left (:mod:`deltanmf.data.genes`);
optionally normalise each cell's total; optionally scale each gene to unit variance with ONE
scale computed over all cells in use (controls and cases pooled) and applied to both.

The matrix is read in blocks of cells (:class:`_Blocks`): the whole matrix when it is in
memory and fits a block, rows of a file otherwise. Two passes over the blocks give the
value checks, each gene's detections (and, for ``n_top_genes``, its mean and variance),
each cell's total and the pooled per-gene variance (float64); ``n_top_genes`` adds one pass
between them, for the clipped standardised variance. The result's ``X`` is the processed matrix itself (numpy, or float32 CSR for
sparse input) for an in-memory AnnData, and an :class:`~deltanmf.data.backed.H5adRows`
(rows processed as they are read) for a file, equal row for row.
"""
from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..core.matrix import scan_rows
from ..errors import InputError
from ..settings import DataSettings, show
from .backed import H5adFile, H5adRows, scale_rows
from .genes import check_unique, gene_mask, highly_variable, select_genes

log = logging.getLogger(__name__)

HVG_KEY = "deltanmf_variances_norm"  # .var: a kept gene's standardised variance (data.n_top_genes)


@dataclass
class PreparedData:
    """Processed expression of the cells in use.

    Attributes
    ----------
    X
        cells x genes, float32: numpy for dense input, scipy CSR for sparse input, or an
        :class:`~deltanmf.data.backed.H5adRows` reading a file.
    obs, var
        The cells in use (controls first, then cases, each in file order) and the genes kept.
    is_control
        Boolean per cell in ``obs``.
    gene_scale
        Per-gene divisor applied by unit-variance scaling (ones when scaling is off).
    cell_scale
        Per-cell factor applied by normalisation (ones when off).
    gene_ids
        IDs of the kept genes used for matching (``gene_ids`` given to :func:`prepare`,
        else ``.var_names``), e.g. to align a similarity resource.
    gene_counts
        Genes left after each filter step, in order.
    target
        The total each cell was normalised to (None without normalisation): new cells are
        put in the same units with it (:func:`deltanmf.tl.project.project`).
    source
        The input's annotations restricted to ``obs`` and ``var`` (its ``.varm``/``.obsm``
        carry any simulation truth).
    """

    X: np.ndarray | sp.csr_matrix | H5adRows
    obs: pd.DataFrame
    var: pd.DataFrame
    is_control: np.ndarray
    gene_scale: np.ndarray
    cell_scale: np.ndarray
    gene_ids: np.ndarray | None = None
    gene_counts: dict[str, int] = field(default_factory=dict)
    target: float | None = None
    source: ad.AnnData | None = None

    @property
    def n_genes(self) -> int:
        return self.X.shape[1]

    @property
    def control(self):
        """cells x genes of the control cells."""
        return self._rows(self.is_control)

    @property
    def case(self):
        """cells x genes of the case cells."""
        return self._rows(~self.is_control)

    def _rows(self, mask: np.ndarray):
        """The rows ``mask`` selects. :func:`prepare` puts the controls first, so each
        condition is one run of rows, served as a view of ``X`` (a CSR view shares the
        values and indices) rather than a copy: a stage holds its cells once, not twice."""
        index = np.flatnonzero(mask)
        contiguous = len(index) > 0 and index[-1] - index[0] + 1 == len(index)
        if contiguous and isinstance(self.X, np.ndarray):
            return self.X[index[0]:index[-1] + 1]
        if contiguous and sp.isspmatrix_csr(self.X):
            first, last = int(index[0]), int(index[-1]) + 1
            lo, hi = int(self.X.indptr[first]), int(self.X.indptr[last])
            # the arrays are set on an empty matrix: scipy's constructor would copy views of
            # less than half their base (the smaller condition)
            view = sp.csr_matrix((last - first, self.X.shape[1]), dtype=self.X.dtype)
            view.data, view.indices = self.X.data[lo:hi], self.X.indices[lo:hi]
            view.indptr = self.X.indptr[first:last + 1] - lo
            view.has_canonical_format = self.X.has_canonical_format  # known, not recomputed
            return view
        return self.X[index]


# -- cells and genes -------------------------------------------------------------------
def split_conditions(obs: pd.DataFrame, condition_key: str, control, case=None) -> tuple[np.ndarray, np.ndarray]:
    """Boolean masks (control, case) over ``obs``.

    Values are compared as strings, so ``control: 0`` in a config matches an integer or a
    ``"0"`` column alike. With ``case=None`` every non-control cell is a case.
    """
    if condition_key not in obs.columns:
        raise InputError(f"data.condition_key={condition_key!r} is not a column of .obs; "
                         f"columns present: {list(obs.columns)}")
    values = obs[condition_key].astype(str).to_numpy()
    found = pd.Series(values).value_counts()
    described = ", ".join(f"{v!r} ({n} cells)" for v, n in found.items())
    is_control = values == str(control)
    if not is_control.any():
        raise InputError(f"data.control={control!r}: no cell has this value in .obs[{condition_key!r}]; "
                         f"values found: {described}")
    if case is None:
        return is_control, ~is_control
    is_case = values == str(case)
    if not is_case.any():
        raise InputError(f"data.case={case!r}: no cell has this value in .obs[{condition_key!r}]; "
                         f"values found: {described} (use data.case=null for every non-control cell)")
    return is_control, is_case


def cells_in_use(obs: pd.DataFrame, var_names: pd.Index, data: DataSettings, use_case: bool
                 ) -> tuple[np.ndarray, np.ndarray]:
    """``(is_control, cells)``: the control mask over ``obs`` and the positions in use,
    controls first, each condition in file order."""
    is_control, is_case = split_conditions(obs, data.condition_key, data.control, data.case)
    if use_case and not is_case.any():
        raise InputError(f"no case cells: every cell in .obs[{data.condition_key!r}] is the control "
                         f"{data.control!r}")
    cells = np.flatnonzero(is_control)
    if use_case:
        cells = np.concatenate([cells, np.flatnonzero(is_case)])
    check_unique(obs.index[cells], "cell", "make them unique first (adata.obs_names_make_unique())")
    check_unique(var_names, "gene", "make them unique first (adata.var_names_make_unique())")
    return is_control, cells


def every_cell(obs: pd.DataFrame, var_names: pd.Index) -> tuple[np.ndarray, np.ndarray]:
    """``(is_control, cells)`` of a dataset used whole, with no condition (projection onto
    new cells): every cell in file order, each counted as a control."""
    check_unique(obs.index, "cell", "make them unique first (adata.obs_names_make_unique())")
    check_unique(var_names, "gene", "make them unique first (adata.var_names_make_unique())")
    return np.ones(len(obs), dtype=bool), np.arange(len(obs))


# -- the matrix, by blocks of cells ------------------------------------------------------------
def _matrix_key(x_present: bool, layers, layer: str | None) -> None:
    """Check that ``.X`` (``layer=None``) or the layer exists."""
    if layer is None and not x_present:
        raise InputError(f"the AnnData has no .X; choose a layer with data.layer=... (layers: {list(layers)})")
    if layer is not None and layer not in layers:
        raise InputError(f"data.layer={layer!r} not found; layers present: {list(layers) or 'none'} "
                         "(use data.layer=null for .X)")


class _Blocks:
    """The raw matrix of the cells in use, read as ``(positions, block)`` pairs in file order:
    ``positions`` index ``cells``, ``block`` holds those cells' rows (float32, CSR or dense).

    An in-memory matrix is served in blocks of at most
    :data:`~deltanmf.core.matrix.SCAN_VALUES` values too, so no float64 or boolean copy of a
    large dense matrix is ever made whole; a file is read with
    :meth:`~deltanmf.data.backed.H5Matrix.block`.
    """

    def __init__(self, source, layer: str | None, cells: np.ndarray, pass_cells: int | None = None):
        self.cells = cells
        if isinstance(source, H5adFile):
            _matrix_key(source.x_key is not None, source.layers, layer)
            self.file = source.matrix(layer)
            self.memory = None
            self.dtype = self.file.dtype
        else:
            _matrix_key(source.X is not None, source.layers, layer)
            self.file = None
            self.memory = source.X if layer is None else source.layers[layer]
            self.dtype = self.memory.dtype
        self.n_genes = source.n_vars
        # a dense block in memory gets float64 and boolean copies: a quarter of the values
        dense = self.memory is not None and not sp.issparse(self.memory)
        self.size = pass_cells or max(1, scan_rows(self.n_genes) // (4 if dense else 1))

    def __iter__(self) -> Iterator[tuple[np.ndarray, sp.csr_matrix | np.ndarray]]:
        if self.file is None:
            for start in range(0, len(self.cells), self.size):
                where = np.arange(start, min(start + self.size, len(self.cells)))
                yield where, _float32(self.memory[self.cells[where]])
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
                yield where[used], _float32(block if used.all() else block[np.flatnonzero(used)])


def _float32(x):
    """A block in the precision the model trains in (CSR with summed duplicates, or C-contiguous)."""
    if sp.issparse(x):
        x = sp.csr_matrix(x, dtype=np.float32)
        if not x.has_canonical_format:
            x = x.copy()
            x.sum_duplicates()  # other writers may store a gene twice in a row: summed, as scipy does
        return x
    return np.ascontiguousarray(np.asarray(x, dtype=np.float32))


def _stored(block: sp.csr_matrix) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(values, rows, columns)`` of a sparse block's stored entries."""
    return block.data, np.repeat(np.arange(block.shape[0]), np.diff(block.indptr)), block.indices


class _Moments:
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


def _check_values(blocks: _Blocks, what: str, cell_names, gene_names, moments: _Moments | None = None
                  ) -> np.ndarray:
    """Pass 1: refuse NaN, infinite or negative values (naming the first), count each gene's
    detections (> 0) over the cells in use and (``moments``) add up the values' moments."""
    detected = np.zeros(blocks.n_genes, dtype=np.int64)
    bad = {"NaN or infinite": [0, None], "negative": [0, None]}  # count, first (cell position, gene)
    for where, block in blocks:
        sparse = sp.issparse(block)
        values = block.data if sparse else block
        for kind, flags in (("NaN or infinite", ~np.isfinite(values)), ("negative", values < 0)):
            if flags.any():
                if sparse:
                    hit = np.flatnonzero(flags)
                    row = np.searchsorted(block.indptr, hit, side="right") - 1
                    first = min(zip(where[row].tolist(), block.indices[hit].tolist()))
                else:
                    row, column = np.argwhere(flags)[0]
                    first = (int(where[row]), int(column))
                bad[kind][0] += int(flags.sum())
                bad[kind][1] = first if bad[kind][1] is None else min(bad[kind][1], first)
        if sparse:
            detected += np.bincount(block.indices[block.data > 0], minlength=blocks.n_genes)
        else:
            detected += np.count_nonzero(block > 0, axis=0)
        if moments is not None:
            if sparse:
                moments.add(block.data.astype(np.float64), block.indices, block.shape[0])
            else:
                moments.add_dense(block.astype(np.float64))
    for kind, need in (("NaN or infinite", "finite, non-negative expression"),
                       ("negative", "non-negative expression (use raw or normalised counts, not centred or "
                                    "log-ratio data)")):
        count, first = bad[kind]
        if count:
            raise InputError(f"{what} holds {count} {kind} values (the first in cell {cell_names[first[0]]!r}, "
                             f"gene {gene_names[first[1]]!r}); NMF needs {need}.")
    return detected


def _totals_and_moments(blocks: _Blocks, keep_index: np.ndarray, normalize: bool, moments: _Moments | None
                        ) -> np.ndarray:
    """Pass 2: each cell's total over the kept genes, and (``moments``) the per-gene moments
    of the kept values, divided by the cell's total when normalising (they scale exactly by the
    normalisation target once it is known: the median of the totals needs the whole pass)."""
    column = np.full(blocks.n_genes, -1, dtype=np.int64)
    column[keep_index] = np.arange(len(keep_index))
    totals = np.zeros(len(blocks.cells))
    for where, block in blocks:
        if not sp.issparse(block):
            values = block[:, keep_index].astype(np.float64)
            row_total = values.sum(axis=1)
            totals[where] = row_total
            if moments is not None:
                if normalize:
                    values *= np.divide(1.0, row_total, out=np.zeros_like(row_total), where=row_total > 0)[:, None]
                moments.add_dense(values)
            continue
        values, rows, columns = _stored(block)
        col = column[columns]
        kept = col >= 0
        row, values = rows[kept], values[kept].astype(np.float64)
        row_total = np.bincount(row, weights=values, minlength=block.shape[0])
        totals[where] = row_total
        if moments is not None:
            if normalize:
                values = values * np.divide(1.0, row_total, out=np.zeros_like(row_total), where=row_total > 0)[row]
            moments.add(values, col[kept], block.shape[0])
    return totals


def _in_memory(blocks: _Blocks, keep_index: np.ndarray, cell_scale: np.ndarray, gene_scale: np.ndarray):
    """The processed matrix of an in-memory input: kept genes, scaled by cell and gene in
    float32 (the operations :class:`~deltanmf.data.backed.H5adRows` applies to file rows)."""
    cell_factor = cell_scale.astype(np.float32)
    gene_factor = (1.0 / gene_scale).astype(np.float32)
    parts = []
    for where, block in blocks:
        block = block[:, keep_index]
        if sp.issparse(block):
            parts.append(scale_rows(sp.csr_matrix(block), cell_factor[where], gene_factor))
        else:
            parts.append(block * cell_factor[where, None] * gene_factor[None, :])
    if not sp.issparse(parts[0]):
        return parts[0] if len(parts) == 1 else np.vstack(parts)
    x = parts[0] if len(parts) == 1 else sp.vstack(parts, format="csr")
    x.sum_duplicates()  # sorted column indices, once, in place: the training code shares the matrix as it is
    return x


def prepare(source: ad.AnnData | H5adFile, data: DataSettings, *, use_case: bool,
            resource_genes: Sequence[str] | None = None, gene_ids: Sequence[str] | None = None,
            genes: Sequence[str] | None = None, gene_scale: np.ndarray | None = None,
            pass_cells: int | None = None, reference_genes: Sequence[str] | None = None,
            all_cells: bool = False) -> PreparedData:
    """Select cells and genes and normalise, as described in the module docstring.

    Parameters
    ----------
    source
        Cells x genes AnnData (not modified), or an ``.h5ad`` opened for streaming
        (:func:`~deltanmf.data.read.open_h5ad`).
    data
        The ``data`` settings: ``condition_key``, ``control``, ``case``, ``layer``,
        ``min_cells``, ``remove_genes``, ``gene_mask_key``, ``n_top_genes``, ``normalize``,
        ``target_sum``, ``scale_genes``.
    use_case
        Include the case cells (two-stage fits); otherwise only controls are used.
    resource_genes
        Genes of a similarity resource; genes absent from it are dropped.
    gene_ids
        IDs to match against ``remove_genes``, ``resource_genes`` and ``reference_genes``
        (defaults to ``.var_names``).
    genes, gene_scale
        Reuse a finished fit's genes (exactly these, in this order; the filters are
        skipped) and its per-gene scale, so new cells are put in the same units as the
        programs that fit was trained in (``stage1_from``).
    pass_cells
        Cells per block of the passes over the matrix (default: as many as hold
        :data:`~deltanmf.core.matrix.SCAN_VALUES` values).
    reference_genes
        IDs of reference programs' genes (``stage1_from`` a programs file); the others are dropped.
    all_cells
        Use every cell, with no condition split (projecting programs onto new cells):
        ``is_control`` is then all True.
    """
    if all_cells:
        is_control, cells = every_cell(source.obs, source.var_names)
    else:
        is_control, cells = cells_in_use(source.obs, source.var_names, data, use_case)
    blocks = _Blocks(source, data.layer, cells, pass_cells)
    what = f"data.layer={show(data.layer)}" if data.layer else ".X"
    if blocks.dtype == np.float64:
        warnings.warn(f"{what} is float64; converting to float32 (the precision the model trains in)",
                      UserWarning, stacklevel=2)
    cell_names = source.obs_names[cells]
    select = genes is None  # a finished fit's genes are kept as they are
    mask = gene_mask(source.var, data.gene_mask_key) if select and data.gene_mask_key else None
    raw = _Moments(source.n_vars) if select and data.n_top_genes else None
    detected = _check_values(blocks, what, cell_names, source.var_names, raw)
    keep_index, counts, kept_ids = select_genes(detected, source.var_names, gene_ids, genes, data.min_cells,
                                                data.remove_genes, resource_genes, mask, reference_genes)
    variances = None
    if raw is not None:
        left = len(keep_index)
        chosen, variances = highly_variable(blocks, blocks.n_genes, keep_index, raw, data.n_top_genes, counts)
        kept_ids = kept_ids[np.searchsorted(keep_index, chosen)]
        keep_index = chosen
        log.info("highly variable genes: the %d of %d genes left with the largest standardised variance",
                 len(keep_index), left)

    normalize = data.normalize != "none"
    moments = _Moments(len(keep_index)) if gene_scale is None and data.scale_genes else None
    totals = _totals_and_moments(blocks, keep_index, normalize, moments)
    empty = totals <= 0
    if empty.any():
        raise InputError(f"{int(empty.sum())} cells have no expression left in the {len(keep_index)} kept genes "
                         f"(e.g. {list(cell_names[empty][:3])}; genes left per step: {counts}); remove empty "
                         "cells first, or lower data.min_cells")
    cell_scale, target = np.ones(len(cells)), None
    if normalize:
        target = float(np.median(totals)) if data.normalize == "median" else float(data.target_sum or 1e4)
        cell_scale = target / totals
    if gene_scale is not None:
        gene_scale = np.asarray(gene_scale, dtype=np.float64)
        if gene_scale.shape != (len(keep_index),) or not np.all(gene_scale > 0):
            raise InputError(f"the given gene scale must hold {len(keep_index)} positive values")
    elif moments is not None:
        sd = moments.std(1.0 if target is None else target)
        gene_scale = np.where(sd > 0, sd, 1.0)
    else:
        gene_scale = np.ones(len(keep_index))

    if blocks.file is not None:
        x = H5adRows(blocks.file, cells, keep_index, cell_scale, gene_scale)
        annotations = source.meta[cells][:, keep_index]
    else:
        x = _in_memory(blocks, keep_index, cell_scale, gene_scale)
        annotations = source[cells][:, keep_index]
    var = annotations.var.copy()
    if variances is not None:
        var[HVG_KEY] = variances
    return PreparedData(X=x, obs=annotations.obs.copy(), var=var, is_control=is_control[cells],
                        gene_scale=gene_scale, cell_scale=cell_scale, gene_ids=kept_ids, gene_counts=counts,
                        target=target, source=annotations)
