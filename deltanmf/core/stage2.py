"""Stage 2's start: case programs from what the frozen baseline cannot explain.

The baseline's usage of each case cell (NNLS), the non-negative residual, a consensus NMF
of it, and an alternating-NNLS refinement of the case programs on the case cells with the
baseline fixed (:func:`stage2_init`). Pure torch, like the rest of :mod:`deltanmf.core`.
"""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch

from ..settings import ConsensusSettings
from .consensus import consensus_init, init_cells, refit_usage, usage_cross
from .matrix import (CellMatrix, as_csr_tensor, csr_from_parts, is_row_source, is_sparse_tensor,
                     reconstruction_at_nonzeros)
from .nnls import nnls_programs


# Cells per dense residual block: only this many cells of a dense residual exist at once,
# whatever the batch size (full-batch mode included).
RESIDUAL_BLOCK_CELLS = 4096


def sparse_residual(x: torch.Tensor, programs: torch.Tensor, usage: torch.Tensor) -> torch.Tensor:
    """``max(0, X - U W^T)`` of a sparse CSR block, as a CSR tensor with X's pattern.

    With non-negative U and W the reconstruction is >= 0, so the residual is 0 wherever
    X is: it is computed at X's non-zeros only and stays sparse.
    """
    values = x.values()
    out = torch.empty_like(values)
    for part, recon in reconstruction_at_nonzeros(x, programs, usage):
        out[part] = (values[part] - recon).clamp_min(0)
    return csr_from_parts(x.crow_indices(), x.col_indices(), out, x.shape)


class ResidualMatrix:
    """``max(0, X - U W^T)`` of a :class:`CellMatrix`, served by blocks as the matrix serves them.

    What the frozen baseline (W, with usage U >= 0) cannot explain in each case cell.
    For sparse X the residual is sparse with X's pattern (see :func:`sparse_residual`):
    kept once computed when X is in memory, recomputed from each block on every pass
    when X is streamed from a row source (``streamed``), so that no more of it exists at
    a time than of X. For dense X it is dense: in full-batch mode it is served in blocks
    of at most ``block_cells`` cells, recomputed on each pass, so only one block of it
    exists at a time; the consumers (multiplicative updates, NNLS) sum over blocks.
    """

    def __init__(self, matrix: CellMatrix, programs: torch.Tensor, usage: torch.Tensor,
                 block_cells: int = RESIDUAL_BLOCK_CELLS):
        if usage.shape != (matrix.n_cells, programs.shape[1]):
            raise ValueError(f"usage is {tuple(usage.shape)}, expected {(matrix.n_cells, programs.shape[1])}")
        self.matrix, self.programs, self.usage = matrix, programs, usage
        self.block_cells = block_cells
        self.device, self.dtype = matrix.device, matrix.dtype
        self.n_cells, self.n_genes = matrix.n_cells, matrix.n_genes
        # X read from disk on demand: holding all of its residual would hold every cell
        self.streamed = is_row_source(matrix.data)
        self._blocks = None
        self._squared_norm = None

    @property
    def full_batch(self) -> bool:
        return self.matrix.full_batch

    def _residual(self, index: np.ndarray, x: torch.Tensor) -> torch.Tensor:
        u = self.usage[torch.as_tensor(index, device=self.usage.device)].to(x.device)
        if is_sparse_tensor(x):
            return sparse_residual(as_csr_tensor(x), self.programs.to(x.device), u)
        return (x - u @ self.programs.T).clamp_min(0)

    def batches(self):
        """``(cell_index, residual block)`` pairs covering every cell once, in X's order
        (its consumers sum over blocks, so the order does not matter to them)."""
        if self.matrix.sparse and not self.streamed:
            # a sparse residual of X in memory costs no more memory than X: compute it once,
            # not on every pass of the multiplicative updates
            if self._blocks is None:
                self._blocks = [(index, self._residual(index, x)) for index, x in self.matrix.batches()]
            yield from self._blocks
            return
        if self.matrix.sparse or not self.full_batch:  # X's own blocks (a sparse one is never sliced)
            for index, x in self.matrix.batches():
                yield index, self._residual(index, x)
            return
        x = self.matrix.full()
        for start in range(0, self.n_cells, self.block_cells):
            index = np.arange(start, min(start + self.block_cells, self.n_cells))
            yield index, self._residual(index, x[start:index[-1] + 1])

    def to_cell_matrix(self) -> CellMatrix:
        """A sparse residual computed once, as a :class:`CellMatrix` served like X: the
        multiplicative updates then do not recompute it every pass.
        It has X's pattern, so it costs no more memory than X."""
        parts, order = [], []
        for index, r in self.batches():
            r = r.to("cpu")
            parts.append(sp.csr_matrix((r.values().numpy(), r.col_indices().numpy(), r.crow_indices().numpy()),
                                       shape=tuple(r.shape)))
            order.append(index)
        csr = sp.vstack(parts, format="csr")
        order = np.concatenate(order)
        if not np.array_equal(order, np.arange(len(order))):
            csr = csr[np.argsort(order)]
        return CellMatrix(csr, batch_size=self.matrix.batch_size, device=self.device, dtype=self.dtype,
                          transposed_copy=self.matrix.transposed_copy)

    def subset(self, index: np.ndarray) -> "ResidualMatrix":
        """The residual of the cells ``index`` only."""
        rows = torch.as_tensor(np.asarray(index, dtype=np.int64), device=self.usage.device)
        return ResidualMatrix(self.matrix.subset(index), self.programs, self.usage[rows], self.block_cells)

    def squared_norm(self) -> float:
        if self._squared_norm is None:
            total = 0.0
            for _, r in self.batches():
                values = r.values() if is_sparse_tensor(r) else r
                total += float(torch.sum(values.double() ** 2))
            self._squared_norm = total
        return self._squared_norm


