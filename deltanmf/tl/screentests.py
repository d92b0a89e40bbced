"""Many-group sample-level tests: a pooled screen's targets against its control units.

A *unit* is one sample's cells in one group (one guide's cells of one target gene); the
control units are the control samples (the non-targeting guides). Per program, one linear
model over all units (:func:`group_contrasts`):

- ``y = log2(mean share + PSEUDO)`` of each unit; each group its own mean, the control units
  the reference, sample-level covariates in the same model;
- precision weights ``w = 1 / (tau^2 + sigma^2 / n_cells)``: ``tau^2`` is the between-unit
  (guide-to-guide) variance, estimated by moments from the within-group residuals;
  ``sigma^2`` the between-cell variance of ``y`` per cell (the delta method on the control
  units' cell-to-cell variance of the share). Weights proportional to cell counts would
  trust the control units' means far beyond the guide-to-guide variance they carry;
- each group's residual variance (its own units' weighted residuals) is moderated toward a
  prior fitted over all groups (:func:`fit_f_prior`: limma's ``squeezeVar``, Smyth 2004,
  with groups in the place of genes) and tested on ``d0 + d_g`` degrees of freedom; the
  control mean's own variance is added to the contrast's (Satterthwaite's degrees of
  freedom for the sum). Without moderation one residual variance pooled over all units
  serves every contrast.

A group with one unit gets the prior's variance (a p-value), but the tables do not call it.

:func:`negative_control_pvalues` is the built-in check of these tests on the data at hand
(as SCEPTRE does, Barry et al. 2021): random sets of control units, thinned to a typical
target unit's cell count, tested against the remaining controls in the same model.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.stats import t as t_distribution

from .moderation import NO_PRIOR, FPrior, fit_f_prior

CONFIDENCE = 0.95
LN2 = np.log(2.0)


def cell_variance(means: np.ndarray, variances: np.ndarray, n_cells: np.ndarray, pseudo: float) -> np.ndarray:
    """Per program, the between-cell variance of ``log2(mean share + pseudo)`` per cell: the
    delta method on each unit's cell-to-cell variance of the share, pooled over units by cell
    count (units x programs in, programs out; NaN entries left out)."""
    per_cell = variances / ((means + pseudo) * LN2) ** 2
    weight = np.where(np.isfinite(per_cell), n_cells[:, None], 0.0)
    return np.nansum(per_cell * weight, axis=0) / np.maximum(weight.sum(axis=0), 1.0)


@dataclass
class GroupFit:
    """One program's model over the units: what the negative-control check reuses."""

    tau2: float
    prior: FPrior


def _contrast_one(y, n_cells, sigma2, group, n_groups, z, moderate, tau2, prior, greater) -> tuple[dict, GroupFit]:
    """:func:`group_contrasts` for one program over units with a defined ``y``."""
    codes = group + 1  # 0: the control units
    slots = n_groups + 1
    count = np.bincount(codes, minlength=slots).astype(np.float64)
    v = sigma2 / n_cells
    p = z.shape[1]
    if tau2 is None:  # moments of the unweighted within-group residuals
        mean = np.bincount(codes, y, minlength=slots) / np.maximum(count, 1)
        r = y - mean[codes]
        if p:
            zc = z - (np.stack([np.bincount(codes, z[:, k], minlength=slots) for k in range(p)], 1)
                      / np.maximum(count, 1)[:, None])[codes]
            r = r - zc @ np.linalg.lstsq(zc, r, rcond=None)[0]
        free = float((count[count > 0] - 1).sum()) - p
        expected = float(((1 - 1 / count[codes]) * v).sum())
        tau2 = max(0.0, (float(r @ r) - expected) / free) if free > 0 else 0.0
    w = 1.0 / (tau2 + v)
    weight = np.bincount(codes, w, minlength=slots)
    with np.errstate(invalid="ignore", divide="ignore"):
        ybar = np.bincount(codes, w * y, minlength=slots) / weight
        resid, mu, extra = y - ybar[codes], ybar, np.zeros(n_groups)
        if p:
            zbar = np.stack([np.bincount(codes, w * z[:, k], minlength=slots) for k in range(p)], 1) / weight[:, None]
            zt = z - zbar[codes]
            a_inv = np.linalg.pinv(zt.T @ (w[:, None] * zt))
            beta = a_inv @ (zt.T @ (w * resid))
            resid, mu = resid - zt @ beta, ybar - zbar @ beta
            delta = zbar[1:] - zbar[0]
            extra = np.einsum("gi,ij,gj->g", delta, a_inv, delta)
        rss = np.bincount(codes, w * resid ** 2, minlength=slots)
        df = np.maximum(count - 1, 0)
        pooled_df = float(df.sum()) - p
        pooled = float(rss.sum()) / pooled_df if pooled_df > 0 else np.nan
        effect = mu[1:] - mu[0]
        if moderate:
            own = rss[1:] / np.where(df[1:] > 0, df[1:], np.nan)
            if prior is None:
                prior = fit_f_prior(own, df[1:])
            post, post_df = prior.squeeze(own, df[1:])
            a, b = post / weight[1:], rss[0] / df[0] / weight[0] if df[0] > 0 else np.nan
            var = a + b + pooled * extra
            dof = (a + b) ** 2 / (a ** 2 / post_df + b ** 2 / df[0])
        else:
            prior = prior or NO_PRIOR
            var = pooled * (1 / weight[1:] + 1 / weight[0] + extra)
            dof = np.full(n_groups, pooled_df)
        se = np.sqrt(var)
        t = effect / se
        p_value = t_distribution.sf(t, dof) if greater else 2 * t_distribution.sf(np.abs(t), dof)
        half = t_distribution.ppf(0.5 + CONFIDENCE / 2, dof) * se
    found = {"effect": effect, "se": se, "df": dof, "p_value": p_value, "ci_low": effect - half,
             "ci_high": effect + half}
    empty = count[1:] == 0
    for key in found:
        found[key] = np.where(empty, np.nan, found[key])
    return found, GroupFit(tau2, prior)


