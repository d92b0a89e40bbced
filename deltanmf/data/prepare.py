"""From an AnnData (in memory, or an ``.h5ad`` opened for streaming) to the matrix the
factorisation sees: one preparation for both.

Steps, in order: choose ``.X``, a layer or ``.raw``; split cells into controls and cases;
keep genes detected in at least ``min_cells`` of the cells in use and drop a user list; keep
the genes of a boolean ``.var`` column (``gene_mask_key``), of a similarity resource and of
reference programs; keep the ``n_top_genes`` most variable of those left
(:mod:`deltanmf.data.genes`); optionally normalise each cell's total; optionally scale each
gene to unit variance with ONE scale computed over all cells in use (controls and cases
pooled) and applied to both.

The matrix is read in blocks of cells (:class:`~deltanmf.data.blocks.Blocks`), in memory
and from a file alike. Two passes over the blocks give the value checks, each gene's
detections (and, for ``n_top_genes``, its mean and variance), each cell's total and the
pooled per-gene variance (float64); ``n_top_genes`` adds one pass between them, for the
clipped standardised variance. The result's ``X`` is the processed matrix itself (numpy, or
float32 CSR for sparse input) for an in-memory AnnData, and an
:class:`~deltanmf.data.backed.H5adRows` (rows processed as they are read) for a file, equal
row for row.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..errors import InputError
from ..settings import DataSettings, show
from .backed import H5adFile, H5adRows, scale_rows
from .blocks import Blocks, Moments, as_float32, matrix_genes, other_matrices, stored_entries
from .cells import cells_in_use, every_cell
from .genes import gene_mask, highly_variable, select_genes

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
    cell_counts
        Cells per condition in use (``control``, ``case``) and left out (``unlabelled``: no
        condition; ``other``: another condition than ``data.case``, or the cases of a one-stage fit).
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
    cell_counts: dict[str, int] = field(default_factory=dict)
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


_PROBLEMS = {
    "NaN or infinite": "finite, non-negative expression",
    "too large for float32 (above 3.4e38)": "values float32 can hold: rescale the data (e.g. divide it by a "
                                            "constant), or normalise each cell (data.normalize=total)",
    "negative": "non-negative expression (use raw or normalised counts, not centred or log-ratio data)",
}


def _check_values(blocks: Blocks, what: str, cell_names, gene_names, elsewhere: str,
                  moments: Moments | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Pass 1: refuse NaN, infinite, negative values and values float32 cannot hold (naming the
    first of each), count each gene's detections (> 0 in float32) over the cells in use and
    (``moments``) add up the values' moments. Returns the detections and each gene's largest value."""
    detected = np.zeros(blocks.n_genes, dtype=np.int64)
    largest = np.zeros(blocks.n_genes)
    bad = {kind: [0, None] for kind in _PROBLEMS}  # count, first (cell position, gene)
    for where, block in blocks:
        sparse = sp.issparse(block)
        raw = block.data if sparse else block
        with np.errstate(over="ignore"):
            values = raw.astype(np.float32, copy=False)
        finite = np.isfinite(raw)
        flagged = (("NaN or infinite", ~finite), ("too large for float32 (above 3.4e38)", finite & ~np.isfinite(values)),
                   ("negative", raw < 0))
        for kind, flags in flagged:
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
        with np.errstate(invalid="ignore"):
            if sparse:  # each gene's largest value (a gene absent from the block: 0)
                column_max = sp.csr_matrix((np.where(np.isfinite(values), values, 0), block.indices, block.indptr),
                                           shape=block.shape).max(axis=0).toarray().ravel()
            else:
                column_max = np.where(np.isfinite(values), values, 0).max(axis=0, initial=0.0)
        np.maximum(largest, column_max, out=largest)
        if sparse:
            detected += np.bincount(block.indices[values > 0], minlength=blocks.n_genes)
        else:
            detected += np.count_nonzero(values > 0, axis=0)
        if moments is not None:
            if sparse:
                moments.add(values.astype(np.float64), block.indices, block.shape[0])
            else:
                moments.add_dense(values.astype(np.float64))
    for kind, need in _PROBLEMS.items():
        count, first = bad[kind]
        if count:
            raise InputError(f"{what} holds {count} {kind} values (the first in cell {cell_names[first[0]]!r}, "
                             f"gene {gene_names[first[1]]!r}); NMF needs {need}. {elsewhere[0].upper()}{elsewhere[1:]}.")
    return detected, largest


def _totals_and_moments(blocks: Blocks, keep_index: np.ndarray, normalize: bool, moments: Moments | None
                        ) -> np.ndarray:
    """Pass 2: each cell's total over the kept genes, and (``moments``) the per-gene moments
    of the kept values, divided by the cell's total when normalising (they scale exactly by the
    normalisation target once it is known: the median of the totals needs the whole pass)."""
    column = np.full(blocks.n_genes, -1, dtype=np.int64)
    column[keep_index] = np.arange(len(keep_index))
    totals = np.zeros(len(blocks.cells))
    for where, block in blocks:
        block = as_float32(block)
        if not sp.issparse(block):
            values = block[:, keep_index].astype(np.float64)
            row_total = values.sum(axis=1)
            totals[where] = row_total
            if moments is not None:
                if normalize:
                    values *= np.divide(1.0, row_total, out=np.zeros_like(row_total), where=row_total > 0)[:, None]
                moments.add_dense(values)
            continue
        values, rows, columns = stored_entries(block)
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


