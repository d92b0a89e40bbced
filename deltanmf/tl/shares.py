"""Usage shares: what the case-control tests compare, per cell and per replicate unit.

Usage is cells x programs, baseline programs first. Two kinds of share:

- *baseline share*: a baseline program's usage over the cell's total **baseline** usage.
  Case programs taking part of a case cell's usage therefore do not read as a drop of
  every baseline program. A cell with no baseline usage at all has no baseline
  composition; its baseline share is NaN and it is left out of means and tests.
- *total share*: a program's usage over the cell's total usage (all programs); used for
  case programs.

A replicate unit (a sample, or the cells of one sample in one perturbation group) is
summarised by the mean share over its cells; the sample-level tests compare
``log2(mean share + PSEUDO)`` across units.
"""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp

# Shares live in [0, 1]; 1e-3 keeps a program unused in one condition at a finite log
# without moving shares of a few percent and more.
PSEUDO = 1e-3


def _share(usage: np.ndarray, columns: slice | None = None) -> np.ndarray:
    usage = np.asarray(usage, dtype=np.float64)
    part = usage if columns is None else usage[:, columns]
    total = part.sum(axis=1, keepdims=True)
    return np.divide(part, total, out=np.zeros_like(part), where=total > 0)


def baseline_share(usage: np.ndarray, n_baseline: int) -> np.ndarray:
    """Each baseline program's share of the cell's baseline usage (cells x K)."""
    return _share(usage, slice(0, n_baseline))


def total_share(usage: np.ndarray) -> np.ndarray:
    """Each program's share of the cell's total usage (cells x all programs)."""
    return _share(usage)


def defined_baseline_share(usage: np.ndarray, n_baseline: int) -> np.ndarray:
    """Baseline share with NaN rows for cells without any baseline usage."""
    share = baseline_share(usage, n_baseline)
    share[np.asarray(usage)[:, :n_baseline].sum(axis=1) <= 0] = np.nan
    return share


def novelty(usage: np.ndarray, n_baseline: int) -> np.ndarray:
    """Per cell, the share of its usage that comes from case programs."""
    return total_share(usage)[:, n_baseline:].sum(axis=1)


def column_means(x: np.ndarray) -> np.ndarray:
    """Column means over the non-NaN rows (NaN for a column without any)."""
    count = (~np.isnan(x)).sum(axis=0)
    return np.divide(np.nansum(x, axis=0), count, out=np.full(x.shape[1], np.nan), where=count > 0)


def log2_ratio(numerator, denominator) -> np.ndarray:
    """``log2((numerator + PSEUDO) / (denominator + PSEUDO))``: the cell-level fold change."""
    return np.log2((np.asarray(numerator) + PSEUDO) / (np.asarray(denominator) + PSEUDO))


def log2_share(share) -> np.ndarray:
    """``log2(share + PSEUDO)``: the scale on which the sample-level tests compare units."""
    return np.log2(np.asarray(share, dtype=np.float64) + PSEUDO)


def unit_means(shares: np.ndarray, unit: np.ndarray, n_units: int) -> np.ndarray:
    """Mean share of each unit over its cells (units x programs), NaN-aware.

    ``unit`` gives each row's unit (0 .. n_units-1, or -1 for a row in no unit). One sparse
    product sums every unit at once, so thousands of units cost one pass over the cells.
    """
    rows = np.flatnonzero(unit >= 0)
    member = sp.csr_matrix((np.ones(len(rows)), (unit[rows], rows)), shape=(n_units, len(shares)))
    defined = ~np.isnan(shares)
    total = member @ np.where(defined, shares, 0.0)
    count = member @ defined.astype(np.float64)
    return np.divide(total, count, out=np.full(total.shape, np.nan), where=count > 0)
