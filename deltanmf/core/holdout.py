"""Held-out matrix entries: a yardstick for the settings the training loss cannot judge.

A share of the entries of the cells x genes matrix, zeros included, is left out of the
training loss; the fitted programs and usage then predict them, and the error of that
prediction (the held-out error) compares fits made with different settings on the same
footing (entry-wise cross-validation, as in Wold's and Owen & Perry's bi-cross-validation of
matrix factorisations).

Which entries are held out is a pure function of (cell, gene, seed): a 32-bit integer hash,
so the in-memory, minibatch and streamed fits of the same cells hold out the same entries,
whatever their batches. ``cell`` is the cell's position among the stage's cells and ``gene``
the gene's column in the prepared matrix.
"""
from __future__ import annotations

import math

import torch

from .matrix import is_sparse_tensor, row_block

_MASK32 = 0xFFFFFFFF
# values (cells x genes) per piece of a block when its held-out entries are enumerated
_PIECE = 1 << 22


def _mix32(h: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 32-bit finaliser on int64 tensors holding values below 2**32 (the products
    wrap in int64; their low 32 bits, all that is kept, are exact)."""
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & _MASK32
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & _MASK32
    return h ^ (h >> 16)


class EntryMask:
    """The held-out entries: those whose hash of (cell, gene, seed), read as a number u in
    [0, 1), falls in ``[fold * fraction, (fold + 1) * fraction)``.

    Parameters
    ----------
    fraction
        Share of the entries held out, in (0, 1).
    seed
        Another seed holds out other entries.
    fold
        Folds 0, 1, ... (at most ``1 / fraction`` of them) hold out disjoint shares of the entries.
    """

    def __init__(self, fraction: float, seed: int, fold: int = 0):
        if not 0 < fraction < 1:
            raise ValueError(f"the held-out fraction must lie in (0, 1), not {fraction}")
        if fold < 0 or (fold + 1) * fraction > 1 + 1e-9:
            raise ValueError(f"fold {fold} of shares {fraction} lies beyond all entries")
        self.fraction = float(fraction)
        self.seed = int(seed)
        self.fold = int(fold)
        self._low = int(round(fold * self.fraction * 2**32))
        self._high = int(round(min((fold + 1) * self.fraction, 1.0) * 2**32))
        self._salt = int(_mix32(torch.tensor(self.seed & _MASK32)) ^ 0x9E3779B9)

    def held(self, cells: torch.Tensor, genes: torch.Tensor) -> torch.Tensor:
        """Whether each (cell, gene) pair is held out (the two broadcast against each other)."""
        cells = cells.to(torch.int64)
        h = _mix32((cells & _MASK32) ^ self._salt)
        h = _mix32(h ^ ((cells >> 32) & _MASK32))
        h = _mix32(h ^ ((genes.to(torch.int64) * 0x9E3779B1 + 0x7F4A7C15) & _MASK32))
        return (h >= self._low) & (h < self._high)

    def block(self, cells: torch.Tensor, n_genes: int) -> torch.Tensor:
        """The held-out entries of a block of ``cells`` (positions), cells x genes, boolean."""
        genes = torch.arange(n_genes, device=cells.device)
        return self.held(cells.reshape(-1, 1), genes.reshape(1, -1))


def held_out_error(x: torch.Tensor, programs: torch.Tensor, usage: torch.Tensor, cells: torch.Tensor,
                   mask: EntryMask) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Squared error at the held-out entries of a block, differentiable in ``programs`` and ``usage``.

    ``x`` is the block (cells x genes, dense or torch sparse), ``usage`` its cells' usage and
    ``cells`` their positions (for the mask). Returns per cell the sum of squared errors at its
    held-out entries, the sum of their squared values (for a relative error) and their number.
    The reconstruction is formed by pieces of rows (``_PIECE`` values), so the cost is one dense
    ``usage @ programs.T`` per block; only the held-out values are kept for the gradient.
    """
    n_cells, n_genes = x.shape
    rows = max(1, _PIECE // max(1, n_genes))
    sse, squares, counts = [], [], []
    cells = cells.to(usage.device)
    for lo in range(0, n_cells, rows):
        hi = min(n_cells, lo + rows)
        held = mask.block(cells[lo:hi], n_genes).to(usage.device)
        piece = row_block(x, lo, hi) if is_sparse_tensor(x) else x[lo:hi]
        dense = piece.to_dense() if is_sparse_tensor(piece) else piece
        recon = usage[lo:hi] @ programs.T
        where = held.nonzero(as_tuple=True)
        squared = (dense[where] - recon[where]) ** 2
        sse.append(torch.zeros(hi - lo, dtype=recon.dtype, device=recon.device).index_add(0, where[0], squared))
        squares.append(torch.zeros(hi - lo, dtype=dense.dtype, device=dense.device)
                       .index_add(0, where[0], dense[where].detach() ** 2))
        counts.append(held.sum(dim=1))
    return torch.cat(sse), torch.cat(squares), torch.cat(counts)


class HeldOutTotal:
    """Held-out error of a fit summed over a matrix's blocks; per cell too, for paired comparisons."""

    def __init__(self, programs: torch.Tensor, mask: EntryMask, n_cells: int):
        self.programs = programs
        self.mask = mask
        self.per_cell = torch.zeros(n_cells, dtype=torch.float64)
        self.squares = 0.0
        self.count = 0

    @torch.no_grad()
    def add(self, x: torch.Tensor, usage: torch.Tensor, cells) -> None:
        cells = torch.as_tensor(cells)
        sse, squares, count = held_out_error(x, self.programs, usage.to(self.programs.device), cells, self.mask)
        self.per_cell[cells] = sse.double().cpu()
        self.squares += float(squares.double().sum())
        self.count += int(count.sum())

    def result(self) -> dict:
        """``heldout_recon`` (mean squared error per held-out entry), ``heldout_relative_error``
        (``sqrt(sse / sum of squared held-out values)``) and ``heldout_entries``."""
        sse = float(self.per_cell.sum())
        return {"heldout_recon": sse / self.count if self.count else math.nan,
                "heldout_relative_error": math.sqrt(sse / self.squares) if self.squares > 0 else math.nan,
                "heldout_entries": self.count}
