"""Reading programs: expression units, a per-gene specificity score, and the top genes.

A run fits ``X ≈ usage @ W.T`` on the prepared matrix, whose genes are divided by their
scale (``data.scale_genes``). Undoing that scale, ``W_expr = W * gene_scale``, gives the
same model in expression units (the normalised counts, or the counts with
``data.normalize=none``): ``X_expr ≈ usage @ W_expr.T`` with the same usage.

Ranking genes by weight, in either unit, puts the genes every cell expresses (ribosomal
proteins, ferritin, ...) at the top of every program. The specificity score asks instead how
much a program raises a gene above the gene's own average: it is the coefficient of an
ordinary least-squares regression of each gene's z-scores (over the cells a run fitted) on
the cells' usage shares (each cell's usage divided by its total), the score cNMF calls its
z-score spectra. With shares summing to 1 the coefficient of program k is the z-score the
fit predicts for the gene in a cell that uses program k alone: in standard deviations of
the gene, comparable between genes, near 0 for a gene no program changes, negative for a
gene the program lowers.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..core.matrix import row_pieces, scan_rows

TOP_GENES = 50  # genes per program in top_genes.csv


def expression_programs(programs: np.ndarray, gene_scale: np.ndarray) -> np.ndarray:
    """Programs in expression units: each gene's row times its scale (genes x K)."""
    return np.asarray(programs, dtype=np.float64) * np.asarray(gene_scale, dtype=np.float64)[:, None]


def _row_blocks(x):
    """``(rows, block)`` pairs covering the cells of ``x`` (numpy, scipy CSR, or a row source
    with ``blocks()`` such as :class:`~deltanmf.data.backed.H5adRows`)."""
    if hasattr(x, "blocks"):
        blocks = x.blocks()
    else:
        step = scan_rows(x.shape[1])
        blocks = ((np.arange(start, min(start + step, x.shape[0])), x[start:start + step])
                  for start in range(0, x.shape[0], step))
    for rows, block in blocks:  # the pass makes float64 copies: pieces of bounded stored values
        for lo, hi in row_pieces(block):
            yield rows[lo:hi], block[lo:hi]


def specificity(x, usage: np.ndarray) -> np.ndarray:
    """Per gene and program, the OLS coefficient of the gene's z-scores on the usage shares.

    Parameters
    ----------
    x
        Cells x genes (numpy, scipy sparse, or a row source such as
        :class:`~deltanmf.data.backed.H5adRows`): the prepared matrix the usage was fitted to.
    usage
        Cells x K, the usage of the same cells.

    Returns
    -------
    genes x K, float64. A gene constant over the cells scores 0.

    Notes
    -----
    One pass over ``x`` in float64 gathers ``S^T X``, each gene's sum and sum of squares,
    with ``S`` the shares; the z-scores are never formed, since
    ``S^T Z = (S^T X - S^T 1 mean^T) / sd``. The coefficients solve ``(S^T S) B = S^T Z``
    (least squares, so a program no cell uses gets the minimum-norm solution). Cells with no
    usage at all have no shares and are left out, of the moments too.
    """
    usage = np.asarray(usage, dtype=np.float64)
    total = usage.sum(axis=1, keepdims=True)
    used = total[:, 0] > 0
    shares = np.divide(usage, total, out=np.zeros_like(usage), where=total > 0)
    n_genes, k = x.shape[1], usage.shape[1]
    cross, sums, squares = np.zeros((k, n_genes)), np.zeros(n_genes), np.zeros(n_genes)
    for rows, block in _row_blocks(x):
        keep = used[rows]
        if not keep.all():
            rows, block = rows[keep], block[np.flatnonzero(keep)]
        s = shares[rows]
        if sp.issparse(block):
            block = sp.csr_matrix(block, dtype=np.float64)
            cross += (block.T @ s).T
            sums += np.asarray(block.sum(axis=0)).ravel()
            squares += np.bincount(block.indices, weights=block.data**2, minlength=n_genes)
        else:
            block = np.asarray(block, dtype=np.float64)
            cross += s.T @ block
            sums += block.sum(axis=0)
            squares += (block**2).sum(axis=0)
    n = int(used.sum())
    if n < 2:
        return np.zeros((n_genes, k))
    mean = sums / n
    sd = np.sqrt(np.maximum(squares / n - mean**2, 0.0) * n / (n - 1))
    varying = sd > 1e-6 * np.maximum(np.abs(mean), 1e-30)  # float32 rounding of a constant gene is not variation
    used_shares = shares[used]
    gram = used_shares.T @ used_shares
    z_cross = (cross - used_shares.sum(axis=0)[:, None] * mean[None, :]) / np.where(varying, sd, 1.0)[None, :]
    scores = np.linalg.lstsq(gram, z_cross, rcond=None)[0].T
    scores[~varying] = 0.0
    return scores


def top_genes_table(scores: np.ndarray, weights: np.ndarray, names: list[str], genes, symbols=None,
                    n: int = TOP_GENES) -> pd.DataFrame:
    """Long table of each program's ``n`` most specific genes (``top_genes.csv``).

    Columns: ``program``, ``rank`` (1 = highest specificity), ``gene``, ``symbol`` (with
    ``symbols``), ``specificity`` (the score) and ``weight`` (the program's weight in
    expression units).
    """
    genes = np.asarray(genes).astype(str)
    symbols = None if symbols is None else np.asarray(symbols).astype(str)
    n = min(n, scores.shape[0])
    parts = []
    for j, name in enumerate(names):
        order = np.argsort(-scores[:, j], kind="stable")[:n]
        part = {"program": name, "rank": np.arange(1, len(order) + 1), "gene": genes[order]}
        if symbols is not None:
            part["symbol"] = symbols[order]
        part["specificity"] = scores[order, j]
        part["weight"] = weights[order, j]
        parts.append(pd.DataFrame(part))
    return pd.concat(parts, ignore_index=True)


def top_gene_labels(scores: np.ndarray, labels, n: int = 10) -> list[str]:
    """Per program, its ``n`` most specific genes' labels joined by ``;``."""
    labels = np.asarray(labels).astype(str)
    return [";".join(labels[np.argsort(-scores[:, j], kind="stable")[:n]]) for j in range(scores.shape[1])]