def group_contrasts(y: np.ndarray, n_cells: np.ndarray, sigma2: np.ndarray, group: np.ndarray, n_groups: int,
                    z: np.ndarray | None = None, moderate: bool = True, fits: list[GroupFit] | None = None,
                    greater: np.ndarray | None = None) -> tuple[dict[str, np.ndarray], list[GroupFit]]:
    """Each group's mean against the control units', per program, in one weighted model.

    Parameters
    ----------
    y
        Units x programs, ``log2(mean share + PSEUDO)``; NaN leaves a unit out of a program.
    n_cells
        Cells per unit.
    sigma2
        Per program, the per-cell variance of ``y`` (:func:`cell_variance`).
    group
        Each unit's group, ``0 .. n_groups - 1``, or -1 for a control unit.
    n_groups
        Number of groups.
    z
        Units x covariate columns (:func:`~deltanmf.tl.sampletests.covariate_matrix`), or None.
    moderate
        Moderate each group's residual variance toward the prior fitted over the groups;
        False: one variance pooled over all units.
    fits
        Per program, ``tau^2`` and the prior to use instead of estimating them (the
        negative-control check reuses the screen's).
    greater
        Per program, True for a one-sided test (group above control); default two-sided.

    Returns
    -------
    (dict, list of GroupFit)
        Arrays over groups x programs: ``effect`` (group minus control mean of ``y``),
        ``se``, ``df``, ``p_value`` (t, as ``greater`` says), ``ci_low``, ``ci_high`` (95%,
        two-sided); NaN where
        a group has no unit. And each program's ``tau^2`` and prior.
    """
    y = np.asarray(y, dtype=np.float64)
    n_cells, group = np.asarray(n_cells, dtype=np.float64), np.asarray(group, dtype=np.int64)
    z = np.zeros((len(y), 0)) if z is None else np.asarray(z, dtype=np.float64)
    keys = ("effect", "se", "df", "p_value", "ci_low", "ci_high")
    out = {key: np.full((n_groups, y.shape[1]), np.nan) for key in keys}
    used = []
    for j in range(y.shape[1]):
        ok = np.isfinite(y[:, j])
        if (group[ok] == -1).sum() < 2:  # no reference to test against
            used.append(GroupFit(np.nan, NO_PRIOR))
            continue
        zj = z[ok]
        zj = zj[:, np.ptp(zj, axis=0) > 0] if len(zj) else zj
        given = fits[j] if fits is not None else None
        found, fit = _contrast_one(y[ok, j], n_cells[ok], float(sigma2[j]), group[ok], n_groups, zj, moderate,
                                   None if given is None else given.tau2, None if given is None else given.prior,
                                   greater is not None and bool(greater[j]))
        for key in keys:
            out[key][:, j] = found[key]
        used.append(fit)
    return out, used


