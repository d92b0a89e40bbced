"""Sample-level tests: replicate units (samples, or one sample's cells in one perturbation
group) compared across conditions.

Each unit is summarised by its mean share per program; the tests compare
``y = log2(mean share + PSEUDO)`` between case and control units, one program at a time:

- effect: the difference of the mean ``y`` of case and control units (``log2_fold_change``),
  with its 95% confidence interval;
- without covariates, Welch's t (``scipy.stats.ttest_ind(equal_var=False)`` and its
  ``confidence_interval``);
- with sample-level covariates, ordinary least squares ``y ~ 1 + case + covariates``
  (``statsmodels`` OLS): the effect, interval and p-value of the ``case`` coefficient;
- a permutation p-value over the units' condition labels (:func:`permutation_pvalues`),
  exact when there are few enough relabellings, else seeded Monte Carlo; with covariates,
  Freedman and Lane's scheme (the reduced model's residuals are permuted), so the
  covariates' own effects stay in place.
"""
from __future__ import annotations

import itertools
import math
import warnings
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy.stats import t as t_distribution
from scipy.stats import ttest_ind

from .moderation import FPrior, fit_f_prior

CONFIDENCE = 0.95
# Below this many units in a condition, the t-test's normal approximation cannot be checked
# from the data: a permutation p-value is reported beside it (report.permutations=0).
FEW_SAMPLES = 6
AUTO_PERMUTATIONS = 9999  # relabellings drawn then; the p-value's resolution is 1e-4
_BLOCK_VALUES = 4_000_000  # relabellings x units (x programs) held at once
_KEYS = ("effect", "ci_low", "ci_high", "p_value", "permutation_p_value")


@dataclass(frozen=True)
class SampleOptions:
    """How the sample-level tests run (the ``report.*`` settings).

    Attributes
    ----------
    covariates
        One row per sample (index: the sample labels), the covariates' raw values; numbers
        enter the model as they are, anything else as indicator columns. None: Welch's t.
    permutations
        Relabellings drawn for every permutation p-value; 0: a permutation p-value only
        when a side has fewer than :data:`FEW_SAMPLES` units, from
        :data:`AUTO_PERMUTATIONS` relabellings.
    min_cells
        Units with fewer cells are left out.
    seed
        Seeds the Monte-Carlo relabellings and the negative-control sets.
    moderate
        Many-group tests (``group_usage``): moderate each group's variance across groups
        (:mod:`deltanmf.tl.screentests`); False: one pooled variance.
    negative_controls
        Many-group tests: random sets of control units tested as targets, a check of the
        tests' calibration on the data (0: none).
    pairs
        A paired design: each sample's pair (index: the sample labels; a donor measured in
        both conditions). The pair is a blocking factor of the model and relabellings stay
        within pairs; None: unpaired.
    """

    covariates: pd.DataFrame | None = None
    permutations: int = 0
    min_cells: int = 10
    seed: int = 0
    moderate: bool = True
    negative_controls: int = 200
    pairs: pd.Series | None = None


def covariate_matrix(frame: pd.DataFrame) -> np.ndarray:
    """Numeric design columns of covariate values (units x columns): numbers as they are,
    other columns as indicators of every level but the first; constant columns dropped."""
    if frame is None or frame.shape[1] == 0:
        return np.zeros((0 if frame is None else len(frame), 0))
    parts = []
    for name in frame.columns:
        column = frame[name]
        if pd.api.types.is_numeric_dtype(column) and not pd.api.types.is_bool_dtype(column):
            parts.append(column.to_numpy(dtype=np.float64)[:, None])
        else:
            levels = pd.Categorical(column.astype(str))
            parts.append(np.eye(len(levels.categories))[levels.codes][:, 1:])
    z = np.hstack(parts)
    return z[:, np.ptp(z, axis=0) > 0] if len(z) else z


def condition_in_covariates(is_case: np.ndarray, z: np.ndarray) -> bool:
    """Whether the condition is a linear combination of the intercept and the covariates
    (its effect then cannot be told apart from theirs)."""
    base = np.column_stack([np.ones(len(is_case)), z])
    return np.linalg.matrix_rank(np.column_stack([base, is_case])) == np.linalg.matrix_rank(base)


