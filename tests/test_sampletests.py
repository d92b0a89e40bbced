"""Sample-level tests of ``deltanmf.tl``: each statistic against an independent reference.

References are written here: per-sample means with pandas ``groupby``, Welch's t with
``scipy.stats.ttest_ind`` called per column, OLS by ``numpy.linalg.lstsq`` and the t
distribution, permutation p-values with ``scipy.stats.permutation_test`` or by enumerating
every relabelling by hand, Mann-Whitney U with ``scipy.stats.mannwhitneyu`` per group.
"""
from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from deltanmf.tl.casecontrol import case_program_table, group_usage_table, usage_shift_table
from deltanmf.tl.celltests import mannwhitney_groups
from deltanmf.tl.sampletests import (AUTO_PERMUTATIONS, Relabellings, SampleOptions, compare_units, covariate_matrix,
                                     permutation_pvalues)

K, C = 4, 1
NAMES = [f"base{i}" for i in range(K)] + ["case0"]


def donor_usage(rng, n_samples, cells, alpha, sigma=0.4, prefix="s"):
    """Usage (cells x K + C) of ``n_samples`` samples with a donor effect on every program,
    and each cell's sample label; ``cells`` is the number of cells per sample (or a list)."""
    cells = [cells] * n_samples if np.isscalar(cells) else cells
    blocks, labels = [], []
    for s, n in enumerate(cells):
        a = alpha * np.exp(rng.normal(0, sigma, len(alpha)))
        u = rng.dirichlet(a, size=n) * rng.lognormal(0, 0.3, (n, 1))
        blocks.append(np.hstack([u, rng.gamma(0.3, 0.05, (n, C))]))
        labels += [f"{prefix}{s}"] * n
    return np.vstack(blocks), np.array(labels, dtype=object)


def ref_sample_log_shares(usage, labels, columns, kind):
    """Per-sample mean share (baseline or total), log2(+1e-3), samples sorted by label."""
    u = np.asarray(usage, dtype=float)
    part = u[:, :K] if kind == "baseline" else u
    share = part / part.sum(axis=1, keepdims=True)
    frame = pd.DataFrame(share[:, columns]).groupby(np.asarray(labels)).mean().sort_index()
    return np.log2(frame.to_numpy() + 1e-3), frame


@pytest.fixture(scope="module")
def design():
    rng = np.random.default_rng(0)
    alpha_case = np.array([1.0, 3.0, 1.0, 0.3])  # base1 up, base3 down
    ctrl, ctrl_s = donor_usage(rng, 7, [40, 55, 60, 35, 50, 45, 5], np.ones(K), prefix="c")  # c6: 5 cells
    case, case_s = donor_usage(rng, 8, 50, alpha_case, prefix="x")
    return ctrl, ctrl_s, case, case_s


@pytest.mark.smoke
def test_usage_shift_at_the_sample_level_matches_welch_per_column(design):
    ctrl, ctrl_s, case, case_s = design
    table = usage_shift_table(ctrl, case, NAMES, K, control_samples=ctrl_s, case_samples=case_s,
                              options=SampleOptions(moderate=False))
    keep = ctrl_s != "c6"  # 5 cells < min_cells=10: left out
    y_ctrl, f_ctrl = ref_sample_log_shares(ctrl[keep], ctrl_s[keep], slice(0, K), "baseline")
    y_case, f_case = ref_sample_log_shares(case, case_s, slice(0, K), "baseline")
    np.testing.assert_allclose(table["control_share"], f_ctrl.mean().to_numpy(), rtol=1e-12)
    np.testing.assert_allclose(table["case_share"], f_case.mean().to_numpy(), rtol=1e-12)
    for j in range(K):
        ref = stats.ttest_ind(y_case[:, j], y_ctrl[:, j], equal_var=False)
        ci = ref.confidence_interval(0.95)
        assert table.loc[j, "p_value"] == pytest.approx(ref.pvalue, rel=1e-10)
        assert table.loc[j, "log2_fold_change"] == pytest.approx(y_case[:, j].mean() - y_ctrl[:, j].mean(), rel=1e-12)
        assert (table.loc[j, "ci_low"], table.loc[j, "ci_high"]) == pytest.approx((ci.low, ci.high), rel=1e-10)
    assert (table["test_unit"] == "sample").all() and (table["test"] == "welch_t").all()
    assert list(table.columns) == list(usage_shift_table(ctrl, case, NAMES, K).columns)  # one layout for both units
    assert (table["n_control_samples"] == 6).all() and (table["n_case_samples"] == 8).all()
    assert table["permutation_p_value"].isna().all()  # 6 and 8 samples: no permutation by default
    assert list(table["shift"]) == ["none", "up", "none", "down"]
    # the interval holds the effect; a called shift's interval excludes 0
    assert (table["ci_low"] < table["log2_fold_change"]).all() and (table["log2_fold_change"] < table["ci_high"]).all()
    assert table.loc[1, "ci_low"] > 0 and table.loc[3, "ci_high"] < 0