def simes(p: np.ndarray) -> np.ndarray:
    """Per row, Simes' combined p-value of the row's finite p-values (NaN for a row without
    any): ``min_i k p_(i) / i``, valid under independence and positive dependence."""
    p = np.asarray(p, dtype=np.float64)
    ordered = np.sort(np.where(np.isfinite(p), p, np.inf), axis=1)
    k = np.isfinite(ordered).sum(axis=1, keepdims=True)
    rank = np.arange(1, p.shape[1] + 1)[None, :]
    with np.errstate(invalid="ignore"):
        combined = np.where(np.isfinite(ordered), k * ordered / rank, np.inf).min(axis=1)
    return np.where(k[:, 0] > 0, np.minimum(combined, 1.0), np.nan)


def negative_control_pvalues(shares: np.ndarray, unit: np.ndarray, n_units: int, fits: list[GroupFit],
                             sigma2: np.ndarray, n_sets: int, set_size: int, cells_per_unit: int, seed,
                             z: np.ndarray | None = None, moderate: bool = True, pseudo: float = 1e-3,
                             greater: np.ndarray | None = None) -> np.ndarray:
    """p-values of random sets of control units posing as targets (sets x programs).

    Each set draws ``set_size`` control units; each drawn unit keeps ``cells_per_unit`` of
    its cells at random (all of them when it has fewer), so the set is as noisy as a
    typical target's units; the set is tested against the remaining control units in the
    screen's model (its ``tau^2`` and prior, ``fits``; ``sigma2`` as in the screen).

    ``shares`` are the control cells' shares (cells x programs), ``unit`` each cell's control
    unit (``0 .. n_units - 1``, -1: left out), ``z`` the control units' covariate columns.
    """
    rng = np.random.default_rng(seed)
    rows = np.flatnonzero(unit >= 0)
    order = rows[np.argsort(unit[rows], kind="stable")]
    bounds = np.r_[0, np.cumsum(np.bincount(unit[rows], minlength=n_units))]
    members = [order[bounds[u]:bounds[u + 1]] for u in range(n_units)]
    full = np.vstack([np.nanmean(shares[m], axis=0) for m in members])
    sizes = np.array([len(m) for m in members], dtype=np.float64)
    z = np.zeros((n_units, 0)) if z is None else np.asarray(z, dtype=np.float64)
    out = np.full((n_sets, shares.shape[1]), np.nan)
    for s in range(n_sets):
        chosen = rng.choice(n_units, size=set_size, replace=False)
        rest = np.setdiff1d(np.arange(n_units), chosen)
        thinned = [rng.choice(members[u], size=min(cells_per_unit, len(members[u])), replace=False) for u in chosen]
        means = np.vstack([np.nanmean(shares[c], axis=0) for c in thinned])
        y = np.log2(np.vstack([full[rest], means]) + pseudo)
        n = np.r_[sizes[rest], [len(c) for c in thinned]]
        group = np.r_[np.full(len(rest), -1), np.zeros(set_size, dtype=np.int64)]
        found, _ = group_contrasts(y, n, sigma2, group, 1, np.vstack([z[rest], z[chosen]]), moderate, fits, greater)
        out[s] = found["p_value"][0]
    return out


def _unit_moments(shares: np.ndarray, index: np.ndarray, n_units: int) -> tuple[np.ndarray, np.ndarray]:
    """Each unit's mean share and cell-to-cell variance of the share (units x programs)."""
    from .shares import unit_means

    mean = unit_means(shares, index, n_units)
    square = unit_means(shares ** 2, index, n_units)
    return mean, np.maximum(square - mean ** 2, 0.0)


