"""Loss terms of the neural NMF as pure functions.

Orientation: ``x`` is a batch of cells, cells x genes (AnnData's layout); ``programs`` is
W (genes x K); ``usage`` is the batch's usage, cells x K (H transposed). The
reconstruction of the batch is ``usage @ programs.T``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .matrix import as_csr_tensor, derived, is_sparse_tensor, matmul, reconstruction_at_nonzeros


def squared_error(x: torch.Tensor, programs: torch.Tensor, usage: torch.Tensor) -> torch.Tensor:
    """Sum of squared errors of the batch, ``||X - U W^T||_F^2``.

    ``x`` may be dense or a torch sparse (CSR or COO) tensor. A sparse ``x`` is never
    densified: the square is expanded as ``||X||^2 - 2<X W, U> + <W^T W, U^T U>``, so the
    cost is ``nnz K + (genes + cells) K^2`` instead of ``genes x cells``. The three terms
    nearly cancel when the fit is good (at relative error e the result is e^2 times each
    term), so each is summed in pieces (of ``_CHUNK`` values, 2^20 for ``||X||^2``, and at
    most ``_MAX_PIECES`` of them) in float32 (torch's cascaded sums and BLAS products), the
    pieces added in float64; ``W^T W`` and ``U^T U`` are formed in float64. A float32 BLAS dot over
    millions of values is off by ~1e-5 of the term: that biased the loss by more than the
    stopping tolerance at e = 0.5 and made it negative at e = 0.01; float32 Gram matrices
    over thousands of genes or cells are off by ~1e-6. What is left is the float32
    rounding of ``X W`` itself, 1e-8 to 1e-6 of ``||X||^2``. No temporary exceeds one piece.
    """
    if not is_sparse_tensor(x):
        return torch.sum((x - usage @ programs.T) ** 2)
    x = as_csr_tensor(x)
    if tuple(x.shape) != (usage.shape[0], programs.shape[0]):
        raise ValueError(f"x is {tuple(x.shape)} but usage @ programs.T is {(usage.shape[0], programs.shape[0])}")
    values = x.values()
    # constant in the parameters (computed once for a reused full batch); cascaded sums of long pieces
    norm = derived(x, "norm", lambda: _sum_of_products(values, values, 1 << 20))
    cross = _sum_of_products(matmul(x, programs), usage)
    return (norm - 2 * cross + _gram_term(programs, usage)).to(programs.dtype)


def _gram_term(programs: torch.Tensor, usage: torch.Tensor) -> torch.Tensor:
    """``<W^T W, U^T U>`` (``||U W^T||^2``) in float64: ``U^T U`` summed over pieces of rows
    (no float64 copy of all usage), ``W^T W`` formed in float64 (in float32, over thousands
    of genes, it is off by ~1e-6)."""
    rows = max(1, _piece(usage.numel()) // max(1, usage.shape[1]))
    gram_u = sum(part.T @ part for part in (piece.double() for piece in usage.split(rows)))
    w = programs.double()
    return torch.sum((w.T @ w) * gram_u)


_CHUNK = 1 << 16  # values per float32 partial sum of the sparse loss's terms ...
_MAX_PIECES = 16  # ... but no more pieces than this: each is a few kernel launches on a GPU


def _piece(numel: int, chunk: int = _CHUNK) -> int:
    """Values per piece of a sum over ``numel`` values: ``chunk``, or more for large inputs."""
    return max(chunk, -(-numel // _MAX_PIECES))


def _sum_of_products(a: torch.Tensor, b: torch.Tensor, chunk: int = _CHUNK) -> torch.Tensor:
    """``sum(a * b)`` (same shapes) as a float64 scalar, by pieces of rows of at most ``chunk``
    values (see :func:`squared_error`)."""
    rows = max(1, _piece(a.numel(), chunk) // max(1, a[0].numel() if a.dim() > 1 and len(a) else 1))
    total = torch.zeros((), dtype=torch.float64, device=a.device)
    for part_a, part_b in zip(a.split(rows), b.split(rows)):
        total = total + torch.sum(part_a * part_b).double()
    return total


def exact_squared_error(x: torch.Tensor, programs: torch.Tensor, usage: torch.Tensor) -> float:
    """``||X - U W^T||_F^2`` of a sparse block ``x`` in float64, for reporting (not training).

    The error at the non-zeros of X plus the reconstruction's square on the zeros,
    ``sum_nz (x - p)^2 + (<W^T W, U^T U> - sum_nz p^2)`` with ``p`` the reconstruction at
    each non-zero: the first part, which dominates for a good fit, is summed without the
    cancellation of :func:`squared_error`'s expansion, and the reconstruction is only
    evaluated at the non-zeros (by chunks), never for all cells x genes.
    """
    x = as_csr_tensor(x)
    values = x.values()
    total = torch.zeros((), dtype=torch.float64, device=values.device)
    for part, recon in reconstruction_at_nonzeros(x, programs, usage):
        total += torch.sum((values[part] - recon) ** 2, dtype=torch.float64)
        total -= torch.sum(recon**2, dtype=torch.float64)
    return float(total + _gram_term(programs, usage))


class ErrorTotal:
    """The squared error of a fit summed over a matrix's blocks (see :func:`fit_error`):
    :meth:`add` each block with its usage, then :meth:`result`."""

    def __init__(self, programs, device):
        self.programs = programs
        self.sse = 0.0
        self.device = device

    def add(self, x, usage: torch.Tensor) -> None:
        u = usage.to(self.device)
        if is_sparse_tensor(x):
            self.sse += exact_squared_error(x, self.programs, u)
        else:
            self.sse += float(torch.sum((x - u @ self.programs.T) ** 2))

    def result(self, matrix) -> dict[str, float]:
        sse = max(self.sse, 0.0)  # the expansion for sparse blocks can round below 0 for an exact fit
        total = matrix.squared_norm()
        return {"recon": sse / (matrix.n_cells * matrix.n_genes),
                "relative_error": math.sqrt(sse / total) if total > 0 else float("nan")}


def fit_error(matrix, programs, usage) -> dict[str, float]:
    """Squared error of ``usage @ programs.T`` against a :class:`~deltanmf.core.matrix.CellMatrix`,
    by batches (sparse blocks by :func:`exact_squared_error`, never densified).

    Returns ``recon`` (mean squared error over entries, as in the loss) and
    ``relative_error`` (``||X - W H||_F / ||X||_F``).
    """
    total = ErrorTotal(torch.as_tensor(programs, dtype=matrix.dtype, device=matrix.device), matrix.device)
    h = torch.as_tensor(usage, dtype=matrix.dtype)
    for index, x in matrix.batches():
        total.add(x, h[torch.as_tensor(index)])
    return total.result(matrix)


def reconstruction_loss(x: torch.Tensor, programs: torch.Tensor, usage: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the entries of the batch: ``mean((X - W H)^2)``.

    ``x`` may be dense or a torch sparse tensor (see :func:`squared_error`).
    """
    if not is_sparse_tensor(x):
        return torch.mean((x - usage @ programs.T) ** 2)
    return squared_error(x, programs, usage) / (x.shape[0] * x.shape[1])


class GeneGraph:
    """A gene-gene similarity ``S`` (non-negative, zero diagonal) and its degrees.

    ``S`` may be a dense tensor or a torch sparse (COO/CSR) tensor; the Laplacian's quadratic
    form is computed as ``sum_i d_i w_i^2 - w^T S w`` so that ``L = D - S`` is never built
    and a sparse ``S`` is never densified (cost ``nnz(S) K``).
    """

    def __init__(self, similarity: torch.Tensor):
        if similarity.dim() != 2 or similarity.shape[0] != similarity.shape[1]:
            raise ValueError(f"similarity must be a square matrix, got shape {tuple(similarity.shape)}")
        self.similarity = similarity
        if similarity.is_sparse or similarity.layout != torch.strided:
            self.degree = torch.sparse.sum(similarity.to_sparse_coo(), dim=1).to_dense()
        else:
            self.degree = similarity.sum(dim=1)

    @property
    def n_genes(self) -> int:
        return self.similarity.shape[0]

    def to(self, device: torch.device | str) -> "GeneGraph":
        moved = GeneGraph.__new__(GeneGraph)
        moved.similarity = self.similarity.to(device)
        moved.degree = self.degree.to(device)
        return moved

    def _product(self, programs: torch.Tensor) -> torch.Tensor:
        """``S @ programs`` in the programs' dtype (a sparse ``S`` stays sparse)."""
        return (self.similarity @ programs.to(self.similarity.dtype)).to(programs.dtype)

    def quadratic(self, programs: torch.Tensor) -> torch.Tensor:
        """``w_k^T L w_k = 1/2 sum_ij S_ij (w_ik - w_jk)^2`` of each program (length K).

        It grows as ``c^2`` when a program is multiplied by c, so it is not what the prior
        penalises (see :meth:`rayleigh`); the plain definition, for checks and comparisons.
        """
        self._check(programs)
        degree = self.degree.to(programs.dtype)[:, None]
        return torch.sum(degree * programs**2, dim=0) - torch.sum(programs * self._product(programs), dim=0)

    def trace(self, programs: torch.Tensor) -> torch.Tensor:
        """``tr(W^T L W)``, the sum of :meth:`quadratic` over programs."""
        return self.quadratic(programs).sum()

    def rayleigh(self, programs: torch.Tensor) -> torch.Tensor:
        """The normalised Rayleigh quotient of each program (a vector of length K).

        For a program w with degree-weighted mean ``m = sum_i d_i w_i / sum_i d_i`` and
        ``v = w - m``::

            R(w) = w^T L w / v^T D v = 1/2 sum_ij S_ij (w_i - w_j)^2 / sum_i d_i (w_i - m)^2

        the Rayleigh quotient of the normalised Laplacian ``D^-1/2 L D^-1/2`` at
        ``D^1/2 v``. It is unchanged when the program is multiplied by any c > 0 (only its
        shape counts) or raised by the same amount on every gene (so it cannot be lowered by
        flattening the program), and it lies in [0, 2] whatever the graph's weights: 0 when
        the program is constant over each connected part of the graph, about 1 when its
        loadings are unrelated to the graph (loadings drawn independently of it, or shuffled
        over the genes, give 1 up to a few 1/genes), below 1 when similar genes carry similar loadings. It
        equals ``1 - v^T S v / v^T D v``, one minus the program's degree-weighted
        autocorrelation over the graph. Genes without edges (degree 0) do not count. A
        program that is constant over the genes with edges counts 0.

        Computed from ``S @ v`` and the degrees, so ``L`` is never built and a sparse ``S``
        is never densified (cost ``nnz(S) K``).
        """
        self._check(programs)
        degree = self.degree.to(programs.dtype)[:, None]
        volume = degree.sum()
        tiny = torch.finfo(programs.dtype).tiny
        centred = programs - torch.sum(degree * programs, dim=0, keepdim=True) / volume.clamp_min(tiny)
        spread = torch.sum(degree * centred**2, dim=0)
        rough = spread - torch.sum(centred * self._product(centred), dim=0)  # quadratic(centred) = quadratic(w)
        # a spread at rounding level of the loadings' size: the program is constant on the graph
        scale = torch.sum(degree * programs**2, dim=0)
        ok = spread > torch.finfo(programs.dtype).eps * scale
        quotient = rough / torch.where(ok, spread, torch.ones_like(spread))  # no 0/0 in the gradient
        return torch.where(ok, quotient, torch.zeros_like(quotient))

    def _check(self, programs: torch.Tensor) -> None:
        if programs.dim() != 2 or programs.shape[0] != self.n_genes:
            raise ValueError(
                f"programs have {programs.shape[0]} genes but the similarity graph has {self.n_genes}"
            )


def laplacian_penalty(graph: GeneGraph, programs: torch.Tensor) -> torch.Tensor:
    """The prior's term as the loss uses it: the mean over programs of the normalised Rayleigh
    quotient (:meth:`GeneGraph.rayleigh`), a number in [0, 2] (1: unrelated to the graph).

    Scale-invariant per program: ``W H`` is unchanged when a program is divided by c and its
    usage multiplied by c, so a penalty on the raw programs (``tr(W^T L W)``) could be met by
    that rescaling alone; this one can only be lowered by changing the programs' shapes.
    """
    return graph.rayleigh(programs).mean()


def orthogonality_penalty(baseline: torch.Tensor, case: torch.Tensor) -> torch.Tensor:
    """``mean((B^T C)^2)`` of the column-L2-normalised programs: 0 when every case program
    is orthogonal to every baseline program, 1 when they coincide."""
    b = baseline / baseline.norm(dim=0, keepdim=True).clamp_min(1e-12)
    c = case / case.norm(dim=0, keepdim=True).clamp_min(1e-12)
    return torch.mean((b.T @ c) ** 2)


def adaptive_strength(relative: float, reference: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """Strength ``a`` that makes ``a * penalty`` equal ``relative * reference`` right now.

    This is how the method turns a user's relative strength (rho) into an absolute one
    when a regulariser switches on; a zero penalty gets strength 0 rather than inf.
    """
    penalty = penalty.detach()
    safe = torch.where(penalty > 0, penalty, torch.ones_like(penalty))
    return torch.where(penalty > 0, relative * reference.detach() / safe, torch.zeros_like(penalty))


@dataclass
class LossTerms:
    """Named loss terms of one step; ``total`` is what is minimised."""

    total: torch.Tensor
    recon: torch.Tensor
    laplacian: torch.Tensor | None = None
    ortho: torch.Tensor | None = None

    def items(self):
        """(name, value) pairs of the terms that exist, for logging."""
        for name in ("total", "recon", "laplacian", "ortho"):
            value = getattr(self, name)
            if value is not None:
                yield ("loss" if name == "total" else name), value
