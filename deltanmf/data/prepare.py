"""From an AnnData to the matrix the factorisation sees.

Steps, in order (README "Method", step 1): choose ``.X`` or a layer; split
cells into controls and cases; keep genes detected in at least ``min_cells`` of the cells
in use and drop a user list; keep genes present in a similarity resource; optionally
normalise each cell's total; optionally scale each gene to unit variance with ONE scale
computed over all cells in use (controls and cases pooled) and applied to both.
Sparse input stays sparse throughout.
"""
from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from .errors import InputError

log = logging.getLogger(__name__)

NORMALIZE = ("none", "total", "median")


@dataclass
class PreparedData:
    """Processed expression of the cells in use.

    Attributes
    ----------
    X
        cells x genes, float32, scipy CSR when the input was sparse, else numpy.
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
    source
        The input AnnData restricted to ``obs`` and ``var`` (a view; its ``.varm``/``.obsm``
        carry any simulation truth).
    """

    X: np.ndarray | sp.csr_matrix
    obs: pd.DataFrame
    var: pd.DataFrame
    is_control: np.ndarray
    gene_scale: np.ndarray
    cell_scale: np.ndarray
    gene_ids: np.ndarray | None = None
    gene_counts: dict[str, int] = field(default_factory=dict)
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


def existing_file(path: str | Path) -> Path:
    """``data.path`` as a Path (``~`` expanded), or an error naming it and, for a relative
    path, the directory it was looked for in."""
    path = Path(path).expanduser()
    if not path.exists():
        where = "" if path.is_absolute() else f" (looked for {path.absolute()})"
        raise InputError(f"data.path: file not found: {path}{where}. Give the path to an .h5ad file "
                         "(data.path=...).")
    return path


def read_h5ad(path: str | Path) -> ad.AnnData:
    """Read an ``.h5ad`` file into memory, with an error that names the path when it cannot be."""
    path = existing_file(path)
    try:
        return ad.read_h5ad(path)
    except Exception as exc:  # h5py/anndata raise many types for a file that is not an h5ad
        raise InputError(f"data.path: cannot read {path} as an .h5ad file ({type(exc).__name__}: {exc}).") from exc


def _matrix(adata: ad.AnnData, layer: str | None):
    if layer is None:
        if adata.X is None:
            raise InputError(f"the AnnData has no .X; choose a layer with data.layer=... (layers: {list(adata.layers)})")
        return adata.X
    if layer not in adata.layers:
        raise InputError(f"data.layer={layer!r} not found; layers present: {list(adata.layers) or 'none'} "
                         "(use data.layer=null for .X)")
    return adata.layers[layer]


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
    if case is not None and str(case) == str(control):
        raise InputError(f"data.case={case!r} is the same as data.control; give the case value, "
                         "or data.case=null for every non-control cell")
    if case is None:
        is_case = ~is_control
    else:
        is_case = values == str(case)
        if not is_case.any():
            raise InputError(f"data.case={case!r}: no cell has this value in .obs[{condition_key!r}]; "
                             f"values found: {described} (use data.case=null for every non-control cell)")
    return is_control, is_case


def _first_position(x, bad: np.ndarray) -> tuple[int, int]:
    """(row, column) of the first flagged stored value of ``x``."""
    first = int(np.flatnonzero(bad)[0])
    if sp.issparse(x):
        csr = sp.csr_matrix(x)
        row = int(np.searchsorted(csr.indptr, first, side="right") - 1)
        return row, int(csr.indices[first])
    return divmod(first, x.shape[1])


def _check_values(x, what: str, cells, genes) -> None:
    if sp.issparse(x):
        x = sp.csr_matrix(x)
        values = x.data
    else:
        values = np.asarray(x).ravel()
    for bad, kind, need in ((~np.isfinite(values), "NaN or infinite", "finite, non-negative expression"),
                            (values < 0, "negative", "non-negative expression (use raw or normalised counts, "
                                                      "not centred or log-ratio data)")):
        if bad.any():
            row, col = _first_position(x, bad)
            raise InputError(f"{what} holds {int(bad.sum())} {kind} values (the first in cell {cells[row]!r}, "
                             f"gene {genes[col]!r}); NMF needs {need}.")


def _check_unique(names: pd.Index, what: str, fix: str) -> None:
    if not names.is_unique:
        dup = names[names.duplicated()].unique()
        raise InputError(f"{len(dup)} {what} names occur more than once (e.g. {list(dup[:3])}); {fix}")


def _to_float32(x):
    if sp.issparse(x):
        x = sp.csr_matrix(x, dtype=np.float32)
        x.sum_duplicates()
        return x
    return np.ascontiguousarray(np.asarray(x, dtype=np.float32))


