"""Many-group (screen) tests: the moderation prior, Simes, the weighted model with covariates,
calibration over thousands of simulated targets, and the negative-control check."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import special, stats

from deltanmf.tl.casecontrol import group_usage_table
from deltanmf.tl.sampletests import SampleOptions
from deltanmf.tl.moderation import FPrior, fit_f_prior, trigamma_inverse
from deltanmf.tl.screentests import GroupFit, group_contrasts, negative_control_pvalues, simes


def test_trigamma_inverse_inverts_trigamma():
    for y in (0.01, 0.3, 1.0, 7.5, 120.0, 5e4):
        assert trigamma_inverse(float(special.polygamma(1, y))) == pytest.approx(y, rel=1e-6)


@pytest.mark.parametrize("d0, s0, dfs", [(4.0, 0.5, [1, 2, 3, 5]), (20.0, 2.0, [10, 20, 40])])
def test_f_prior_recovers_the_planted_prior(d0, s0, dfs):
    """Variances drawn as s0^2 * F(d, d0) (a scaled inverse-chi^2 truth with chi^2 sampling)
    give back d0 and s0^2 within sampling error (20,000 groups of unequal df; a large d0 is
    only told from infinity by groups with enough df of their own)."""
    rng = np.random.default_rng(0)
    df = rng.choice(dfs, 20000).astype(float)
    truth = s0 * d0 / rng.chisquare(d0, len(df))
    s2 = truth * rng.chisquare(df) / df
    prior = fit_f_prior(s2, df)
    assert prior.df == pytest.approx(d0, rel=0.15)
    assert prior.scale == pytest.approx(s0, rel=0.05)


def test_f_prior_without_extra_spread_is_large_and_squeezes_to_the_scale():
    rng = np.random.default_rng(1)
    df = np.full(20000, 3.0)
    prior = fit_f_prior(0.7 * rng.chisquare(3, len(df)) / 3, df)
    assert prior.df > 50 and prior.scale == pytest.approx(0.7, rel=0.03)  # the upper limit of d0: large
    post, post_df = FPrior(np.inf, 0.7).squeeze(np.array([0.1, 5.0]), np.array([3.0, 3.0]))
    np.testing.assert_allclose(post, 0.7)
    np.testing.assert_equal(post_df, np.inf)
    post, post_df = FPrior(6.0, 1.0).squeeze(np.array([4.0, np.nan]), np.array([2.0, 0.0]))
    np.testing.assert_allclose(post, [(6 + 8) / 8, 1.0])
    np.testing.assert_allclose(post_df, [8.0, 6.0])
    assert fit_f_prior(np.array([1.0]), np.array([2.0])).df == 0  # one variance: no prior


def test_simes_by_hand():
    p = np.array([[0.01, 0.04, 0.03, np.nan], [0.5, 0.2, 0.9, 0.6], [np.nan] * 4])
    # row 0: sorted 0.01, 0.03, 0.04 with k=3: min(0.03, 0.045, 0.04); row 1: min(0.8, 0.8, 0.8, 0.9)
    np.testing.assert_allclose(simes(p), [0.03, 0.8, np.nan])


def test_weighted_model_with_covariates_matches_statsmodels_wls():
    """Pooled (unmoderated) contrasts with a covariate are the WLS coefficients of the groups'
    indicators in one model over every unit, with the covariate in the same model."""
    import statsmodels.api as sm

    rng = np.random.default_rng(2)
    group = np.r_[np.full(12, -1), np.repeat(np.arange(5), 3)]
    n = rng.integers(20, 200, len(group)).astype(float)
    batch = rng.integers(0, 3, len(group))
    z = np.eye(3)[batch][:, 1:]
    y = rng.normal(0, 0.3, (len(group), 2)) + z @ np.array([[0.5, -0.2], [0.1, 0.3]]) + 0.4 * (group == 2)[:, None]
    found, fits = group_contrasts(y, n, np.array([2.0, 5.0]), group, 5, z, moderate=False)
    design = np.column_stack([np.ones(len(group)), (group[:, None] == np.arange(5)).astype(float), z])
    for j in range(2):
        wls = sm.WLS(y[:, j], design, weights=1 / (fits[j].tau2 + [2.0, 5.0][j] / n)).fit()
        np.testing.assert_allclose(found["effect"][:, j], wls.params[1:6], rtol=1e-9)
        np.testing.assert_allclose(found["se"][:, j], wls.bse[1:6], rtol=1e-9)
        np.testing.assert_allclose(found["p_value"][:, j], wls.pvalues[1:6], rtol=1e-7)


def simulate_screen(seed: int, n_targets: int = 2000, guides: int = 4, cells_per_guide: float = 34,
                    n_control_guides: int = 40, control_cells: float = 750, k: int = 12, k_case: int = 2,
                    guide_sd: float = 0.1, shifts: dict | None = None, case_targets: dict | None = None,
                    case_fraction: float = 0.5):
    """Unit shares of a pooled screen without a fit: Dirichlet usage per cell around each
    guide's own concentrations (every guide, control ones too, has its own small effect),
    unequal cells per guide, shifted targets moving concentration from one program to
    another, case-program targets whose cells partly use a case program, and NNLS-like
    leakage into the case programs everywhere."""
    rng = np.random.default_rng(seed)
    alpha = 0.3 * rng.uniform(0.5, 2.0, k)
    shifts, case_targets = shifts or {}, case_targets or {}
    blocks, groups, samples = [], [], []

    def guide(label: str, target: str, mean_cells: float, shift=None, case=None) -> None:
        n = max(5, int(rng.lognormal(np.log(mean_cells), 0.4)))
        a = alpha * np.exp(rng.normal(0, guide_sd, k))
        if shift is not None:
            source, dest, factor = shift
            moved = a[source] * (1 - 1 / factor)
            a[source] -= moved
            a[dest] += moved
        u = np.hstack([rng.dirichlet(a, n), np.zeros((n, k_case))])
        if case is not None:
            users = rng.random(n) < case_fraction
            share = rng.uniform(0.3, 0.7, users.sum())
            u[users] *= (1 - share)[:, None]
            u[users, k + case] = share
        u[:, k:] += rng.exponential(0.003, (n, k_case)) * (rng.random((n, k_case)) < 0.3)
        blocks.append(u), groups.extend([target] * n), samples.extend([label] * n)

    for g in range(n_control_guides):
        guide(f"NT{g}", "non-targeting", control_cells)
    for t in range(n_targets):
        for i in range(guides):
            guide(f"T{t}_{i}", f"T{t}", cells_per_guide, shifts.get(t), case_targets.get(t))
    groups = np.array(groups, dtype=object)
    names = [f"program_{i + 1}" for i in range(k)] + [f"case_{i + 1}" for i in range(k_case)]
    return np.vstack(blocks), groups, np.array(samples, dtype=object), groups == "non-targeting", names


@pytest.fixture(scope="module")
def null_screen():
    return simulate_screen(0)


def test_screen_tests_are_calibrated_in_the_tail_over_thousands_of_null_targets(null_screen):
    """2,000 null targets x 4 guides against 40 control guides (the issue's design, 300k
    cells): p-values of baseline and case rows near nominal at 0.05 and 0.01, and at most
    twice nominal below 1e-3 (24,000 baseline rows: 24 expected), with and without
    moderation (case rows one-sided); the Welch test that this replaces was 24x nominal below
    1e-4."""
    usage, groups, samples, is_control, names = null_screen
    for moderate in (True, False):
        table = group_usage_table(usage, groups, is_control, names, 12, samples=samples,
                                  options=SampleOptions(moderate=moderate, negative_controls=0))
        for kind in ("baseline", "case"):
            p = table.loc[table["program_kind"] == kind, "p_value"].to_numpy()
            assert np.isfinite(p).all()
            # case rows are one-sided (above control); near the share floor their upper tail is light
            assert (0.04 if kind == "baseline" else 0.02) < (p < 0.05).mean() < 0.065, (moderate, kind)
            assert (p < 0.01).mean() < 0.016, (moderate, kind)
        p = table.loc[table["program_kind"] == "baseline", "p_value"].to_numpy()
        assert (p < 1e-3).mean() <= 2e-3, moderate
        assert not table["called"].any() or table.loc[table["called"], "group"].nunique() <= 3
        assert (table["group_q_value"] >= 0.05).mean() > 0.99


def test_screen_tests_find_planted_shifts_and_case_programs():
    """40 targets moving usage 2.5-fold from one program to another and 20 targets using a
    case program among 400: every shift found on a program it moves, with its sign, and
    every case-program target; few null targets called (200 targets to stay quick)."""
    rng = np.random.default_rng(3)
    shifts = {t: (*rng.choice(12, 2, replace=False), 2.5) for t in range(40)}
    case_targets = {t: (t - 40) % 2 for t in range(40, 60)}
    usage, groups, samples, is_control, names = simulate_screen(4, n_targets=400, shifts=shifts,
                                                                case_targets=case_targets)
    table = group_usage_table(usage, groups, is_control, names, 12, samples=samples,
                              options=SampleOptions(negative_controls=0))
    called = table[table["called"]]
    found = 0
    for t, (source, dest, _) in shifts.items():
        rows = called[called["group"] == f"T{t}"]
        down = rows[(rows["program"] == names[source]) & (rows["log2_fold_change"] < 0)]
        up = rows[(rows["program"] == names[dest]) & (rows["log2_fold_change"] > 0)]
        found += len(down) + len(up) > 0
    assert found >= 36
    for t, c in case_targets.items():
        assert ((called["group"] == f"T{t}") & (called["program"] == names[12 + c])).any()
    null = set(called["group"]) - {f"T{t}" for t in range(60)}
    assert len(null) <= 0.1 * called["group"].nunique()
    target_q = table.groupby("group")["group_q_value"].first()
    assert (target_q[[f"T{t}" for t in range(60)]] < 0.05).mean() >= 0.9


def test_a_target_with_one_guide_gets_a_p_value_but_no_call():
    shifts = {0: (0, 1, 4.0)}
    usage, groups, samples, is_control, names = simulate_screen(5, n_targets=100, guides=2, shifts=shifts)
    lonely = (groups == "T0") & (samples == "T0_1")
    usage, groups, samples, is_control = usage[~lonely], groups[~lonely], samples[~lonely], is_control[~lonely]
    table = group_usage_table(usage, groups, is_control, names, 12, samples=samples,
                              options=SampleOptions(negative_controls=0))
    rows = table[table["group"] == "T0"]
    assert (rows["n_case_samples"] == 1).all() and rows["p_value"].notna().all()
    assert rows["q_value"].min() < 0.05 and not rows["called"].any()


def test_negative_control_check_is_quiet_under_the_null_and_flags_a_model_that_trusts_units_too_much(null_screen):
    usage, groups, samples, is_control, names = null_screen
    record = {}
    table = group_usage_table(usage, groups, is_control, names, 12, samples=samples,
                              options=SampleOptions(negative_controls=200), record=record)
    check = record["negative_controls"]
    assert check["ran"] and check["sets"] == 200 and check["units_per_set"] == 4
    # thinned to a target unit's typical size, not the control guides' ~750 cells
    assert check["cells_per_unit"] == int(np.median(table.groupby("group")["n_cells"].first() / 4)) or \
        20 < check["cells_per_unit"] < 50
    assert record["negative_control_p"].shape == (200, len(names))
    assert check["fraction_below"]["0.05"] < 0.08 and not check["miscalibrated"]
    # the same sets tested with no guide-to-guide variance and a tiny prior: far too many small p-values
    shares = usage[is_control, :12] / usage[is_control, :12].sum(axis=1, keepdims=True)
    unit = pd.factorize(samples[is_control], sort=True)[0]
    wrong = [GroupFit(0.0, FPrior(np.inf, 0.05))] * 12
    p = negative_control_pvalues(shares, unit, unit.max() + 1, wrong, np.full(12, 0.5), 100, 4, 34, 0)
    assert (p < 0.01).mean() > 0.1


def test_group_usage_with_covariates_runs_the_same_model():
    """A guide-level covariate (the sequencing lane) with an effect on one program: with
    it in the model the null targets stay calibrated; the test name says moderated."""
    usage, groups, samples, is_control, names = simulate_screen(6, n_targets=300)
    lane = pd.Series(pd.factorize(samples)[0] % 3, index=samples).astype(str)
    bump = lane.to_numpy() == "1"
    usage = usage.copy()
    usage[bump, 0] *= 1.5
    covariates = pd.DataFrame({"lane": lane}).groupby(level=0).first()
    table = group_usage_table(usage, groups, is_control, names, 12, samples=samples,
                              options=SampleOptions(covariates=covariates, negative_controls=0))
    p = table["p_value"].to_numpy()
    assert set(table["test"]) == {"moderated_t"}
    assert 0.03 < (p < 0.05).mean() < 0.07


def test_stagewise_calls_by_hand():
    """Groups selected by BH over their Simes p-values; within them BH at level q * R / G."""
    from deltanmf.tl.casecontrol import bh_qvalues, stagewise_qvalues

    p = np.array([[0.001, 0.02, 0.5], [0.2, 0.3, 0.9], [0.004, 0.009, 0.011], [0.6, 0.7, 0.8]])
    group_q = bh_qvalues(simes(p))  # simes: 0.003, 0.45, 0.011, 0.8 -> BH over 4: 0.012, 0.6, 0.022, 0.8
    np.testing.assert_allclose(simes(p), [0.003, 0.45, 0.011, 0.8])
    np.testing.assert_allclose(group_q, [0.012, 0.6, 0.022, 0.8])
    out = stagewise_qvalues(p, group_q, 0.05)
    assert np.isnan(out[[1, 3]]).all()
    np.testing.assert_allclose(out[0], np.minimum(bh_qvalues(p[0]) * 2, 1))  # G / R = 4 / 2
    np.testing.assert_allclose(out[2], [0.022, 0.022, 0.022])