class Relabellings:
    """Seeded relabellings of units, shared by the comparisons of one table.

    Groups of one table compared with the same control units reuse the same relabellings
    (as a screen's genes share their permutations): drawn once per number of units.
    ``seed``: anything :func:`numpy.random.default_rng` takes.
    """

    def __init__(self, n_resamples: int, seed):
        self.n_resamples = n_resamples
        self.rng = np.random.default_rng(seed)
        self._subsets: dict[tuple[int, int], tuple[np.ndarray, bool]] = {}
        self._permutations: dict[int, tuple[np.ndarray, bool]] = {}

    def subsets(self, n: int, m: int) -> tuple[np.ndarray, bool]:
        """``(subsets, exact)``: relabellings x m positions among n units, the units given
        one label; all C(n, m) of them when there are at most ``n_resamples``, else that
        many drawn at random."""
        if (n, m) not in self._subsets:
            if math.comb(n, m) <= self.n_resamples:
                chosen = np.array(list(itertools.combinations(range(n), m)), dtype=np.int64).reshape(-1, m)
                self._subsets[n, m] = (chosen, True)
            else:
                step = max(1, _BLOCK_VALUES // n)  # a random m-subset: the m smallest of n random keys
                draws = [np.argpartition(self.rng.random((min(step, self.n_resamples - start), n)), m - 1, axis=1)[:, :m]
                         for start in range(0, self.n_resamples, step)]
                self._subsets[n, m] = (np.vstack(draws), False)
        return self._subsets[n, m]

    def permutations(self, n: int, blocks: np.ndarray | None = None) -> tuple[np.ndarray, bool]:
        """``(permutations, exact)``: relabellings x n; all n! when there are at most
        ``n_resamples``, else that many drawn at random. With ``blocks`` (a label per unit),
        units are only exchanged within their block (a pair's samples): all such orders
        when there are few enough (2^pairs sign flips for one sample per pair and condition),
        else drawn within each block."""
        if blocks is not None:
            return self._within(np.asarray(blocks))
        if n not in self._permutations:
            if math.factorial(n) <= self.n_resamples:
                self._permutations[n] = (np.array(list(itertools.permutations(range(n))), dtype=np.int64), True)
            else:
                self._permutations[n] = (self.rng.permuted(np.tile(np.arange(n), (self.n_resamples, 1)), axis=1),
                                         False)
        return self._permutations[n]

    def _within(self, blocks: np.ndarray) -> tuple[np.ndarray, bool]:
        key = ("blocks", tuple(pd.factorize(blocks)[0]))
        if key not in self._permutations:
            members = [np.flatnonzero(blocks == b) for b in pd.unique(blocks)]
            count = math.prod(math.factorial(len(m)) for m in members)
            if count <= self.n_resamples:
                orders = np.tile(np.arange(len(blocks)), (count, 1))
                options = [list(itertools.permutations(m)) for m in members]
                for row, choice in enumerate(itertools.product(*options)):
                    for m, order in zip(members, choice):
                        orders[row, m] = order
                self._permutations[key] = (orders, True)
            else:
                orders = np.tile(np.arange(len(blocks)), (self.n_resamples, 1))
                for m in members:
                    orders[:, m] = self.rng.permuted(np.tile(m, (self.n_resamples, 1)), axis=1)
                self._permutations[key] = (orders, False)
        return self._permutations[key]


def permutation_pvalues(y: np.ndarray, is_case: np.ndarray, z: np.ndarray, alternative: str,
                        relabel: Relabellings, blocks: np.ndarray | None = None) -> np.ndarray:
    """Permutation p-values of the case effect on each column of ``y`` (units x programs).

    Without covariates the statistic is the difference of the case and control means, and
    only the split of the units matters: the splits are enumerated or drawn. With
    covariates ``z`` it is the ``t`` statistic of the ``case`` coefficient of
    ``y ~ 1 + case + z`` under Freedman and Lane's null, which permutes the residuals ``r``
    of the reduced model ``y ~ 1 + z`` (studentised, as Anderson & Robinson 2001 and
    Winkler et al. 2014 recommend: the raw coefficient's null is not pivotal when the
    covariates are unbalanced). By the Frisch-Waugh-Lovell theorem the coefficient of
    ``fitted + r*`` is ``x @ r* / |x|^2``, ``x`` being the condition's residual on
    ``[1, z]``, and its residual sum of squares ``|r*|^2 - |Q^T r*|^2 - (x @ r*)^2 / |x|^2``
    (``Q`` an orthonormal basis of ``[1, z]``); ``r* = r[perm^-1]`` turns both into
    products of rearranged ``x`` and ``Q`` with ``r``. With ``blocks`` (pairs, whose
    indicators are among ``z``) residuals are exchanged only within a block. p-values follow ``scipy.stats.permutation_test``: an exact enumeration counts
    the observed labelling among the relabellings; Monte Carlo adds one to the count and
    to the number of relabellings; two-sided p is twice the smaller tail, at most 1;
    values within a relative ``100 * eps`` of the observed one count as ties.
    """
    import statsmodels.api as sm

    base = np.column_stack([np.ones(len(y)), z])
    x_res = sm.OLS(is_case.astype(np.float64), base).fit().resid
    residual = sm.OLS(y, base).fit().resid.reshape(y.shape)
    norm2, total = x_res @ x_res, (residual ** 2).sum(axis=0)
    basis = np.linalg.qr(base)[0]

    def t_values(x: np.ndarray, q: np.ndarray) -> np.ndarray:
        """Up to a constant factor, the case coefficient's t statistic for the rearranged
        ``x`` (relabellings x units) and ``q`` (relabellings x units x basis)."""
        effect = x @ residual
        projected = np.einsum("bnq,nj->bqj", q, residual)
        rss = total - (projected ** 2).sum(axis=1) - effect ** 2 / norm2
        # a near-perfect fit leaves rss at rounding level (or below 0): floored relative to the
        # residuals' total, the t stays finite, so the observed labelling is counted as itself
        return effect / np.sqrt(np.maximum(rss, total * 1e-12 + np.finfo(np.float64).tiny))

    observed = t_values(x_res[None], basis[None])[0] if z.shape[1] else None
    less, greater = np.zeros(y.shape[1]), np.zeros(y.shape[1])

    def count(null: np.ndarray) -> None:
        less[:] += (null <= observed + gamma).sum(axis=0)
        greater[:] += (null >= observed - gamma).sum(axis=0)

    if z.shape[1] == 0:
        # the mean difference is c @ r with c = x / |x|^2, which takes two values (1/n_case and
        # -1/n_control); label the smaller side: null = a * sum(r[chosen]) + b * sum(r[others])
        c = x_res / norm2
        side = is_case if is_case.sum() <= (~is_case).sum() else ~is_case
        a, b = c[side][0], c[~side][0]
        observed = (a - b) * residual[side].sum(axis=0)  # as the null's values are computed
        gamma = np.abs(observed) * np.finfo(np.float64).eps * 100
        chosen, exact = relabel.subsets(len(y), int(side.sum()))
        block = max(1, _BLOCK_VALUES // max(chosen.shape[1] * y.shape[1], 1))
        for start in range(0, len(chosen), block):
            count((a - b) * residual[chosen[start:start + block]].sum(axis=1))
    else:
        gamma = np.abs(observed) * np.finfo(np.float64).eps * 100
        orders, exact = relabel.permutations(len(y), blocks)
        block = max(1, _BLOCK_VALUES // (len(y) * basis.shape[1] * y.shape[1]))
        for start in range(0, len(orders), block):
            order = orders[start:start + block]
            count(t_values(x_res[order], basis[order]))
    n = len(chosen) if z.shape[1] == 0 else len(orders)
    adjust = 0 if exact else 1
    less, greater = (less + adjust) / (n + adjust), (greater + adjust) / (n + adjust)
    if alternative == "greater":
        return np.clip(greater, 0.0, 1.0)
    return np.clip(2 * np.minimum(less, greater), 0.0, 1.0)


def _welch(case: np.ndarray, control: np.ndarray, alternative: str) -> dict:
    both = ttest_ind(case, control, axis=0, equal_var=False)
    low, high = both.confidence_interval(CONFIDENCE)
    p = both.pvalue if alternative == "two-sided" else \
        ttest_ind(case, control, axis=0, equal_var=False, alternative=alternative).pvalue
    return {"effect": case.mean(axis=0) - control.mean(axis=0), "ci_low": low, "ci_high": high, "p_value": p}


def _ols(y: np.ndarray, is_case: np.ndarray, z: np.ndarray, alternative: str) -> dict:
    import statsmodels.api as sm

    design = np.column_stack([np.ones(len(y)), is_case.astype(np.float64), z])
    out = {key: np.full(y.shape[1], np.nan) for key in ("effect", "ci_low", "ci_high", "p_value")}
    for j in range(y.shape[1]):
        fit = sm.OLS(y[:, j], design).fit()
        out["effect"][j] = fit.params[1]
        out["ci_low"][j], out["ci_high"][j] = fit.conf_int(1 - CONFIDENCE)[1]
        out["p_value"][j] = fit.pvalues[1] if alternative == "two-sided" else \
            t_distribution.sf(fit.tvalues[1], fit.df_resid)
    return out


def _compare_clean(case, control, case_z, control_z, alternative, relabel, blocks=None) -> dict:
    out = {key: np.full(case.shape[1], np.nan) for key in _KEYS}
    if len(case) == 0 or len(control) == 0:
        return out
    y = np.vstack([case, control])
    is_case = np.r_[np.ones(len(case), bool), np.zeros(len(control), bool)]
    z = np.vstack([case_z, control_z])
    z = z[:, np.ptp(z, axis=0) > 0]
    out["effect"] = case.mean(axis=0) - control.mean(axis=0)
    if z.shape[1] and condition_in_covariates(is_case, z):
        return out  # these units cannot tell the condition from the covariates: no test
    out.update(_ols(y, is_case, z, alternative) if z.shape[1] else _welch(case, control, alternative))
    if relabel is not None:
        out["permutation_p_value"] = permutation_pvalues(y, is_case, z, alternative, relabel, blocks)
    return out


def _column_parts(y: np.ndarray, is_case: np.ndarray, z: np.ndarray) -> dict:
    """Per program, over its units with a value: the pieces of its test before moderation.
    Without covariates the two groups' means and variances (Welch); with covariates the OLS
    ``case`` coefficient, its unscaled variance ``c`` and the residual variance and df."""
    m = y.shape[1]
    parts = {key: np.full(m, np.nan) for key in ("effect", "mean", "n_case", "n_control", "var_case",
                                                 "var_control", "c", "s2", "df")}
    for j in range(m):
        ok = np.isfinite(y[:, j])
        yj, xj, zj = y[ok, j], is_case[ok], z[ok]
        zj = zj[:, np.ptp(zj, axis=0) > 0] if len(zj) else zj
        parts["mean"][j] = yj.mean() if len(yj) else np.nan
        n1, n0 = int(xj.sum()), int((~xj).sum())
        parts["n_case"][j], parts["n_control"][j] = n1, n0
        if n1 == 0 or n0 == 0:
            continue
        if z.shape[1] == 0:
            parts["effect"][j] = yj[xj].mean() - yj[~xj].mean()
            parts["var_case"][j] = yj[xj].var(ddof=1) if n1 > 1 else np.nan
            parts["var_control"][j] = yj[~xj].var(ddof=1) if n0 > 1 else np.nan
            parts["df"][j] = n1 + n0 - 2
            continue
        if zj.shape[1] and condition_in_covariates(xj, zj):
            continue
        design = np.column_stack([np.ones(len(yj)), xj.astype(np.float64), zj])
        inverse = np.linalg.pinv(design.T @ design)
        beta = inverse @ design.T @ yj
        free = len(yj) - np.linalg.matrix_rank(design)
        residual = yj - design @ beta
        parts["effect"][j], parts["c"][j], parts["df"][j] = beta[1], inverse[1, 1], free
        parts["s2"][j] = residual @ residual / free if free > 0 else np.nan
    return parts


def _moderated(y: np.ndarray, is_case: np.ndarray, z: np.ndarray, alternative: str) -> dict:
    """Moderated tests of every program: variances squeezed across programs toward a prior
    with a trend in the program's mean ``y`` (:mod:`deltanmf.tl.moderation`). Without
    covariates each condition's variance is moderated on its own and the two are combined as
    Welch's t does (a moderated, equal-variance t would be wrong when one condition varies
    more and the design is unbalanced); with covariates the OLS residual variance."""
    parts = _column_parts(y, is_case, z)
    out = {"effect": parts["effect"], "df_residual": parts["df"]}
    if z.shape[1] == 0:
        priors = {side: fit_f_prior(parts[f"var_{side}"], parts[f"n_{side}"] - 1, trend=parts["mean"])
                  for side in ("case", "control")}
        post = {side: priors[side].squeeze(parts[f"var_{side}"], np.maximum(parts[f"n_{side}"] - 1, 0))
                for side in ("case", "control")}
        a, b = post["case"][0] / parts["n_case"], post["control"][0] / parts["n_control"]
        with np.errstate(divide="ignore", invalid="ignore"):
            dof = (a + b) ** 2 / (a ** 2 / post["case"][1] + b ** 2 / post["control"][1])
        se = np.sqrt(a + b)
        out["prior"] = {side: _prior_record(priors[side]) for side in ("case", "control")}
    else:
        prior = fit_f_prior(parts["s2"], parts["df"], trend=parts["mean"])
        variance, dof = prior.squeeze(parts["s2"], np.nan_to_num(parts["df"]))
        se = np.sqrt(variance * parts["c"])
        out["prior"] = {"residual": _prior_record(prior)}
    with np.errstate(divide="ignore", invalid="ignore"):
        t = out["effect"] / se
        out["p_value"] = t_distribution.sf(t, dof) if alternative == "greater" else 2 * t_distribution.sf(np.abs(t), dof)
        half = t_distribution.ppf(0.5 + CONFIDENCE / 2, dof) * se
    out["ci_low"], out["ci_high"] = out["effect"] - half, out["effect"] + half
    return out


def _prior_record(prior: FPrior) -> dict:
    """A prior for metrics.json: ``d0`` (0: no prior, too few programs) and ``s0^2`` (per
    program with a trend)."""
    scale = np.atleast_1d(np.asarray(prior.scale, dtype=np.float64))
    return {"d0": float(prior.df),
            "s0_squared": [None if not np.isfinite(v) else float(v) for v in scale]}


def block_columns(blocks) -> np.ndarray:
    """Indicator columns of the blocks (pairs) for the linear model, every level but the first."""
    return covariate_matrix(pd.DataFrame({"pair": np.asarray(blocks).astype(str)}))


def compare_units(case: np.ndarray, control: np.ndarray, *, case_z: np.ndarray | None = None,
                  control_z: np.ndarray | None = None, alternative: str = "two-sided",
                  relabel: Relabellings | None = None, moderate: bool = False, case_blocks=None,
                  control_blocks=None) -> dict[str, np.ndarray]:
    """Case vs control units, per program: the sample-level test of one comparison.

    Parameters
    ----------
    case, control
        Units x programs, ``log2(mean share + PSEUDO)``; NaN marks a unit without a share
        for that program (left out of that program's test).
    case_z, control_z
        The units' covariate columns (:func:`covariate_matrix`); None or no columns: Welch's t.
    alternative
        ``"two-sided"`` or ``"greater"`` (case above control).
    relabel
        The table's relabellings; None: no permutation p-value.
    moderate
        Moderate the variances across programs (:func:`_moderated`).
    case_blocks, control_blocks
        Each unit's pair (a paired design): the pair enters the linear model as a blocking
        factor, and relabellings exchange units only within a pair.

    Returns
    -------
    dict
        Arrays over programs: ``effect`` (difference of mean ``y``, or the OLS ``case``
        coefficient), ``ci_low``, ``ci_high`` (95%, two-sided), ``p_value`` (Welch's t or
        OLS, moderated or not), ``permutation_p_value`` (NaN without ``relabel``) and
        ``df_residual`` (the test's residual degrees of freedom before moderation); with
        ``moderate``, ``prior`` (the fitted prior). NaN where a side has too few units.
    """
    case, control = np.asarray(case, dtype=np.float64), np.asarray(control, dtype=np.float64)
    case_z = np.zeros((len(case), 0)) if case_z is None else np.asarray(case_z, dtype=np.float64)
    control_z = np.zeros((len(control), 0)) if control_z is None else np.asarray(control_z, dtype=np.float64)
    blocks = None
    if case_blocks is not None:
        blocks = np.r_[np.asarray(case_blocks).astype(str), np.asarray(control_blocks).astype(str)]
        pairs = block_columns(blocks)
        case_z, control_z = np.hstack([case_z, pairs[:len(case)]]), np.hstack([control_z, pairs[len(case):]])
    out = {key: np.full(case.shape[1], np.nan) for key in _KEYS}
    missing = np.isnan(case).any(axis=0) | np.isnan(control).any(axis=0)
    # the tests warn about too few units or constant values; their NaN results say so in the table
    with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore"):
        warnings.simplefilter("ignore")
        clean = np.flatnonzero(~missing)
        if len(clean):
            found = _compare_clean(case[:, clean], control[:, clean], case_z, control_z, alternative, relabel,
                                   blocks)
            for key in _KEYS:
                out[key][clean] = found[key]
        for j in np.flatnonzero(missing):
            ok_case, ok_control = ~np.isnan(case[:, j]), ~np.isnan(control[:, j])
            found = _compare_clean(case[ok_case, j:j + 1], control[ok_control, j:j + 1], case_z[ok_case],
                                   control_z[ok_control], alternative, relabel,
                                   None if blocks is None else blocks[np.r_[ok_case, ok_control]])
            for key in _KEYS:
                out[key][j] = found[key][0]
        z = np.vstack([case_z, control_z])
        z = z[:, np.ptp(z, axis=0) > 0] if len(z) else z
        is_case = np.r_[np.ones(len(case), bool), np.zeros(len(control), bool)]
        if moderate:
            found = _moderated(np.vstack([case, control]), is_case, z, alternative)
            for key in ("ci_low", "ci_high", "p_value", "df_residual", "prior"):
                out[key] = found[key]
            # too few programs to fit a prior (a table of one case program): the plain test, named so
            out["moderated"] = any((prior["d0"] or 0) > 0 for prior in found["prior"].values())
        else:
            out["df_residual"] = _column_parts(np.vstack([case, control]), is_case, z)["df"]
    return out


@dataclass
class UnitShares:
    """Replicate units of one side of a comparison and their mean shares.

    Attributes
    ----------
    names
        Each kept unit's label (a sample, or ``(group, sample)``).
    index
        Each cell's unit position in ``names``; -1 for a cell in a unit left out.
    n_cells
        Cells per kept unit.
    dropped
        Label -> cells of every unit left out for having fewer than ``min_cells`` cells.
    """

    names: list
    index: np.ndarray
    n_cells: np.ndarray
    dropped: dict = field(default_factory=dict)


def units_of(labels: np.ndarray, min_cells: int) -> UnitShares:
    """The units of ``labels`` (one per cell) with at least ``min_cells`` cells."""
    codes, names = pd.factorize(pd.Series(labels, dtype=object), sort=True)
    sizes = np.bincount(codes, minlength=len(names))
    keep = sizes >= min_cells
    new = np.full(len(names), -1)
    new[keep] = np.arange(int(keep.sum()))
    return UnitShares(names=list(names[keep]), index=new[codes] if len(codes) else codes, n_cells=sizes[keep],
                      dropped={names[i]: int(sizes[i]) for i in np.flatnonzero(~keep)})


def smallest_permutation_p(alternative: str, case_blocks=None, control_blocks=None, n_case: int = 0,
                           n_control: int = 0) -> float:
    """The smallest p-value an exact permutation test of this design can give: one over the
    number of distinct labellings (C(n, n_case), or within pairs the product of each pair's
    C(n_pair, n_case_pair)), doubled when two-sided (at most 1)."""
    if case_blocks is not None:
        labels = pd.Series(np.r_[np.ones(len(case_blocks)), np.zeros(len(control_blocks))])
        pairs = np.r_[np.asarray(case_blocks).astype(str), np.asarray(control_blocks).astype(str)]
        labellings = math.prod(math.comb(len(g), int(g.sum())) for _, g in labels.groupby(pairs))
    else:
        labellings = math.comb(n_case + n_control, n_case)
    p = 1.0 / max(labellings, 1)
    return min(1.0, 2 * p if alternative == "two-sided" else p)


def resamples(options: SampleOptions, n_case: int, n_control: int) -> int:
    """Relabellings for a comparison of these unit counts (0: no permutation p-value)."""
    if options.permutations > 0:
        return options.permutations
    return AUTO_PERMUTATIONS if min(n_case, n_control) < FEW_SAMPLES else 0