def detected_cells(x) -> np.ndarray:
    """Per gene, the number of cells with a value > 0."""
    if sp.issparse(x):
        return np.asarray((x > 0).sum(axis=0)).ravel()
    return np.count_nonzero(x > 0, axis=0)


def gene_std(x) -> np.ndarray:
    """Per-gene standard deviation over cells (ddof=0), from sparse input without densifying.

    A deviation below float32 resolution relative to the gene's mean is returned as 0:
    it is rounding noise of a constant gene, and dividing by it would blow the gene up.
    """
    n, n_genes = x.shape
    if sp.issparse(x):
        # Centred sums in float64: E[x^2] - E[x]^2 cancels badly for nearly constant genes.
        x = sp.csr_matrix(x)
        mean = np.asarray(x.sum(axis=0, dtype=np.float64)).ravel() / n
        centred = x.data.astype(np.float64) - mean[x.indices]
        stored = np.bincount(x.indices, minlength=n_genes)
        sq = np.bincount(x.indices, weights=centred**2, minlength=n_genes) + (n - stored) * mean**2
        sd = np.sqrt(sq / n)
    else:
        dense = np.asarray(x, dtype=np.float64)
        mean, sd = dense.mean(axis=0), dense.std(axis=0)
    return np.where(sd > 1e-6 * np.abs(mean), sd, 0.0)


def _scale_rows(x, factor: np.ndarray):
    if sp.issparse(x):
        return sp.csr_matrix(sp.diags(factor.astype(np.float32)) @ x)
    return x * factor[:, None].astype(np.float32)


def _scale_columns(x, factor: np.ndarray):
    if sp.issparse(x):
        return sp.csr_matrix(x @ sp.diags(factor.astype(np.float32)))
    return x * factor[None, :].astype(np.float32)


