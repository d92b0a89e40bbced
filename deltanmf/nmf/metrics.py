"""Comparisons between fitted and planted programs."""
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


def sparse_squared_error(x, programs, usage) -> float:
    """``||X - U W^T||_F^2`` of a torch sparse block ``x`` (cells x genes), in float64.

    Written as the error at the non-zeros of X plus the reconstruction's square on the
    zeros, ``sum_nz (x - p)^2 + (<W^T W, U^T U> - sum_nz p^2)`` with ``p`` the
    reconstruction at each non-zero: the first part, which dominates for a good fit, is
    summed without cancellation, and the reconstruction is only evaluated at the
    non-zeros (by chunks), never for all cells x genes.
    """
    import torch

    from .matrix import as_csr_tensor, reconstruction_at_nonzeros

    x = as_csr_tensor(x)
    values = x.values()
    total = torch.zeros((), dtype=torch.float64, device=values.device)
    for part, recon in reconstruction_at_nonzeros(x, programs, usage):
        total += torch.sum((values[part] - recon) ** 2, dtype=torch.float64)
        total -= torch.sum(recon**2, dtype=torch.float64)
    w = programs.double()
    gram = torch.zeros(w.shape[1], w.shape[1], dtype=torch.float64, device=w.device)
    for start in range(0, usage.shape[0], 1 << 16):  # float64 by blocks: no float64 copy of all usage
        u = usage[start:start + (1 << 16)].double()
        gram += u.T @ u
    total += torch.sum((w.T @ w) * gram)
    return float(total)


def fit_error(matrix, programs, usage) -> dict[str, float]:
    """Squared error of ``usage @ programs.T`` against a :class:`CellMatrix`, by batches.

    Sparse blocks are evaluated without densifying (:func:`sparse_squared_error`).
    Returns ``recon`` (mean squared error over entries, as in the loss) and
    ``relative_error`` (``||X - W H||_F / ||X||_F``).
    """
    import torch

    from .matrix import is_sparse_tensor

    sse = 0.0
    device = matrix.device
    w = torch.as_tensor(programs, dtype=matrix.dtype, device=device)
    h = torch.as_tensor(usage, dtype=matrix.dtype)
    for index, x in matrix.batches():
        u = h[torch.as_tensor(index)].to(device)
        if is_sparse_tensor(x):
            sse += sparse_squared_error(x, w, u)
        else:
            sse += float(torch.sum((x - u @ w.T) ** 2))
    sse = max(sse, 0.0)  # the expansion for sparse blocks can round below 0 for an exact fit
    total = matrix.squared_norm()
    return {"recon": sse / (matrix.n_cells * matrix.n_genes),
            "relative_error": float(np.sqrt(sse / total)) if total > 0 else float("nan")}
