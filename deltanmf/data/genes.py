"""Choosing genes (:func:`select_genes`): detected in enough cells, not on a removal list, in a
boolean ``.var`` column (``data.gene_mask_key``), in a resource or reference programs; then
the highly variable ones on counts (``data.n_top_genes``, :func:`highly_variable`).

Highly variable genes follow the Seurat v3 recipe (Stuart et al. 2019; scanpy's
``flavor="seurat_v3"``), on the values of ``.X`` or ``data.layer`` as stored (counts),
over the cells in use, controls and cases pooled:

1. each gene's mean and variance (``ddof=1``);
2. the variance a gene of that mean is expected to have: a local regression of
   ``log10(variance)`` on ``log10(mean)`` over the genes with a positive variance. This is
   statsmodels' LOWESS (local linear, span 0.3, no robustness iterations), where Seurat fits
   a local quadratic LOESS with the same span;
3. every value standardised by the expected standard deviation, ``(x - mean) / sd``, and
   clipped at ``sqrt(n_cells)``, so that a handful of cells cannot make a gene variable;
4. the variance of the clipped values (``ddof=1``), the gene's *standardised variance*;
   the ``n_top_genes`` genes with the largest are kept.

The statistics come from two passes over the matrix by blocks (the preparation's
:class:`~deltanmf.data.blocks.Blocks`): the moments in the value-check pass, the clipped
variance in a pass of its own (:class:`ClippedVariance`).
"""
from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..errors import InputError

log = logging.getLogger(__name__)

SPAN = 0.3  # the share of genes each local regression uses (Seurat's and scanpy's span)


def check_unique(names: pd.Index, what: str, fix: str) -> None:
    """Refuse names that occur more than once, with ``fix`` in the message."""
    if not names.is_unique:
        dup = names[names.duplicated()].unique()
        raise InputError(f"{len(dup)} {what} names occur more than once (e.g. {list(dup[:3])}); {fix}")


def select_genes(detected: np.ndarray, var_names: pd.Index, gene_ids, genes, min_cells: int, remove_genes,
                 resource_genes, mask: np.ndarray | None = None, reference_genes=None
                 ) -> tuple[np.ndarray, dict[str, int], np.ndarray]:
    """The kept genes' positions, the genes left after each filter step, and the kept
    genes' IDs (``gene_ids``, else ``var_names``).

    ``detected`` is each gene's number of cells with a positive value; ``mask`` a boolean
    per gene (``data.gene_mask_key``); ``resource_genes`` and ``reference_genes`` IDs a gene
    must be among. With ``genes`` (a finished fit's genes) exactly those are kept, in that
    order.
    """
    ids = np.asarray(var_names if gene_ids is None else gene_ids).astype(str)
    if gene_ids is not None:
        check_unique(pd.Index(ids), "gene ID", "choose a data.gene_id_column with one ID per gene")
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
        if remove_genes:
            keep &= ~np.isin(ids, np.asarray(list(remove_genes), dtype=str))
        counts["remove_genes"] = int(keep.sum())
        if mask is not None:
            keep &= mask
            counts["gene_mask"] = int(keep.sum())
        for step, listed in (("resource", resource_genes), ("reference", reference_genes)):
            if listed is not None:
                keep &= np.isin(ids, np.asarray(list(listed), dtype=str))
                counts[step] = int(keep.sum())
        keep_index = np.flatnonzero(keep)
    log.info("genes kept after each step: %s", ", ".join(f"{k}={v}" for k, v in counts.items()))
    if len(keep_index) == 0:
        raise InputError(f"no genes left after filtering (genes left per step: {counts}); lower data.min_cells "
                         "or check data.remove_genes, data.gene_mask_key and the gene IDs of the resource or "
                         "reference programs")
    return keep_index, counts, ids[keep_index]


def gene_mask(var: pd.DataFrame, key: str) -> np.ndarray:
    """The boolean ``.var[key]`` column as a numpy mask (``data.gene_mask_key``)."""
    if key not in var.columns:
        raise InputError(f"data.gene_mask_key={key!r} is not a column of .var; columns: {list(var.columns)} "
                         "(run e.g. scanpy.pp.highly_variable_genes first, or data.gene_mask_key=null)")
    column = var[key]
    values = column.to_numpy()
    if column.dtype != bool and not (column.dtype == object and all(isinstance(v, (bool, np.bool_)) for v in values)):
        raise InputError(f"data.gene_mask_key={key!r}: .var[{key!r}] must be a boolean column (True = keep the gene), "
                         f"found dtype {column.dtype} (e.g. {list(values[:3])}); make one, e.g. "
                         f"adata.var['keep'] = adata.var[{key!r}] > 0")
    return values.astype(bool)