def screen_tests(shares: np.ndarray, codes: np.ndarray, n_groups: int, is_control: np.ndarray, samples,
                 options, names: list[str], kinds: np.ndarray) -> tuple[dict, dict]:
    """The sample-level group tests of ``group_usage``: units, the weighted model, the
    target-level combination and the negative-control check.

    ``shares``: all cells x programs (baseline share for baseline programs, total share for
    case programs); ``codes``: each case cell's group; ``samples``: each cell's sample;
    ``options``: a :class:`~deltanmf.tl.sampletests.SampleOptions`.

    Returns the arrays of the table (groups x programs: ``share``, ``control_share``,
    ``effect``, ``ci_low``, ``ci_high``, ``p_value``; per group ``n_units``;
    ``n_control_units``) and a record for ``metrics.json`` (the test, each program's
    ``tau2``, ``sigma2`` and prior, and ``negative_controls``).
    """
    import warnings

    from .sampletests import block_columns, covariate_matrix, units_of
    from .shares import PSEUDO, column_means, log2_share

    samples = np.asarray(samples).astype(str)
    control, case = shares[is_control], shares[~is_control]
    control_units = units_of(samples[is_control], options.min_cells)
    pairs = pd.MultiIndex.from_arrays([codes, samples[~is_control]]).to_numpy()
    units = units_of(pairs, options.min_cells)
    with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        c_mean, c_var = _unit_moments(control, control_units.index, len(control_units.names))
        g_mean, _ = _unit_moments(case, units.index, len(units.names))
        sigma2 = cell_variance(c_mean, c_var, control_units.n_cells.astype(np.float64), PSEUDO)
        unit_group = np.array([g for g, _ in units.names], dtype=np.int64)
        y = log2_share(np.vstack([c_mean, g_mean]))
        n_cells = np.r_[control_units.n_cells, units.n_cells]
        group = np.r_[np.full(len(control_units.names), -1), unit_group]
        z = None
        labels = list(control_units.names) + [s for _, s in units.names]
        if options.covariates is not None:
            z = covariate_matrix(options.covariates.loc[labels])
        if options.pairs is not None:  # a paired design: the pair a blocking factor here too
            pairs = block_columns(options.pairs.loc[labels].to_numpy())
            z = pairs if z is None else np.hstack([z, pairs])
        found, fits = group_contrasts(y, n_cells, sigma2, group, n_groups, z, options.moderate,
                                      greater=kinds == "case")
        share = np.vstack([column_means(g_mean[unit_group == g]) if (unit_group == g).any()
                           else np.full(shares.shape[1], np.nan) for g in range(n_groups)]) \
            if n_groups else np.zeros((0, shares.shape[1]))
    n_units = np.bincount(unit_group, minlength=n_groups)
    out = {"share": share, "control_share": np.tile(column_means(c_mean), (n_groups, 1)), "effect": found["effect"],
           "ci_low": found["ci_low"], "ci_high": found["ci_high"], "p_value": found["p_value"],
           "n_units": n_units, "n_control_units": len(control_units.names)}
    record = {
        "test": "moderated_t" if options.moderate else "pooled_t",
        "programs": {name: {"tau2": fit.tau2, "sigma2": float(s), "prior_df": fit.prior.df,
                            "prior_scale": fit.prior.scale} for name, fit, s in zip(names, fits, sigma2)},
    }
    record["left_out"] = units.dropped  # (group code, sample) -> cells, for the log
    record["negative_controls"], record["negative_control_p"] = _negative_controls(
        control, control_units, n_units, units.n_cells, fits, sigma2, options, z, kinds)
    return out, record


def _negative_controls(control, control_units, n_units, unit_cells, fits, sigma2, options, z, kinds):
    """The negative-control check's summary and p-values (sets x programs), or a reason it
    did not run."""
    n_sets = options.negative_controls
    if n_sets == 0:
        return {"ran": False, "reason": "report.negative_controls=0"}, None
    set_size = int(np.median(n_units[n_units > 0])) if (n_units > 0).any() else 0
    available = len(control_units.names)
    if set_size < 1 or available < set_size + 2:
        return {"ran": False, "reason": f"{available} control units cannot give a set of {set_size} and leave "
                                        "2 as the reference"}, None
    cells = int(np.median(unit_cells))
    z_control = None if z is None else z[:available]
    p = negative_control_pvalues(control, control_units.index, available, fits, sigma2, n_sets, set_size, cells,
                                 np.random.SeedSequence([options.seed, 29]), z_control, options.moderate,
                                 greater=kinds == "case")
    summary = {"ran": True, "sets": n_sets, "units_per_set": set_size, "cells_per_unit": cells,
               "n_p_values": int(np.isfinite(p).sum())}
    for label, values in (("all", p), ("baseline", p[:, kinds == "baseline"]), ("case", p[:, kinds == "case"])):
        finite = values[np.isfinite(values)]
        summary[f"fraction_below_{label}" if label != "all" else "fraction_below"] = {
            str(level): float((finite < level).mean()) if len(finite) else None for level in (0.05, 0.01, 0.001)}
    finite = p[np.isfinite(p)]
    # the standard error of the fraction below 0.01: binomial over all p-values, or, when
    # larger, over the sets (a set's programs share its draw and are not independent)
    per_set = np.nanmean(np.where(np.isfinite(p), p < 0.01, np.nan), axis=1)
    per_set = per_set[np.isfinite(per_set)]
    clustered = per_set.std(ddof=1) / np.sqrt(len(per_set)) if len(per_set) > 1 else 0.0
    limit = 0.01 + 3 * max(np.sqrt(0.01 * 0.99 / max(len(finite), 1)), clustered)
    summary["limit_below_0.01"] = float(limit)
    summary["miscalibrated"] = bool(len(finite) and (finite < 0.01).mean() > limit)
    return summary, p
