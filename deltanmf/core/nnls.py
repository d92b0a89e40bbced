"""Non-negative least squares for many right-hand sides at once.

Both NMF sub-problems share one form. For usage given programs, each cell's usage h
minimises ``||x - W h||^2``; for programs given usage, each gene's loading row minimises
``||x_g - H^T w_g||^2``. Expanding the square, every column b of B solves

    minimise 1/2 b^T G b - c^T b   subject to b >= 0

with a shared K x K Gram matrix G and its own column c of C. Only G and C are needed,
so X enters through products (sparse-friendly, batchable over cells). The solver is
exact block coordinate descent (HALS): each row of B has a closed-form update.
"""
from __future__ import annotations

import torch

from .matrix import matmul

_EPS = 1e-12


def nnls_gram(
    gram: torch.Tensor,
    cross: torch.Tensor,
    init: torch.Tensor | None = None,
    max_iter: int = 500,
    tol: float = 1e-6,
) -> torch.Tensor:
    """Solve ``min_B>=0 1/2 tr(B^T G B) - tr(C^T B)`` column by column.

    Parameters
    ----------
    gram
        G, K x K, symmetric positive semi-definite (e.g. ``W^T W``).
    cross
        C, K x n (e.g. ``W^T X``).
    init
        Starting B (K x n, non-negative); defaults to the unconstrained solution clamped at 0.
    max_iter, tol
        Stop after ``max_iter`` sweeps or when a sweep changes B by less than ``tol``
        relative to its norm.

    Returns
    -------
    B, K x n, non-negative.
    """
    k = gram.shape[0]
    if gram.shape != (k, k) or cross.shape[0] != k:
        raise ValueError(f"gram must be K x K and cross K x n; got {tuple(gram.shape)} and {tuple(cross.shape)}")
    if init is None:
        # a ridge at the dtype's resolution keeps collinear programs (singular G) solvable
        eps = 10 * torch.finfo(gram.dtype).eps
        ridge = eps * max(float(torch.trace(gram)), 1.0) * torch.eye(k, dtype=gram.dtype, device=gram.device)
        b = torch.linalg.solve(gram + ridge, cross).clamp_min(0)
    else:
        b = init.clone().clamp_min(0)
    diag = torch.diagonal(gram).clamp_min(_EPS)
    for _ in range(max_iter):
        change = torch.zeros((), dtype=b.dtype, device=b.device)
        for j in range(k):
            # gradient of row j is G[j] @ B - C[j]; exact minimiser of that row alone
            new = (b[j] - (gram[j] @ b - cross[j]) / diag[j]).clamp_min(0)
            change += torch.sum((new - b[j]) ** 2)
            b[j] = new
        if change <= tol**2 * torch.sum(b**2).clamp_min(_EPS):
            break
    return b


def nnls_usage(x: torch.Tensor, programs: torch.Tensor, init: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
    """Usage of each cell given programs: ``argmin_H>=0 ||X - W H||``.

    ``x`` is cells x genes, dense or a torch sparse tensor (only ``X W`` and ``W^T W``
    are needed, so a sparse block is never densified); ``programs`` genes x K; returns
    cells x K.
    """
    gram = programs.T @ programs
    cross = matmul(x, programs).T
    return nnls_gram(gram, cross, None if init is None else init.T, **kwargs).T


def nnls_programs(
    gram: torch.Tensor, cross: torch.Tensor, init: torch.Tensor | None = None, **kwargs
) -> torch.Tensor:
    """Programs given usage from accumulated statistics.

    ``gram`` = ``H H^T`` (K x K) and ``cross`` = ``X H^T`` (genes x K), both summed over
    cell batches; returns W, genes x K.
    """
    return nnls_gram(gram, cross.T, None if init is None else init.T, **kwargs).T