def cells_in_use(obs: pd.DataFrame, var_names: pd.Index, condition_key: str, control, case, use_case: bool,
                 normalize: str, min_cells: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Check the options and names, split the conditions; ``(is_control, is_case, cells)``
    with ``cells`` the positions in use, controls first (shared by the in-memory and
    streamed preparation)."""
    if normalize not in NORMALIZE:
        raise InputError(f"data.normalize={normalize!r} is not one of {NORMALIZE}")
    if min_cells < 0:
        raise InputError(f"data.min_cells must be >= 0, got {min_cells}")
    is_control, is_case = split_conditions(obs, condition_key, control, case)
    cells = np.concatenate([np.flatnonzero(is_control), np.flatnonzero(is_case)]) if use_case \
        else np.flatnonzero(is_control)
    if use_case and not is_case.any():
        raise InputError(f"no case cells: every cell in .obs[{condition_key!r}] is the control {control!r}")
    _check_unique(obs.index[cells], "cell", "make them unique first (adata.obs_names_make_unique())")
    _check_unique(var_names, "gene", "make them unique first (adata.var_names_make_unique())")
    return is_control, is_case, cells


def select_genes(detected: np.ndarray, var_names: pd.Index, gene_ids, genes, min_cells: int, remove_genes,
                 resource_genes) -> tuple[np.ndarray, dict[str, int], np.ndarray]:
    """The kept genes' positions, the genes left after each filter step, and the kept
    genes' IDs (``gene_ids``, else ``var_names``).

    ``detected`` is each gene's number of cells with a positive value. With ``genes``
    (a finished fit's genes) exactly those are kept, in that order.
    """
    ids = np.asarray(var_names if gene_ids is None else gene_ids).astype(str)
    if gene_ids is not None:
        _check_unique(pd.Index(ids), "gene ID", "choose a data.gene_id_column with one ID per gene")
    counts = {"input": int(len(var_names))}
    if genes is not None:
        position = {g: i for i, g in enumerate(np.asarray(var_names).astype(str))}
        missing = [g for g in genes if g not in position]
        if missing:
            raise InputError(f"{len(missing)} genes of the stage-1 result are not in this dataset (e.g. {missing[:3]}); "
                             "stage1_from must come from a fit of the same genes")
        keep_index = np.array([position[g] for g in genes], dtype=np.int64)
        counts["stage1_genes"] = len(keep_index)
    else:
        keep = detected >= min_cells
        counts["min_cells"] = int(keep.sum())
        if remove_genes is not None and len(remove_genes):
            keep &= ~np.isin(ids, np.asarray(list(remove_genes), dtype=str))
        counts["remove_genes"] = int(keep.sum())
        if resource_genes is not None:
            keep &= np.isin(ids, np.asarray(list(resource_genes), dtype=str))
            counts["resource"] = int(keep.sum())
        keep_index = np.flatnonzero(keep)
    log.info("genes kept after each step: %s", ", ".join(f"{k}={v}" for k, v in counts.items()))
    if len(keep_index) == 0:
        raise InputError(f"no genes left after filtering (genes left per step: {counts}); "
                         "lower data.min_cells or check data.remove_genes and the resource's gene IDs")
    return keep_index, counts, ids[keep_index]


def check_no_empty_cells(empty: np.ndarray, cell_names: pd.Index, n_kept: int, counts: dict) -> None:
    """Refuse cells with no expression left in the kept genes (they cannot be normalised or fitted)."""
    if empty.any():
        names = list(cell_names[empty][:3])
        raise InputError(f"{int(empty.sum())} cells have no expression left in the {n_kept} kept genes "
                         f"(e.g. {names}; genes left per step: {counts}); remove empty cells first, or lower "
                         "data.min_cells")


def prepare(
    adata: ad.AnnData,
    condition_key: str,
    control,
    case=None,
    layer: str | None = None,
    min_cells: int = 3,
    remove_genes: Sequence[str] | None = None,
    normalize: str = "none",
    target_sum: float | None = None,
    scale_genes: bool = True,
    use_case: bool = True,
    resource_genes: Sequence[str] | None = None,
    gene_ids: Sequence[str] | None = None,
    genes: Sequence[str] | None = None,
    gene_scale: np.ndarray | None = None,
) -> PreparedData:
    """Select cells and genes and normalise, as described in the module docstring.

    Parameters
    ----------
    adata
        Cells x genes AnnData; not modified.
    condition_key, control, case
        ``.obs`` column and the control (and case) values; ``case=None`` takes every
        non-control cell.
    layer
        Layer to use instead of ``.X``.
    min_cells
        Keep genes detected (> 0) in at least this many of the cells in use.
    remove_genes
        Gene IDs (``.var_names``) to drop, e.g. the perturbed genes of a screen.
    normalize
        ``"none"``, ``"total"`` (each cell to ``target_sum``, default 1e4) or ``"median"``
        (each cell to the median total of the cells in use).
    scale_genes
        Divide each gene by its standard deviation over all cells in use (no centring).
    use_case
        Include the case cells (two-stage fits); otherwise only controls are used.
    resource_genes
        Genes of a similarity resource; genes absent from it are dropped.
    gene_ids
        IDs to match against ``remove_genes`` and ``resource_genes`` (defaults to ``.var_names``).
    genes, gene_scale
        Reuse a finished fit's genes (exactly these, in this order; the filters are
        skipped) and its per-gene scale, so new cells are put in the same units as the
        programs that fit was trained in (``stage1_from``).
    """
    is_control, is_case, cells = cells_in_use(adata.obs, adata.var_names, condition_key, control, case, use_case,
                                              normalize, min_cells)
    x = _matrix(adata, layer)[cells]
    _check_values(x, "data.layer=" + repr(layer) if layer else ".X", adata.obs_names[cells], adata.var_names)
    if x.dtype == np.float64:
        warnings.warn(f"{'data.layer=' + repr(layer) if layer else '.X'} is float64; converting to float32 "
                      "(the precision the model trains in)", UserWarning, stacklevel=2)
    x = _to_float32(x)

    keep_index, counts, kept_ids = select_genes(detected_cells(x), adata.var_names, gene_ids, genes, min_cells, remove_genes,
                                      resource_genes)
    x = x[:, keep_index]
    empty = np.asarray(x.sum(axis=1)).ravel() <= 0
    check_no_empty_cells(empty, adata.obs_names[cells], len(keep_index), counts)

    totals = np.asarray(x.sum(axis=1)).ravel().astype(np.float64)
    cell_scale = np.ones(x.shape[0])
    if normalize != "none":
        target = float(np.median(totals[totals > 0])) if normalize == "median" else float(target_sum or 1e4)
        cell_scale = np.divide(target, totals, out=np.zeros_like(totals), where=totals > 0)
        x = _scale_rows(x, cell_scale)
    if gene_scale is not None:
        gene_scale = np.asarray(gene_scale, dtype=np.float64)
        if gene_scale.shape != (x.shape[1],) or not np.all(gene_scale > 0):
            raise InputError(f"the given gene scale must hold {x.shape[1]} positive values")
        x = _scale_columns(x, 1.0 / gene_scale)
    elif scale_genes:
        sd = gene_std(x)
        gene_scale = np.where(sd > 0, sd, 1.0)
        x = _scale_columns(x, 1.0 / gene_scale)
    else:
        gene_scale = np.ones(x.shape[1])
    if sp.issparse(x):
        # scipy's products leave the column indices unsorted; sorted once here, in place, the
        # matrix is shared as it is by the training code, which would otherwise copy it
        x.sum_duplicates()

    source = adata[cells][:, keep_index]
    obs = source.obs.copy()
    var = source.var.copy()
    return PreparedData(
        X=x, obs=obs, var=var, is_control=is_control[cells], gene_scale=gene_scale, cell_scale=cell_scale,
        gene_ids=kept_ids, gene_counts=counts, source=source,
    )