def test_min_cells_per_sample_leaves_small_samples_out(design):
    ctrl, ctrl_s, case, case_s = design
    for min_cells, n_ctrl in ((1, 7), (10, 6), (41, 4), (56, 1)):
        table = usage_shift_table(ctrl, case, NAMES, K, control_samples=ctrl_s, case_samples=case_s,
                                  options=SampleOptions(min_cells=min_cells))
        assert (table["n_control_samples"] == n_ctrl).all(), min_cells
    assert table["p_value"].isna().all()  # one control sample: no test


def test_few_samples_add_an_exact_permutation_p_value(design):
    ctrl, ctrl_s, case, case_s = design
    few = np.isin(case_s, ["x0", "x1", "x2", "x3"])
    table = usage_shift_table(ctrl, case[few], NAMES, K, control_samples=ctrl_s, case_samples=case_s[few],
                              options=SampleOptions(moderate=False))
    keep = ctrl_s != "c6"
    y_ctrl, _ = ref_sample_log_shares(ctrl[keep], ctrl_s[keep], slice(0, K), "baseline")
    y_case, _ = ref_sample_log_shares(case[few], case_s[few], slice(0, K), "baseline")
    ref = stats.permutation_test((y_case, y_ctrl), lambda a, b, axis: a.mean(axis) - b.mean(axis), axis=0,
                                 vectorized=True, n_resamples=np.inf).pvalue  # C(10, 4) = 210: exact
    np.testing.assert_allclose(table["permutation_p_value"], ref, rtol=1e-12)
    assert table["permutation_p_value"].min() >= 2 / 210 - 1e-12  # an exact test's smallest two-sided p
    # the calls rest on Welch's t; the permutation p-value is reported beside it
    assert (table["test"] == "welch_t").all()


@pytest.mark.smoke
def test_permutation_pvalues_match_scipy_exact_and_are_seeded():
    rng = np.random.default_rng(1)
    case, control = rng.normal(size=(3, 5)) + [0, 1, 2, -2, 0], rng.normal(size=(6, 5))
    y, is_case = np.vstack([case, control]), np.r_[np.ones(3, bool), np.zeros(6, bool)]
    none = np.zeros((9, 0))
    for alternative in ("two-sided", "greater"):
        ref = stats.permutation_test((case, control), lambda a, b, axis: a.mean(axis) - b.mean(axis), axis=0,
                                     vectorized=True, n_resamples=np.inf, alternative=alternative).pvalue
        mine = permutation_pvalues(y, is_case, none, alternative, Relabellings(AUTO_PERMUTATIONS, 0))
        np.testing.assert_allclose(mine, ref, rtol=1e-12)
    # the controls as the labelled side (the smaller side is enumerated): same p-values
    swapped = permutation_pvalues(np.vstack([control, case]), np.r_[np.ones(6, bool), np.zeros(3, bool)], none,
                                  "two-sided", Relabellings(AUTO_PERMUTATIONS, 0))
    ref = stats.permutation_test((control, case), lambda a, b, axis: a.mean(axis) - b.mean(axis), axis=0,
                                 vectorized=True, n_resamples=np.inf).pvalue
    np.testing.assert_allclose(swapped, ref, rtol=1e-12)
    # Monte Carlo (fewer relabellings than the 84 splits): seeded, and (b + 1) / (R + 1)
    first = permutation_pvalues(y, is_case, none, "two-sided", Relabellings(50, 7))
    again = permutation_pvalues(y, is_case, none, "two-sided", Relabellings(50, 7))
    np.testing.assert_array_equal(first, again)
    counts = np.minimum(first * 51 / 2, 51)  # two-sided = 2 * (b + 1) / 51
    np.testing.assert_allclose(counts, np.round(counts), atol=1e-9)
    assert not np.array_equal(first, permutation_pvalues(y, is_case, none, "two-sided", Relabellings(50, 8)))


