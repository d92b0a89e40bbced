"""Consensus-NMF initialisation (after cNMF, Kotliar et al., eLife 2019).

Several short multiplicative-update NMF fits with different seeds are pooled; spectra
that sit far from their neighbours (unstable solutions) are dropped; the rest are
clustered into K groups whose medians are the consensus programs. The consensus is then
refined by NNLS into programs and usage that the neural NMF starts from.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import InputError
from ..settings import ConsensusSettings
from .losses import ErrorTotal
from .matrix import is_row_source, matmul, row_block, t_matmul
from .nnls import nnls_programs, nnls_usage

_EPS = 1e-10
_UPDATE_CELLS = 4096  # cells per piece of the usage updates (bounds their temporaries)


@dataclass
class ConsensusResult:
    """Outcome of :func:`consensus_init`.

    Attributes
    ----------
    programs
        W, genes x K, refined by NNLS.
    usage
        Usage of every cell, cells x K (H transposed), NNLS given ``programs``.
    replicate_programs
        All replicate spectra, (R*K) x genes, L2-normalised.
    kept
        Which replicate spectra passed the density filter.
    labels
        Cluster of each kept spectrum.
    stability
        Silhouette score of the kept spectra under ``labels`` (cNMF's stability).
    """

    programs: torch.Tensor
    usage: torch.Tensor
    replicate_programs: torch.Tensor
    kept: torch.Tensor
    labels: torch.Tensor
    stability: float


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


def multiplicative_nmf(matrix, k: int, iterations: int, seed: int, inner_updates: int = 1) -> torch.Tensor:
    """A short Frobenius NMF by multiplicative updates; returns W (genes x K), L1-normalised columns.

    One run of :func:`multiplicative_nmf_replicates`.
    """
    return multiplicative_nmf_replicates(matrix, k, iterations, [seed], inner_updates)[0]


def multiplicative_nmf_replicates(matrix, k: int, iterations: int, seeds, inner_updates: int = 1,
                                  tol: float = 0.0) -> list[torch.Tensor]:
    """Short Frobenius NMFs by multiplicative updates, one per seed, run side by side.

    Returns one W (genes x K, L1-normalised columns) per seed. The R runs share every
    pass over the data: their programs sit side by side in one genes x (R*K) matrix, so
    each block is read once per pass and multiplied once by all R*K columns (one wide
    product, which costs about what R narrow ones do on the CPU, and reads a block streamed
    from disk once instead of R times). Each run's Gram matrices are the
    diagonal K x K blocks of the joint ones, so every run follows exactly its own updates.

    Each pass is the exact full update, in full-batch and minibatch mode alike: the usage
    of every cell, block by block, then the programs once, from ``X^T U`` and ``U^T U``
    summed over all blocks. (Updating the programs from each batch's statistics instead
    zeroes, for good, the loading of every gene absent from a batch, and lets the last,
    possibly tiny, batch of a pass set them.) In full-batch mode a sparse block's
    transposed copy, when the matrix keeps one (``CellMatrix(transposed_copy=True)``, the
    default; the consensus runs on at most ``max_cells`` cells), is built once and serves
    every pass; in minibatch mode nothing is cached, so no more than one block of the
    data is held at a time. Sparse blocks stay sparse.

    ``inner_updates`` > 1 makes them accelerated multiplicative updates (Gillis and
    Glineur, Neural Computation 2012): each factor's update is repeated that many times
    per pass from the same products with the data (``X W`` for a block's usage, ``X^T U``
    for the programs), which are most of a pass's cost; a repeat costs only a product with
    a K x K Gram matrix. Every repeat is an ordinary multiplicative update, so the loss
    still never rises; a pass simply gets much further. 1 is the plain algorithm.

    ``tol`` > 0 stops the runs before ``iterations`` passes once every run has converged:
    when no run's squared error fell by more than ``tol`` (relative) in the last pass. The
    error comes from the pass's own products (``||X||^2 - 2<X W, U> + <W^T W, U^T U>``
    at the new usage and the pass's programs, the terms in float64), so checking costs
    no extra pass over the data. 0 runs every pass.
    """
    seeds = [int(s) for s in seeds]
    device, dtype = matrix.device, matrix.dtype
    squared_norm = matrix.squared_norm()
    mean = max(math.sqrt(squared_norm / (matrix.n_cells * matrix.n_genes)), _EPS)
    scale = math.sqrt(mean / k)
    programs = torch.empty(matrix.n_genes, len(seeds) * k, dtype=dtype)
    usage = torch.empty(matrix.n_cells, len(seeds) * k, dtype=dtype)  # filled in place: no second copy
    for r, seed in enumerate(seeds):  # each run's start is the one it would have on its own
        gen = _generator(seed)
        programs[:, r * k:(r + 1) * k] = torch.rand(matrix.n_genes, k, generator=gen, dtype=dtype) * scale
        usage[:, r * k:(r + 1) * k] = torch.rand(matrix.n_cells, k, generator=gen, dtype=dtype) * scale
    programs, usage = programs.to(device), usage.to(device)
    own = torch.block_diag(*[torch.ones(k, k, dtype=dtype)] * len(seeds)).to(device)
    previous = None
    for _ in range(iterations):
        gram_w = (programs.T @ programs) * own
        cross = torch.zeros_like(programs)
        gram_u = torch.zeros_like(gram_w)
        if tol:  # for each run's squared error: <X W, U> per column and U^T U, in float64
            fit = torch.zeros(programs.shape[1], dtype=torch.float64, device=device)
            gram_u64 = torch.zeros(gram_w.shape, dtype=torch.float64, device=device)
        for index, x in matrix.batches():
            every = len(index) == matrix.n_cells  # full batch: update the usage in place
            idx = None if every else torch.as_tensor(index, device=device)
            u = usage if every else usage[idx]
            # the updates are row by row: by pieces of cells (X W too), so that their temporaries
            # stay small next to the R*K-wide usage itself (tens of MB at 50,000 cells)
            for start in range(0, u.shape[0], _UPDATE_CELLS):
                stop = min(start + _UPDATE_CELLS, u.shape[0])
                part, wx = u[start:stop], matmul(row_block(x, start, stop), programs)
                for _ in range(inner_updates):
                    part = part * wx / (part @ gram_w).clamp_min(_EPS)
                u[start:stop] = part
                if tol:
                    part64 = part.double()
                    fit += (part64 * wx.double()).sum(dim=0)
                    gram_u64 += part64.T @ part64
            if not every:
                usage[idx] = u
            cross += t_matmul(x, u).to(device)
            gram_u += (u.T @ u) * own
        if tol:  # each run's squared error at the new usage (and this pass's programs)
            w64 = programs.double()
            gram = ((w64.T @ w64) * gram_u64 * own).sum(dim=0)
            error = squared_norm + (gram - 2 * fit).reshape(len(seeds), k).sum(dim=1)
            if previous is not None and bool(((previous - error) <= tol * previous.abs()).all()):
                break  # the pass changed no run by more than tol: its programs stand as they are
            previous = error
        for _ in range(inner_updates):
            programs = programs * cross / (programs @ gram_u).clamp_min(_EPS)
    programs = programs / programs.sum(dim=0, keepdim=True).clamp_min(_EPS)
    return list(programs.split(k, dim=1))


def density_filter(spectra: torch.Tensor, n_neighbors: int, quantile: float) -> torch.Tensor:
    """Mask of spectra whose mean distance to their ``n_neighbors`` nearest others is at
    most the ``quantile`` of those distances (outliers are replicate-specific solutions)."""
    n = spectra.shape[0]
    n_neighbors = max(1, min(n_neighbors, n - 1))
    dist = torch.cdist(spectra, spectra)
    dist.fill_diagonal_(float("inf"))
    local = torch.topk(dist, n_neighbors, dim=1, largest=False).values.mean(dim=1)
    return local <= torch.quantile(local, quantile)


def kmeans(points: torch.Tensor, k: int, seed: int, restarts: int, iterations: int = 100) -> torch.Tensor:
    """Lloyd's k-means with k-means++ seeding; returns the labels of the best of ``restarts``."""
    n = points.shape[0]
    if n < k:
        raise ValueError(f"cannot form {k} clusters from {n} spectra")
    gen = _generator(seed)
    best_labels, best_inertia = None, float("inf")
    square = torch.cdist(points, points) ** 2  # k-means++ picks among the points themselves
    for _ in range(restarts):
        chosen = [int(torch.randint(n, (1,), generator=gen))]
        d2 = square[:, chosen[0]].clone()  # squared distance of each point to its nearest pick
        for _ in range(1, k):
            probs = (d2 / d2.sum()) if d2.sum() > 0 else torch.full_like(d2, 1.0 / n)
            chosen.append(int(torch.multinomial(probs.cpu(), 1, generator=gen)))
            d2 = torch.minimum(d2, square[:, chosen[-1]])
        centers = points[chosen]  # indexing copies: the updates never write into points
        labels = torch.full((n,), -1, dtype=torch.long, device=points.device)
        for _ in range(iterations):
            new_labels = torch.cdist(points, centers).argmin(dim=1)
            if torch.equal(new_labels, labels):
                break
            labels = new_labels
            sizes = torch.bincount(labels, minlength=k)
            sums = torch.zeros_like(centers).index_add_(0, labels, points)
            filled = sizes > 0
            centers[filled] = sums[filled] / sizes[filled, None].to(points.dtype)
            for j in torch.nonzero(~filled).flatten().tolist():
                # re-seed an empty cluster at the point worst served by its centre
                far = int(torch.cdist(points, centers).min(dim=1).values.argmax())
                centers[j] = points[far]
        inertia = float(((points - centers[labels]) ** 2).sum())
        if inertia < best_inertia:
            best_labels, best_inertia = labels, inertia
    return best_labels


def silhouette(points: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean silhouette score (Euclidean); 1 is perfectly separated clusters."""
    dist = torch.cdist(points, points)
    n = points.shape[0]
    clusters = torch.unique(labels)
    if len(clusters) < 2 or n <= len(clusters):
        return float("nan")
    mean_to = torch.stack([dist[:, labels == c].sum(dim=1) for c in clusters], dim=1)
    sizes = torch.stack([(labels == c).sum() for c in clusters]).to(dist.dtype)
    own = (labels[:, None] == clusters[None, :])
    own_size = (sizes[None, :] * own).sum(dim=1)
    a = (mean_to * own).sum(dim=1) / (own_size - 1).clamp_min(1)
    other = torch.where(own, torch.full_like(mean_to, float("inf")), mean_to / sizes[None, :])
    b = other.min(dim=1).values
    s = torch.where(own_size > 1, (b - a) / torch.maximum(a, b).clamp_min(_EPS), torch.zeros_like(a))
    return float(s.mean())


def refit_usage(matrix, programs: torch.Tensor, nnls_iter: int, init: torch.Tensor | None = None
                ) -> torch.Tensor:
    """NNLS usage of every cell of ``matrix`` given ``programs`` (genes x K); cells x K.

    Runs over the matrix's blocks (all cells at once in full-batch mode: the NNLS works
    on K x cells arrays only, and a sparse block stays sparse). ``init`` (cells x K) warm-
    starts the solver, e.g. from the usage of slightly different programs.
    """
    programs = programs.to(matrix.device, matrix.dtype)
    usage = torch.empty(matrix.n_cells, programs.shape[1], dtype=programs.dtype, device=programs.device)
    for index, x in matrix.batches():
        rows = torch.as_tensor(index, device=programs.device)
        usage[rows] = nnls_usage(x, programs, init=None if init is None else init[rows], max_iter=nnls_iter)
    return usage


def refit_and_score(matrix, programs: torch.Tensor, nnls_iter: int, scored=()
                    ) -> tuple[torch.Tensor, dict[str, float], list[dict[str, float]]]:
    """:func:`refit_usage` and the refit's :func:`~deltanmf.core.losses.fit_error` in one
    pass over ``matrix``, which may be streamed from disk (each pass re-reads the file).

    ``scored`` holds further ``(programs, usage)`` fits of the same cells whose errors are
    gathered in the same pass. Returns the usage (cells x K, on the CPU), the refit's error
    and the errors of ``scored``.
    """
    programs = programs.to(matrix.device, matrix.dtype)
    usage = torch.empty(matrix.n_cells, programs.shape[1], dtype=programs.dtype)
    refit = ErrorTotal(programs, matrix.device)
    others = [(ErrorTotal(torch.as_tensor(w, dtype=matrix.dtype, device=matrix.device), matrix.device),
               torch.as_tensor(h, dtype=matrix.dtype)) for w, h in scored]
    for index, x in matrix.batches():
        rows = torch.as_tensor(index)
        u = nnls_usage(x, programs, max_iter=nnls_iter)
        refit.add(x, u)
        usage[rows] = u.cpu()
        for total, h in others:
            total.add(x, h[rows])
    return usage, refit.result(matrix), [total.result(matrix) for total, _ in others]


def usage_cross(matrix, usage: torch.Tensor) -> torch.Tensor:
    """``X^T U`` (genes x K) for the usage ``U`` of every cell (cells x K), summed over the
    matrix's blocks: the statistic the programs given usage need besides ``U^T U``."""
    cross = torch.zeros(matrix.n_genes, usage.shape[1], dtype=usage.dtype, device=usage.device)
    for index, x in matrix.batches():
        cross += t_matmul(x, usage[torch.as_tensor(index, device=usage.device)]).to(usage.device)
    return cross


def sample_cells(n_cells: int, max_cells: int | None, seed: int) -> np.ndarray | None:
    """A seeded random subset of at most ``max_cells`` cells (sorted), or None for all cells."""
    if max_cells is None or n_cells <= max_cells:
        return None
    return np.sort(np.random.default_rng(seed).choice(n_cells, size=int(max_cells), replace=False))


def init_cells(matrix, max_cells: int | None, seed: int):
    """The cells an initialisation fits: a seeded random subset of ``max_cells`` cells
    (:func:`sample_cells`), read into memory, or the matrix itself.

    A matrix streamed from disk with no more than ``max_cells`` cells is read into memory
    too (the initialisation passes over its cells tens of times, and ``max_cells`` bounds
    the memory that takes); with ``max_cells=None`` it keeps streaming.
    """
    sample = sample_cells(matrix.n_cells, max_cells, seed)
    if sample is None:
        if max_cells is None or not is_row_source(getattr(matrix, "data", None)):
            return matrix
        sample = np.arange(matrix.n_cells)
    return matrix.subset(sample)


def cluster_medians(points: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """Element-wise median of each cluster's points (rows), clipped at 0 and rescaled to sum
    to 1: genes x k consensus programs from clustered spectra (cNMF's consensus)."""
    centres = torch.stack([torch.quantile(points[labels == j], 0.5, dim=0) for j in range(k)], dim=1)
    centres = centres.clamp_min(0)
    return centres / centres.sum(dim=0, keepdim=True).clamp_min(_EPS)


def consensus_init(matrix, k: int, settings: ConsensusSettings, seed: int) -> ConsensusResult:
    """Consensus programs and usage for a K-program NMF of ``matrix``.

    ``settings`` (``model.consensus``): R = ``replicates`` seeded multiplicative-update runs
    of at most ``iterations`` passes (``inner_updates`` updates of each factor per pass;
    stopping once a pass lowers no run's error by more than ``tol``); spectra whose mean
    distance to their ``ceil(neighbor_fraction * R)`` nearest others is above the
    ``density_quantile`` are dropped; k-means (``kmeans_restarts``) clusters the rest into K
    groups whose medians are the consensus; NNLS (``nnls_iterations`` sweeps) refines it.
    Run r is seeded ``seed + r``.

    With ``max_cells`` smaller than the number of cells, the replicates, the clustering
    and the refinement of the programs use a seeded random subset of ``max_cells``
    cells; only the final usage is computed for every cell (by blocks). The programs
    given usage depend on the cells only through ``U^T U`` and ``X^T U``, sums over cells
    that a random subset of tens of thousands of cells estimates closely, so a second
    pass over all cells would cost as much as the final usage refit and change little.

    Parameters
    ----------
    matrix
        Cells x genes expression (a :class:`~deltanmf.core.matrix.CellMatrix` or anything
        serving blocks the same way, with ``subset``).
    k
        Number of programs.
    settings
        The ``model.consensus`` settings.
    seed
        Seeds the runs, the subset of cells and k-means.
    """
    replicates = settings.replicates
    fit_on = init_cells(matrix, settings.max_cells, seed)
    runs = multiplicative_nmf_replicates(fit_on, k, settings.iterations, [seed + r for r in range(replicates)],
                                        settings.inner_updates, settings.tol)
    spectra = torch.cat([w.T for w in runs])
    spectra = spectra / spectra.norm(dim=1, keepdim=True).clamp_min(_EPS)
    if replicates > 1:
        kept = density_filter(spectra, math.ceil(settings.neighbor_fraction * replicates), settings.density_quantile)
        if int(kept.sum()) < k:  # never filter below one spectrum per program
            kept = torch.ones_like(kept)
    else:
        kept = torch.ones(spectra.shape[0], dtype=torch.bool, device=spectra.device)
    pool = spectra[kept]
    labels = kmeans(pool, k, seed=seed, restarts=settings.kmeans_restarts)
    if bool((torch.bincount(labels, minlength=k) == 0).any()):
        raise InputError(f"the consensus initialisation found fewer than K={k} distinct programs in "
                         f"{replicates} runs on {fit_on.n_cells} cells; lower K, or check that the cells have counts")
    centers = cluster_medians(pool, labels, k)

    # Refinement: usage given the consensus, usage normalised per cell, programs given
    # that usage (on the same cells as the replicates), and usage of every cell given
    # the refined programs.
    nnls_iterations = settings.nnls_iterations
    usage = refit_usage(fit_on, centers, nnls_iterations)
    usage = usage / usage.sum(dim=1, keepdim=True).clamp_min(_EPS)
    programs = nnls_programs(usage.T @ usage, usage_cross(fit_on, usage), max_iter=nnls_iterations)
    usage = refit_usage(matrix, programs, nnls_iterations)
    stability = silhouette(pool, labels) if k > 1 else float("nan")
    return ConsensusResult(programs, usage, spectra, kept, labels, stability)
