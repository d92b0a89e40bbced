"""Cell-level tests: Mann-Whitney U of many groups of cells against one reference, at once.

Cells are treated as independent replicates here, which overstates the evidence when they
come from few samples (donors, guides); the sample-level tests
(:mod:`deltanmf.tl.sampletests`) are the ones to use when the data have samples.

:func:`mannwhitney_groups` gives the same p-values as ``scipy.stats.mannwhitneyu(...,
method="asymptotic")`` (tie-corrected normal approximation with continuity correction), one
group at a time, but ranks each program's cells once for all groups: every group is
compared with the same reference (the control cells), so a group's U statistic is its
cells' counts of smaller and tied reference values (a binary search in the sorted
reference), and its tie correction is the reference's ties plus what the group's own
values add to them. A genome-wide screen (thousands of groups) then costs a few sorts per
program instead of one ranking of the reference per group and program.
"""
from __future__ import annotations

import numpy as np
from scipy.special import ndtr


def _ties(sorted_values: np.ndarray) -> np.ndarray:
    """Lengths of the runs of equal values in a sorted array."""
    if len(sorted_values) == 0:
        return np.zeros(0)
    starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
    return np.diff(np.r_[starts, len(sorted_values)]).astype(np.float64)


def _one_program(values: np.ndarray, group: np.ndarray, n_groups: int, reference: np.ndarray,
                 alternative: str) -> np.ndarray:
    ref = np.sort(reference[~np.isnan(reference)])
    ok = ~np.isnan(values)
    values, group = values[ok], group[ok]
    n2 = float(len(ref))
    n1 = np.bincount(group, minlength=n_groups).astype(np.float64)
    below = np.searchsorted(ref, values, side="left")
    tied = np.searchsorted(ref, values, side="right") - below
    u1 = np.bincount(group, weights=below + 0.5 * tied, minlength=n_groups)
    # tie term of each group's union with the reference: the reference's own ties, plus for
    # each distinct value of the group (t_g cells, t_r reference cells) what it adds
    t_ref = _ties(ref)
    order = np.lexsort((values, group))
    g_sorted, v_sorted = group[order], values[order]
    starts = np.flatnonzero(np.r_[True, (g_sorted[1:] != g_sorted[:-1]) | (v_sorted[1:] != v_sorted[:-1])])
    t_g = np.diff(np.r_[starts, len(order)]).astype(np.float64)
    t_r = tied[order][starts].astype(np.float64)
    added = (t_r + t_g) ** 3 - (t_r + t_g) - (t_r ** 3 - t_r)
    tie_term = np.sum(t_ref ** 3 - t_ref) + np.bincount(g_sorted[starts], weights=added, minlength=n_groups)
    n = n1 + n2
    with np.errstate(divide="ignore", invalid="ignore"):
        s = np.sqrt(n1 * n2 / 12 * ((n + 1) - tie_term / (n * (n - 1))))
        if alternative == "greater":
            z = (u1 - n1 * n2 / 2 - 0.5) / s
            p = ndtr(-z)
        else:
            z = (np.maximum(u1, n1 * n2 - u1) - n1 * n2 / 2 - 0.5) / s
            p = np.clip(2 * ndtr(-z), 0.0, 1.0)
    # a group whose values and the reference's are all one value has no ranks to compare
    # (scipy's formula gives 0/0 there); nor has an empty side
    all_tied = np.zeros(n_groups, dtype=bool)
    if n2 and ref[0] == ref[-1]:
        all_tied = np.bincount(group, weights=tied == n2, minlength=n_groups) == n1
    p[(n1 == 0) | (n2 == 0) | all_tied] = np.nan
    return p


def mannwhitney_groups(values: np.ndarray, group: np.ndarray, n_groups: int, reference: np.ndarray,
                       alternative: str = "two-sided") -> np.ndarray:
    """Mann-Whitney U p-values of each group of cells against the reference cells, per program.

    Parameters
    ----------
    values
        Cells x programs (the cells to test); NaN marks a cell left out of that program.
    group
        Each cell's group, 0 .. n_groups-1.
    n_groups
        Number of groups.
    reference
        Reference cells x programs (the control cells); NaN as for ``values``.
    alternative
        ``"two-sided"`` or ``"greater"`` (the group's values tend to be larger).

    Returns
    -------
    numpy.ndarray
        n_groups x programs p-values: those of ``scipy.stats.mannwhitneyu(group_cells,
        reference, alternative=alternative, method="asymptotic")`` over the non-NaN cells;
        NaN where a side is empty or every value of both sides is the same.
    """
    if alternative not in ("two-sided", "greater"):
        raise ValueError(f"alternative must be 'two-sided' or 'greater', got {alternative!r}")
    values, reference = np.asarray(values, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    group = np.asarray(group, dtype=np.int64)
    p = np.full((n_groups, values.shape[1]), np.nan)
    for j in range(values.shape[1]):
        p[:, j] = _one_program(values[:, j], group, n_groups, reference[:, j], alternative)
    return p