def test_freedman_lane_matches_every_permutation_by_hand():
    """With a covariate: the t statistic of the OLS case coefficient (statsmodels) of
    y* = fitted + permuted residuals of y ~ 1 + z, over all 7! permutations, against the
    p-values of permutation_pvalues."""
    import statsmodels.api as sm

    rng = np.random.default_rng(2)
    n = 7
    z = rng.normal(size=(n, 1))
    is_case = np.array([1, 1, 1, 0, 0, 0, 0], bool)
    y = rng.normal(size=(n, 3)) + is_case[:, None] * [0.0, 1.0, 2.5] + 2 * z
    reduced = np.column_stack([np.ones(n), z])
    fitted = reduced @ np.linalg.lstsq(reduced, y, rcond=None)[0]
    resid = y - fitted
    full = np.column_stack([np.ones(n), is_case, z])
    coef = lambda yy: np.array([sm.OLS(yy[:, j], full).fit().tvalues[1] for j in range(yy.shape[1])])  # noqa: E731
    observed = coef(y)
    null = np.array([coef(fitted + resid[list(p)]) for p in itertools.permutations(range(n))])
    tol = 1e-9 * np.abs(observed)
    ref = np.minimum(2 * np.minimum((null <= observed + tol).mean(0), (null >= observed - tol).mean(0)), 1)
    mine = permutation_pvalues(y, is_case, z, "two-sided", Relabellings(AUTO_PERMUTATIONS, 0))
    np.testing.assert_allclose(mine, ref, rtol=1e-12)
    # the raw coefficient, which the studentised statistic replaces, ranks the relabellings otherwise
    raw = lambda yy: np.linalg.lstsq(full, yy, rcond=None)[0][1]  # noqa: E731
    null_raw = np.array([raw(fitted + resid[list(p)]) for p in itertools.permutations(range(n))])
    assert not np.array_equal(np.argsort(null_raw[:, 0]), np.argsort(null[:, 0]))


def test_ols_with_covariates_matches_least_squares_by_hand():
    rng = np.random.default_rng(3)
    n_case, n_ctrl = 6, 7
    frame = pd.DataFrame({"batch": list("abcabc") + list("abcabca"), "age": rng.normal(50, 10, 13)},
                         index=[f"s{i}" for i in range(13)])
    z = covariate_matrix(frame)
    assert z.shape == (13, 3)  # age, and batch b and c against a
    y = rng.normal(size=(13, 2)) + z[:, [1]] * 1.5
    found = compare_units(y[:n_case], y[n_case:], case_z=z[:n_case], control_z=z[n_case:])
    design = np.column_stack([np.ones(13), np.r_[np.ones(n_case), np.zeros(n_ctrl)], z])
    beta, *_ = np.linalg.lstsq(design, y, rcond=None)
    resid = y - design @ beta
    df = 13 - design.shape[1]
    se = np.sqrt((resid ** 2).sum(0) / df * np.linalg.inv(design.T @ design)[1, 1])
    t = beta[1] / se
    np.testing.assert_allclose(found["effect"], beta[1], rtol=1e-10)
    np.testing.assert_allclose(found["p_value"], 2 * stats.t.sf(np.abs(t), df), rtol=1e-8)
    half = stats.t.ppf(0.975, df) * se
    np.testing.assert_allclose(found["ci_low"], beta[1] - half, rtol=1e-8)
    np.testing.assert_allclose(found["ci_high"], beta[1] + half, rtol=1e-8)
    greater = compare_units(y[:n_case], y[n_case:], case_z=z[:n_case], control_z=z[n_case:], alternative="greater")
    np.testing.assert_allclose(greater["p_value"], stats.t.sf(t, df), rtol=1e-8)