def stage2_init(matrix: CellMatrix, baseline: torch.Tensor, k_case: int, *, consensus: ConsensusSettings,
                refine_rounds: int, refine_tol: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Starting case programs (genes x K_case) and joint usage (cells x (K + K_case)).

    1. usage of the frozen baseline in the case cells by NNLS; 2. the non-negative
    residual; 3. consensus NMF of the residual (``consensus``: ``model.consensus``);
    4. case programs rescaled so their median L2 norm matches the baseline's; 5. case
    programs refined on the case cells given the joint usage, by up to ``refine_rounds``
    rounds of alternating NNLS (:func:`refine_case_programs`); 6. joint NNLS usage on
    [baseline, case].

    Steps 1-5 run on the cells :func:`~deltanmf.core.consensus.init_cells` picks (at most
    ``consensus.max_cells``, in memory); step 6 covers every cell. With ``max_cells=None`` a
    matrix streamed from disk keeps streaming: its residual is recomputed block by block on
    every pass, never held for all cells at once.
    """
    nnls_iter = consensus.nnls_iterations
    baseline = baseline.to(matrix.device, matrix.dtype)
    cells = init_cells(matrix, consensus.max_cells, seed)
    base_usage = refit_usage(cells, baseline, nnls_iter)
    residual = ResidualMatrix(cells, baseline, base_usage)
    if cells.sparse and not residual.streamed:
        residual = residual.to_cell_matrix()
    case = consensus_init(residual, k_case, consensus, seed).programs
    del residual  # with any transposed copy of it, before the refinement may make one of the cells
    scale = torch.median(baseline.norm(dim=0)) / torch.median(case.norm(dim=0)).clamp_min(1e-12)
    case = case * scale
    case = refine_case_programs(cells, baseline, case, nnls_iter, refine_rounds, refine_tol)
    usage = refit_usage(matrix, torch.cat([baseline, case], dim=1), nnls_iter)
    return case, usage


def refine_case_programs(matrix, baseline: torch.Tensor, case: torch.Tensor, nnls_iter: int, rounds: int,
                         tol: float) -> torch.Tensor:
    """Case programs refitted on the case cells themselves, the baseline held fixed.

    Alternating NNLS on ``||X - U_base W_base^T - U_case W_case^T||``: the joint usage
    ``U = [U_base, U_case]`` given ``[baseline, case]``, then ``case`` given that usage,
    from ``U_case^T U_case`` and ``X^T U_case - W_base U_base^T U_case`` summed over the
    blocks (the residual is never formed). Stops after ``rounds`` rounds, or once a round
    changes the case programs by less than ``tol`` (relative Frobenius norm); 0 rounds
    returns ``case`` unchanged. Each usage fit is warm-started from the last.

    This is stage 1's consensus refinement, run to convergence on the joint problem. The
    consensus of the clipped residual alone is biased by the clipping, and gradient steps
    from it crawl along a nearly flat valley of the loss: on the benchmark its programs
    match the planted ones at cosine 0.89-0.91, one round gives 0.999 and about 30 rounds
    0.9998, where thousands of Adam steps are needed otherwise.
    """
    k = baseline.shape[1]
    usage = None
    for _ in range(rounds):
        usage = refit_usage(matrix, torch.cat([baseline, case], dim=1), nnls_iter, init=usage)
        base_usage, case_usage = usage[:, :k], usage[:, k:]
        cross = usage_cross(matrix, case_usage) - baseline @ (base_usage.T @ case_usage)
        new = nnls_programs(case_usage.T @ case_usage, cross, init=case, max_iter=nnls_iter)
        change = float((new - case).norm() / new.norm().clamp_min(1e-12))
        case = new
        if change < tol:
            break
    return case