def _in_memory(blocks: Blocks, keep_index: np.ndarray, cell_scale: np.ndarray, gene_scale: np.ndarray):
    """The processed matrix of an in-memory input: kept genes, scaled by cell and gene in
    float32 (the operations :class:`~deltanmf.data.backed.H5adRows` applies to file rows)."""
    cell_factor = cell_scale.astype(np.float32)
    gene_factor = (1.0 / gene_scale).astype(np.float32)
    parts = []
    for where, block in blocks:
        block = as_float32(block)[:, keep_index]
        if sp.issparse(block):
            parts.append(scale_rows(sp.csr_matrix(block), cell_factor[where], gene_factor))
        else:
            parts.append(block * cell_factor[where, None] * gene_factor[None, :])
    if not sp.issparse(parts[0]):
        return parts[0] if len(parts) == 1 else np.vstack(parts)
    x = parts[0] if len(parts) == 1 else sp.vstack(parts, format="csr")
    x.sum_duplicates()  # sorted column indices, once, in place: the training code shares the matrix as it is
    return x


# The largest value a prepared matrix may hold: the loss sums squares of values over up to ~1e9
# entries in float32 (largest 3.4e38), so a value must stay below about sqrt(3.4e38 / 1e9).
MAX_PREPARED = 1e14


def _check_range(gene_scale: np.ndarray, largest: np.ndarray, genes, data: DataSettings) -> None:
    """Refuse a gene scale whose inverse overflows float32 (a gene of subnormal values), and
    prepared values beyond :data:`MAX_PREPARED` (each gene's largest value times the largest
    cell factor, ``largest``, over the gene's scale bounds them)."""
    with np.errstate(over="ignore"):
        factor = (1.0 / gene_scale).astype(np.float32)
    if not np.isfinite(factor).all():
        gene = genes[int(np.flatnonzero(~np.isfinite(factor))[0])]
        raise InputError(f"gene {gene!r} varies by only {gene_scale[~np.isfinite(factor)][0]:.3g} across cells: "
                         "dividing by that (data.scale_genes=true) overflows float32. Remove it "
                         f"(data.remove_genes=[{gene}]), rescale the data, or use data.scale_genes=false")
    bound = largest * factor
    if bound.max() > MAX_PREPARED:
        gene = genes[int(np.argmax(bound))]
        raise InputError(f"gene {gene!r} reaches {bound.max():.3g} after preparation, beyond the {MAX_PREPARED:.0e} "
                         "whose squares the loss can sum in float32: rescale the data (e.g. divide it by a constant), "
                         "normalise each cell (data.normalize=total), or scale the genes (data.scale_genes=true)")


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
        The ``data`` settings: ``condition_key``, ``control``, ``case``, ``allow_unlabelled``,
        ``layer``, ``use_raw``, ``min_cells``, ``remove_genes``, ``gene_mask_key``, ``n_top_genes``,
        ``normalize``, ``target_sum``, ``scale_genes``.
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
    var_table = matrix_genes(source, data)
    if all_cells:
        is_control, cells, cell_counts = every_cell(source.obs, var_table.index)
    else:
        is_control, cells, cell_counts = cells_in_use(source.obs, var_table.index, data, use_case)
    blocks = Blocks(source, data, cells, pass_cells)
    what = ".raw.X (data.use_raw=true)" if data.use_raw else f"data.layer={show(data.layer)}" if data.layer else ".X"
    if blocks.dtype != np.float32:
        log.info("%s is %s; the model trains in float32 (values are converted as they are read)", what,
                 blocks.dtype)
    cell_names = source.obs_names[cells]
    select = genes is None  # a finished fit's genes are kept as they are
    mask = gene_mask(var_table, data.gene_mask_key) if select and data.gene_mask_key else None
    raw = Moments(len(var_table)) if select and data.n_top_genes else None
    detected, largest = _check_values(blocks, what, cell_names, var_table.index, other_matrices(source, data), raw)
    keep_index, counts, kept_ids = select_genes(detected, var_table.index, gene_ids, genes, data.min_cells,
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
    moments = Moments(len(keep_index)) if gene_scale is None and data.scale_genes else None
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
    _check_range(gene_scale, largest[keep_index] * float(cell_scale.max()), var_table.index[keep_index], data)

    if blocks.file is not None:
        x = H5adRows(blocks.file, cells, keep_index, cell_scale, gene_scale)
        annotations = source.meta
    else:
        x = _in_memory(blocks, keep_index, cell_scale, gene_scale)
        annotations = source
    if data.use_raw:  # .raw's genes: the annotations of the cells, no per-gene (simulated) truth
        annotations = ad.AnnData(obs=source.obs.iloc[cells].copy(), var=var_table.iloc[keep_index].copy())
    else:
        annotations = annotations[cells][:, keep_index]
    var = annotations.var.copy()
    if variances is not None:
        var[HVG_KEY] = variances
    return PreparedData(X=x, obs=annotations.obs.copy(), var=var, is_control=is_control[cells],
                        gene_scale=gene_scale, cell_scale=cell_scale, gene_ids=kept_ids, gene_counts=counts,
                        cell_counts=cell_counts, target=target, source=annotations)