def test_covariates_flow_through_the_table_and_name_the_test(design):
    ctrl, ctrl_s, case, case_s = design
    samples = sorted(set(ctrl_s) | set(case_s))
    covariates = pd.DataFrame({"sex": ["F", "M"] * (len(samples) // 2) + ["F"] * (len(samples) % 2)},
                              index=samples)
    table = usage_shift_table(ctrl, case, NAMES, K, control_samples=ctrl_s, case_samples=case_s,
                              options=SampleOptions(covariates=covariates, moderate=False))
    assert (table["test"] == "ols").all() and (table["test_unit"] == "sample").all()
    assert list(table["shift"]) == ["none", "up", "none", "down"]


def test_case_programs_at_the_sample_level_are_one_sided(design):
    ctrl, ctrl_s, case, case_s = design
    case = case.copy()
    case[:, K] *= 30  # case0 much more used in every case sample
    programs = np.random.default_rng(4).gamma(1, 1, (20, K + C))
    table = case_program_table(ctrl, case, NAMES, K, programs, programs, np.arange(20), control_samples=ctrl_s,
                               case_samples=case_s, options=SampleOptions(moderate=False))
    keep = ctrl_s != "c6"
    y_ctrl, _ = ref_sample_log_shares(ctrl[keep], ctrl_s[keep], [K], "total")
    y_case, _ = ref_sample_log_shares(case, case_s, [K], "total")
    ref = stats.ttest_ind(y_case[:, 0], y_ctrl[:, 0], equal_var=False, alternative="greater")
    assert table.loc[0, "p_value"] == pytest.approx(ref.pvalue, rel=1e-10)
    both = stats.ttest_ind(y_case[:, 0], y_ctrl[:, 0], equal_var=False).confidence_interval(0.95)
    assert (table.loc[0, "ci_low"], table.loc[0, "ci_high"]) == pytest.approx((both.low, both.high), rel=1e-10)
    assert table.loc[0, "emergent"] and table.loc[0, "test_unit"] == "sample"
    flipped = case_program_table(case, ctrl, NAMES, K, programs, programs, np.arange(20), control_samples=case_s,
                                 case_samples=ctrl_s)
    assert flipped.loc[0, "p_value"] > 0.99 and not flipped.loc[0, "emergent"]


def test_group_usage_at_the_sample_level_is_one_weighted_model_over_all_units(design):
    """Without moderation, each group's test is the statsmodels WLS coefficient of its
    indicator in one model over every unit (controls the reference), weights 1 / (tau^2 +
    sigma^2 / n_cells) as the record reports them."""
    import statsmodels.api as sm

    ctrl, ctrl_s, case, case_s = design
    rng = np.random.default_rng(5)
    # two target genes, each with its own guides (x0-x3: A, x4-x7: B); B's guides also hold a few cells of A
    groups = np.where(np.isin(case_s, ["x0", "x1", "x2", "x3"]), "A", "B").astype(object)
    groups[np.flatnonzero(groups == "B")[rng.choice(200, 30, replace=False)]] = "A"
    usage = np.vstack([ctrl, case])
    is_control = np.r_[np.ones(len(ctrl), bool), np.zeros(len(case), bool)]
    labels = np.r_[ctrl_s, case_s]
    record = {}
    table = group_usage_table(usage, np.r_[np.full(len(ctrl), "NTC", object), groups], is_control, NAMES, K,
                              samples=labels, options=SampleOptions(moderate=False, negative_controls=0),
                              record=record)
    keep = ctrl_s != "c6"
    y_ctrl, _ = ref_sample_log_shares(ctrl[keep], ctrl_s[keep], slice(0, K), "baseline")
    n_ctrl = pd.Series(ctrl_s[keep]).value_counts().sort_index().to_numpy()
    blocks, sizes, member = [y_ctrl], [n_ctrl], [np.full(len(y_ctrl), -1)]
    for i, g in enumerate(("A", "B")):
        cells = groups == g
        units = pd.Series(case_s[cells]).value_counts()
        kept = units[units >= 10].index
        in_unit = cells & np.isin(case_s, kept)
        y_g, _ = ref_sample_log_shares(case[in_unit], case_s[in_unit], slice(0, K), "baseline")
        n_g = pd.Series(case_s[in_unit]).value_counts().sort_index().to_numpy()
        blocks.append(y_g), sizes.append(n_g), member.append(np.full(len(y_g), i))
        rows = table[(table["group"] == g) & (table["program_kind"] == "baseline")]
        assert (rows["n_case_samples"] == len(kept)).all() and (rows["n_control_samples"] == 6).all()
        assert (rows["n_cells"] == cells.sum()).all()
        assert rows["permutation_p_value"].isna().all()  # the group tests report none
    y, n, member = np.vstack(blocks), np.concatenate(sizes), np.concatenate(member)
    design_matrix = np.column_stack([np.ones(len(y)), member == 0, member == 1]).astype(float)
    for j, name in enumerate(NAMES[:K]):
        fit = record["programs"][name]
        wls = sm.WLS(y[:, j], design_matrix, weights=1 / (fit["tau2"] + fit["sigma2"] / n)).fit()
        rows = table[table["program"] == name].set_index("group")
        for i, g in enumerate(("A", "B")):
            assert rows.loc[g, "log2_fold_change"] == pytest.approx(wls.params[i + 1], rel=1e-9)
            assert rows.loc[g, "p_value"] == pytest.approx(wls.pvalues[i + 1], rel=1e-7)
            assert rows.loc[g, "ci_low"] == pytest.approx(wls.conf_int()[i + 1, 0], rel=1e-9)
    assert set(table["test_unit"]) == {"sample"} and set(table["test"]) == {"pooled_t"}
    np.testing.assert_allclose(table["q_value"], stats.false_discovery_control(table["p_value"]), rtol=1e-12)


def test_mannwhitney_groups_matches_scipy_with_ties_nan_and_constant_columns():
    rng = np.random.default_rng(6)
    n, groups = 400, 6
    values = np.round(rng.gamma(0.5, 1, (n, 4)), 1)
    values[rng.random((n, 4)) < 0.3] = 0.0  # NNLS gives many exact zeros: heavy ties
    values[rng.random((n, 4)) < 0.05] = np.nan
    group = rng.integers(0, groups - 1, n)  # the last group is empty
    reference = np.round(rng.gamma(0.5, 1, (300, 4)), 1)
    reference[:, 3] = 0.0
    values[:, 3] = 0.0
    values[group == 1, 3] = 0.2  # group 1 differs where everything else is 0
    for alternative in ("two-sided", "greater"):
        p = mannwhitney_groups(values, group, groups, reference, alternative)
        for g in range(groups):
            for j in range(4):
                a = values[group == g, j]
                a = a[~np.isnan(a)]
                if len(a) == 0 or np.ptp(np.r_[a, reference[:, j]]) == 0:
                    assert np.isnan(p[g, j])
                else:
                    ref = stats.mannwhitneyu(a, reference[:, j], alternative=alternative, method="asymptotic").pvalue
                    assert p[g, j] == pytest.approx(ref, rel=1e-10), (alternative, g, j)