def expected_sd(mean: np.ndarray, variance: np.ndarray) -> np.ndarray:
    """Each gene's expected standard deviation given its mean: ``sqrt(10 ** f(log10 mean))``
    with ``f`` the LOWESS fit of ``log10 variance`` on ``log10 mean`` over the genes with a
    positive variance (1 for the others, whose standardised variance is 0 whatever it is)."""
    mean, variance = np.asarray(mean, dtype=np.float64), np.asarray(variance, dtype=np.float64)
    sd = np.ones_like(mean)
    varying = variance > 0
    if not varying.any():
        return sd
    x, y = np.log10(mean[varying]), np.log10(variance[varying])
    if varying.sum() < 3 or np.ptp(x) == 0:  # too few genes for a local fit: each is its own expectation
        fitted = y
    else:
        from statsmodels.nonparametric.smoothers_lowess import lowess  # only with data.n_top_genes

        # delta: points closer than 1% of the range share one fit (linear between): the fit costs
        # milliseconds instead of seconds for 30,000 genes and moves by far less than its noise
        fitted = lowess(y, x, frac=SPAN, it=0, delta=0.01 * np.ptp(x), return_sorted=False)
    sd[varying] = np.sqrt(10.0 ** fitted)
    return sd


class ClippedVariance:
    """Sum over cells of ``(min(x, clip) - mean)^2`` for some genes, over blocks of cells.

    Parameters
    ----------
    genes
        Positions of the genes in a block's columns.
    n_columns
        Columns of a block (all genes of the input).
    mean, clip
        Per gene of ``genes``: its mean and the value its counts are clipped at.
    """

    def __init__(self, genes: np.ndarray, n_columns: int, mean: np.ndarray, clip: np.ndarray):
        self.genes = np.asarray(genes, dtype=np.int64)
        self.position = np.full(n_columns, -1, dtype=np.int64)
        self.position[self.genes] = np.arange(len(self.genes))
        self.mean, self.clip = np.asarray(mean, dtype=np.float64), np.asarray(clip, dtype=np.float64)
        self.squares = np.zeros(len(self.genes))
        self.stored = np.zeros(len(self.genes), dtype=np.int64)
        self.n_cells = 0

    def add(self, block) -> None:
        """Add a block of cells (cells x all columns, CSR or dense)."""
        self.n_cells += block.shape[0]
        if not sp.issparse(block):
            values = np.minimum(np.asarray(block[:, self.genes], dtype=np.float64), self.clip)
            self.squares += ((values - self.mean) ** 2).sum(axis=0)
            self.stored += block.shape[0]
            return
        where = self.position[block.indices]
        kept = where >= 0
        where = where[kept]
        values = np.minimum(block.data[kept].astype(np.float64), self.clip[where])
        self.squares += np.bincount(where, weights=(values - self.mean[where]) ** 2, minlength=len(self.genes))
        self.stored += np.bincount(where, minlength=len(self.genes))

    def total(self) -> np.ndarray:
        """The sums, with every value not stored (a zero) counted as ``(0 - mean)^2``."""
        return self.squares + (self.n_cells - self.stored) * self.mean**2


def clip_values(mean: np.ndarray, sd: np.ndarray, n_cells: int) -> np.ndarray:
    """The value above which a gene's counts are clipped: ``sqrt(n_cells)`` expected SDs over its mean."""
    return mean + sd * np.sqrt(n_cells)


def standardized_variance(squares: np.ndarray, sd: np.ndarray, n_cells: int) -> np.ndarray:
    """The variance (``ddof=1``) of the clipped, standardised values, from :meth:`ClippedVariance.total`."""
    return squares / (max(n_cells - 1, 1) * sd**2)


def top_ranked(score: np.ndarray, n: int) -> np.ndarray:
    """Positions of the ``n`` largest scores, ties broken by position (stable), in ascending position."""
    order = np.argsort(-np.asarray(score, dtype=np.float64), kind="stable")[:n]
    return np.sort(order)


def highly_variable(blocks, n_columns: int, candidates: np.ndarray, moments, n_top: int, counts: dict
                    ) -> tuple[np.ndarray, np.ndarray]:
    """The ``n_top`` genes of ``candidates`` with the largest standardised variance, in file
    order, and their standardised variances: one pass over ``blocks`` (``(positions, block)``
    pairs, blocks of ``n_columns`` columns) given the per-gene ``moments`` (``n``, ``mean``,
    ``m2``: sum of squared deviations) of the values over the same cells."""
    if n_top > len(candidates):
        raise InputError(f"data.n_top_genes={n_top} is more than the {len(candidates)} genes left after filtering "
                         f"(genes left per step: {counts}); lower data.n_top_genes, or data.n_top_genes=null to "
                         "keep them all")
    n = moments.n
    mean = moments.mean[candidates]
    sd = expected_sd(mean, moments.m2[candidates] / max(n - 1, 1))
    clipped = ClippedVariance(candidates, n_columns, mean, clip_values(mean, sd, n))
    for _, block in blocks:
        clipped.add(block)
    score = standardized_variance(clipped.total(), sd, n)
    chosen = top_ranked(score, n_top)
    counts["n_top_genes"] = int(n_top)
    return candidates[chosen], score[chosen]
