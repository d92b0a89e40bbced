"""Comparing programs: cosine similarity, one-to-one matching, and their common scale (numpy only)."""
from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment


def cosine_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity between the columns of ``a`` (genes x m) and ``b`` (genes x n)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"programs must share genes: {a.shape[0]} vs {b.shape[0]} rows")
    na = np.linalg.norm(a, axis=0)
    nb = np.linalg.norm(b, axis=0)
    return (a.T @ b) / np.maximum(np.outer(na, nb), 1e-300)


def matched_cosine(fitted: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Best one-to-one matched cosine similarity for each planted program.

    Fitted and planted programs (genes x programs, columns) are paired by the Hungarian
    algorithm to maximise the total cosine similarity. Returns one value per planted
    program (0 for a planted program left without a partner when fewer were fitted).
    """
    sim = cosine_matrix(fitted, truth)
    rows, cols = linear_sum_assignment(-sim)
    out = np.zeros(sim.shape[1])
    out[cols] = sim[rows, cols]
    return out


def matching(fitted: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Index of the fitted program matched to each planted program (-1 when none)."""
    sim = cosine_matrix(fitted, truth)
    rows, cols = linear_sum_assignment(-sim)
    out = np.full(sim.shape[1], -1)
    out[cols] = rows
    return out


def normalize_programs(programs, usage):
    """Rescale so each program (column of W) sums to 1, moving its scale into usage.

    ``W H`` is unchanged; usage then reads as each program's contribution to the cell's
    total (scaled) expression. Works on numpy arrays and torch tensors alike.
    """
    total = programs.sum(0)
    safe = total + (total == 0)  # an all-zero program keeps scale 1
    return programs / safe, usage * safe
