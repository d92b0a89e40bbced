"""Tests for ``deltanmf.tl.casecontrol``: case-control statistics on usage matrices.

Every statistic is checked against an independent reference written here in plain numpy /
scipy (a hand-written Benjamini-Hochberg, ``scipy.stats.mannwhitneyu`` column by column,
numpy means and cosines), on planted data where the right answer is known: Dirichlet
baseline usage with one program's concentration raised in cases and another lowered, plus
case programs that take part of some case cells' usage.

Orientation: usage is cells x programs, baseline programs first, then case programs.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy.stats import mannwhitneyu

from deltanmf.tl.casecontrol import (
    PSEUDO,
    baseline_share,
    bh_qvalues,
    case_program_table,
    group_usage_table,
    novelty,
    total_share,
    usage_shift_table,
)

K = 5  # baseline programs
C = 2  # case programs
NAMES = [f"base{i}" for i in range(K)] + [f"case{j}" for j in range(C)]
UP, DOWN = 1, 3  # planted shifts among the baseline programs


# --------------------------------------------------------------------------------------
# references and planted data
# --------------------------------------------------------------------------------------
def ref_bh(p) -> np.ndarray:
    """Benjamini-Hochberg by hand: sorted p * n / rank, cumulative min from the top, cap 1.
    NaN stays NaN and does not count in n."""
    p = np.asarray(p, dtype=float)
    q = np.full(p.shape, np.nan)
    idx = [i for i in range(len(p)) if np.isfinite(p[i])]
    idx.sort(key=lambda i: p[i])
    n = len(idx)
    running = np.inf
    for rank in range(n, 0, -1):  # from the largest p down
        i = idx[rank - 1]
        running = min(running, p[i] * n / rank)
        q[i] = min(running, 1.0)
    return q


def ref_share(usage: np.ndarray, cols) -> np.ndarray:
    """Row-normalised columns ``cols`` of ``usage``, with 0 (not NaN) for all-zero rows."""
    part = np.asarray(usage, dtype=float)[:, cols]
    out = np.zeros_like(part)
    for i, row in enumerate(part):
        s = row.sum()
        if s > 0:
            out[i] = row / s
    return out


def ref_log2fc(case_mean, control_mean):
    return np.log2((np.asarray(case_mean) + 1e-3) / (np.asarray(control_mean) + 1e-3))


def ref_mwu(case: np.ndarray, control: np.ndarray, alternative: str) -> np.ndarray:
    """scipy's Mann-Whitney U column by column (default method; all samples here are > 8
    cells, so scipy picks the asymptotic test)."""
    return np.array([mannwhitneyu(case[:, j], control[:, j], alternative=alternative).pvalue
                     for j in range(case.shape[1])])


def dirichlet_usage(rng, alpha, n):
    """Unnormalised baseline usage: Dirichlet composition times a per-cell size factor."""
    comp = rng.dirichlet(alpha, size=n)
    return comp * rng.lognormal(1.0, 0.5, size=(n, 1))


def add_case_program(rng, baseline: np.ndarray, n_case: int, fraction: float, lo=0.2, hi=0.6, which=0):
    """Append C case-program columns; in ``fraction`` of the cells case program ``which``
    takes a share s ~ U(lo, hi) of the total usage: baseline usage scaled by (1 - s)."""
    n = len(baseline)
    base = baseline.copy()
    case = np.zeros((n, n_case))
    users = rng.random(n) < fraction
    s = rng.uniform(lo, hi, size=n) * users
    total = base.sum(axis=1)
    base *= (1 - s)[:, None]
    case[:, which] = s * total
    return np.hstack([base, case]), s


def planted(seed=0, n=400):
    """Controls: Dirichlet(2,...,2); cases: program UP raised, DOWN lowered (alpha sum kept, so
    the others keep a mean share of 0.2); half of the case cells use case program 0."""
    rng = np.random.default_rng(seed)
    alpha_ctrl = np.full(K, 2.0)
    alpha_case = alpha_ctrl.copy()
    alpha_case[UP], alpha_case[DOWN] = 3.5, 0.5
    ctrl = np.hstack([dirichlet_usage(rng, alpha_ctrl, n), np.zeros((n, C))])
    case, _ = add_case_program(rng, dirichlet_usage(rng, alpha_case, n), C, fraction=0.5)
    return ctrl, case


# --------------------------------------------------------------------------------------
# bh_qvalues
# --------------------------------------------------------------------------------------
def test_bh_matches_hand_written_reference_with_ties():
    rng = np.random.default_rng(1)
    p = rng.random(200) ** 3  # plenty of small p-values
    p[:40] = np.round(p[:40], 2)  # ties
    p[50:60] = p[50]  # a block of exact ties
    p[70] = 0.0
    p[71] = 1.0
    q = bh_qvalues(p)
    np.testing.assert_allclose(q, ref_bh(p), rtol=1e-12, atol=0)
    # tied p-values get tied q-values
    assert np.unique(q[50:60]).size == 1


def test_bh_properties_q_ge_p_monotone_capped():
    rng = np.random.default_rng(2)
    p = rng.random(500)
    q = bh_qvalues(p)
    assert np.all(q >= p - 1e-15)
    assert np.all(q <= 1.0)
    order = np.argsort(p)
    assert np.all(np.diff(q[order]) >= -1e-15)  # monotone non-decreasing in p


def test_bh_nan_stays_nan_and_is_not_counted():
    rng = np.random.default_rng(3)
    p = rng.random(30) * 0.1
    with_nan = np.insert(p, [0, 5, 5, 30], np.nan)
    q = bh_qvalues(with_nan)
    nan = np.isnan(with_nan)
    assert np.array_equal(np.isnan(q), nan)
    # n is the number of finite p-values: identical to BH on the p-values without the NaNs
    np.testing.assert_allclose(q[~nan], bh_qvalues(p), rtol=1e-12)
    np.testing.assert_allclose(q[~nan], ref_bh(p), rtol=1e-12)


def test_bh_small_cases():
    assert bh_qvalues(np.array([])).shape == (0,)
    assert np.isnan(bh_qvalues(np.array([np.nan, np.nan]))).all()
    np.testing.assert_allclose(bh_qvalues([0.01]), [0.01])
    # p=[0.01, 0.04, 0.03]: ranks 1,3,2 -> 0.03, 0.04, 0.045 -> cummin from top: 0.03, 0.04, 0.04
    np.testing.assert_allclose(bh_qvalues([0.01, 0.04, 0.03]), [0.03, 0.04, 0.04])
    np.testing.assert_allclose(bh_qvalues([0.9, 0.8]), [0.9, 0.9])
    np.testing.assert_allclose(bh_qvalues([0.6, 0.7, 0.8]), [0.8, 0.8, 0.8])
    np.testing.assert_allclose(bh_qvalues([0.5, 0.9, 0.95, 0.99]), [0.99] * 4)
    np.testing.assert_allclose(bh_qvalues([0.5, 0.9]), [0.9, 0.9])
    np.testing.assert_allclose(bh_qvalues([0.6, 0.6]), [0.6, 0.6])
    np.testing.assert_allclose(bh_qvalues([0.7, 0.2]), [0.7, 0.4])
    np.testing.assert_allclose(bh_qvalues([0.9, 0.5, 0.5]), [0.9, 0.75, 0.75])
    assert bh_qvalues([0.99, 0.6]).max() <= 1.0


# --------------------------------------------------------------------------------------
# shares and novelty
# --------------------------------------------------------------------------------------
def _usage_with_zero_rows(seed=4, n=60):
    rng = np.random.default_rng(seed)
    u = rng.gamma(0.5, 1.0, size=(n, K + C))
    u[rng.random(u.shape) < 0.3] = 0.0
    u[0] = 0.0  # all-zero cell
    u[1, :K] = 0.0  # only case usage
    u[2, K:] = 0.0  # only baseline usage
    return u


def test_shares_match_reference_and_rows_sum_to_one_or_zero():
    u = _usage_with_zero_rows()
    b, t = baseline_share(u, K), total_share(u)
    np.testing.assert_allclose(b, ref_share(u, slice(0, K)), rtol=1e-12, atol=0)
    np.testing.assert_allclose(t, ref_share(u, slice(None)), rtol=1e-12, atol=0)
    assert b.shape == (len(u), K) and t.shape == u.shape
    for share, part in ((b, u[:, :K]), (t, u)):
        assert np.isfinite(share).all()
        sums = share.sum(axis=1)
        nonzero = part.sum(axis=1) > 0
        np.testing.assert_allclose(sums[nonzero], 1.0, rtol=1e-12)
        np.testing.assert_array_equal(sums[~nonzero], 0.0)
    assert (b[0] == 0).all() and (b[1] == 0).all() and (t[0] == 0).all()
    np.testing.assert_allclose(t[1, K:].sum(), 1.0)


def test_baseline_share_ignores_case_columns():
    rng = np.random.default_rng(5)
    u = rng.gamma(1.0, 1.0, size=(50, K + C))
    more = u.copy()
    more[:, K:] += rng.gamma(2.0, 3.0, size=(50, C))  # add case usage to every cell
    np.testing.assert_array_equal(baseline_share(u, K), baseline_share(more, K))
    # ... while the total share of every baseline program drops
    assert (total_share(more)[:, :K] < total_share(u)[:, :K]).all()


def test_shares_are_scale_invariant_and_do_not_modify_input():
    rng = np.random.default_rng(6)
    u = rng.gamma(1.0, 1.0, size=(20, K + C))
    before = u.copy()
    scaled = u * rng.uniform(0.1, 10, size=(20, 1))
    np.testing.assert_allclose(baseline_share(scaled, K), baseline_share(u, K), rtol=1e-12)
    np.testing.assert_allclose(total_share(scaled), total_share(u), rtol=1e-12)
    np.testing.assert_array_equal(u, before)
    # integer and float32 input are promoted
    assert baseline_share(np.ones((3, 4), dtype=np.int64), 2).dtype == np.float64
    np.testing.assert_allclose(baseline_share(np.ones((3, 4), dtype=np.int64), 2), 0.5)


def test_novelty_is_case_part_of_total_share():
    u = _usage_with_zero_rows()
    nov = novelty(u, K)
    ref = ref_share(u, slice(None))[:, K:].sum(axis=1)
    np.testing.assert_allclose(nov, ref, rtol=1e-12, atol=0)
    assert nov[0] == 0.0 and nov[1] == pytest.approx(1.0) and nov[2] == 0.0
    assert np.isfinite(nov).all() and (nov >= 0).all() and (nov <= 1 + 1e-12).all()
    # planted: novelty equals the share s given to the case program
    rng = np.random.default_rng(7)
    usage, s = add_case_program(rng, dirichlet_usage(rng, np.full(K, 2.0), 100), C, fraction=0.5)
    np.testing.assert_allclose(novelty(usage, K), s, rtol=1e-12, atol=1e-15)


# --------------------------------------------------------------------------------------
# usage_shift_table
# --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def planted_data():
    return planted()


def test_usage_shift_calls_planted_up_and_down(planted_data):
    ctrl, case = planted_data
    table = usage_shift_table(ctrl, case, NAMES, K)
    assert list(table.columns) == ["program", "control_share", "case_share", "log2_fold_change", "ci_low", "ci_high",
                                   "p_value", "q_value", "permutation_p_value", "shift", "control_total_share",
                                   "case_total_share", "underpowered", "test_unit", "test", "n_control_samples",
                                   "n_case_samples"]
    # without samples: the cell-level test, and it says so
    assert (table["test_unit"] == "cell").all() and (table["test"] == "mann_whitney_u").all()
    assert table[["ci_low", "ci_high", "permutation_p_value"]].isna().all().all()
    assert table[["n_control_samples", "n_case_samples"]].isna().all().all()
    assert list(table["program"]) == NAMES[:K]
    expected = ["none"] * K
    expected[UP], expected[DOWN] = "up", "down"
    assert list(table["shift"]) == expected


def test_usage_shift_statistics_match_references(planted_data):
    ctrl, case = planted_data
    table = usage_shift_table(ctrl, case, NAMES, K)
    bc, bx = ref_share(ctrl, slice(0, K)), ref_share(case, slice(0, K))
    np.testing.assert_allclose(table["control_share"], bc.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(table["case_share"], bx.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(table["log2_fold_change"],
                               np.log2((bx.mean(axis=0) + 1e-3) / (bc.mean(axis=0) + 1e-3)), rtol=1e-12)
    p = ref_mwu(bx, bc, "two-sided")
    np.testing.assert_allclose(table["p_value"], p, rtol=1e-10)
    np.testing.assert_allclose(table["q_value"], ref_bh(p), rtol=1e-10)
    np.testing.assert_allclose(table["control_total_share"], ref_share(ctrl, slice(None))[:, :K].mean(axis=0),
                               rtol=1e-12)
    np.testing.assert_allclose(table["case_total_share"], ref_share(case, slice(None))[:, :K].mean(axis=0),
                               rtol=1e-12)
    # direction and thresholds, recomputed from the table itself
    called = (table["q_value"] < 0.05) & (table["log2_fold_change"].abs() >= 0.25)
    direction = np.where(table["log2_fold_change"] > 0, "up", "down")
    assert list(table["shift"]) == list(np.where(called, direction, "none"))
    assert PSEUDO == 1e-3


def test_usage_shift_same_distribution_calls_nothing():
    rng = np.random.default_rng(8)
    alpha = np.array([1.0, 2.0, 3.0, 0.5, 2.0])
    ctrl = np.hstack([dirichlet_usage(rng, alpha, 400), np.zeros((400, C))])
    case = np.hstack([dirichlet_usage(rng, alpha, 400), np.zeros((400, C))])
    table = usage_shift_table(ctrl, case, NAMES, K)
    assert (table["shift"] == "none").all()
    assert (table["log2_fold_change"].abs() < 0.25).all()


def test_case_programs_do_not_create_baseline_shifts():
    """Case programs take (1 - s) of the usage in half of the case cells: the baseline share
    is unchanged, so no shift; the total-share columns drop by the mean (1 - s)."""
    rng = np.random.default_rng(9)
    alpha = np.full(K, 2.0)
    ctrl = np.hstack([dirichlet_usage(rng, alpha, 400), np.zeros((400, C))])
    plain = dirichlet_usage(rng, alpha, 400)
    case, s = add_case_program(rng, plain, C, fraction=0.5, lo=0.3, hi=0.7)
    table = usage_shift_table(ctrl, case, NAMES, K)
    assert (table["shift"] == "none").all()
    # identical to the same cells without case usage: the baseline share does not see it
    same = usage_shift_table(ctrl, np.hstack([plain, np.zeros((400, C))]), NAMES, K)
    np.testing.assert_allclose(table["case_share"], same["case_share"], rtol=1e-12)
    np.testing.assert_allclose(table["p_value"], same["p_value"], rtol=1e-10)
    # the total shares do drop
    assert (table["case_total_share"] < table["control_total_share"]).all()
    assert (table["case_total_share"] < same["case_total_share"]).all()
    expected = (ref_share(plain, slice(None)) * (1 - s)[:, None]).mean(axis=0)
    np.testing.assert_allclose(table["case_total_share"], expected, rtol=1e-10)
    # a share computed on total usage *would* read as a drop of every baseline program
    naive = ref_mwu(ref_share(case, slice(None))[:, :K], ref_share(ctrl, slice(None))[:, :K], "less")
    assert (naive < 1e-6).all()


def _taken_over(s: float, seed=30, n=400):
    """Controls and cases from the same baseline distribution; in a quarter of the case
    cells case program 0 takes the share ``s`` of the usage (baseline scaled by 1 - s)."""
    rng = np.random.default_rng(seed)
    alpha = np.full(K, 2.0)
    ctrl = np.hstack([dirichlet_usage(rng, alpha, n), np.zeros((n, C))])
    base = dirichlet_usage(rng, alpha, n)
    total = base.sum(axis=1)
    users = np.arange(n) < n // 4
    base[users] *= 1 - s
    case = np.hstack([base, np.zeros((n, C))])
    case[users, K] = s * total[users]
    return ctrl, case


def test_case_program_taking_almost_all_usage_creates_no_shift():
    ctrl, case = _taken_over(0.999)
    table = usage_shift_table(ctrl, case, NAMES, K)
    assert (table["shift"] == "none").all()
    groups = np.array(["ctrl"] * len(ctrl) + ["G"] * len(case))
    g = group_usage_table(np.vstack([ctrl, case]), groups, np.arange(len(groups)) < len(ctrl), NAMES, K)
    assert not g.loc[g["program_kind"] == "baseline", "called"].any()


def test_case_program_taking_all_usage_creates_no_shift():
    ctrl, case = _taken_over(1.0)
    assert (case[: len(case) // 4, :K] == 0).all()
    table = usage_shift_table(ctrl, case, NAMES, K)
    assert (table["shift"] == "none").all()


def test_group_case_program_taking_all_usage_creates_no_baseline_call():
    ctrl, case = _taken_over(1.0)
    groups = np.array(["ctrl"] * len(ctrl) + ["G"] * len(case))
    g = group_usage_table(np.vstack([ctrl, case]), groups, np.arange(len(groups)) < len(ctrl), NAMES, K)
    assert g.loc[g["program"] == "case0", "called"].all()
    assert not g.loc[g["program_kind"] == "baseline", "called"].any()


def test_usage_shift_thresholds_are_respected():
    """A significant but tiny change is 'none' at min_log2fc=0.25, called at 0.1; q must be
    strictly below q_threshold; |log2 FC| >= min_log2fc is inclusive."""
    rng = np.random.default_rng(10)
    alpha_c = np.full(K, 50.0)
    alpha_x = alpha_c.copy()
    alpha_x[UP], alpha_x[DOWN] = 55.0, 45.0  # 0.20 -> 0.22 / 0.18: log2 FC ~ +0.14 / -0.15
    ctrl = np.hstack([dirichlet_usage(rng, alpha_c, 400), np.zeros((400, C))])
    case = np.hstack([dirichlet_usage(rng, alpha_x, 400), np.zeros((400, C))])
    table = usage_shift_table(ctrl, case, NAMES, K)
    assert table.loc[UP, "q_value"] < 1e-6 and table.loc[DOWN, "q_value"] < 1e-6
    assert table.loc[UP, "log2_fold_change"] < 0.25 and -0.25 < table.loc[DOWN, "log2_fold_change"]
    assert (table["shift"] == "none").all()

    loose = usage_shift_table(ctrl, case, NAMES, K, min_log2fc=0.1)
    assert loose.loc[UP, "shift"] == "up" and loose.loc[DOWN, "shift"] == "down"

    # min_log2fc exactly at |log2 FC| of UP: still called (>=); just above: not
    lfc = float(table.loc[UP, "log2_fold_change"])
    assert usage_shift_table(ctrl, case, NAMES, K, min_log2fc=lfc).loc[UP, "shift"] == "up"
    assert usage_shift_table(ctrl, case, NAMES, K, min_log2fc=lfc * (1 + 1e-9)).loc[UP, "shift"] == "none"

    # q_threshold exactly at q of UP: not called (<)
    q_up = float(loose.loc[UP, "q_value"])
    strict = usage_shift_table(ctrl, case, NAMES, K, q_threshold=q_up, min_log2fc=0.1)
    assert strict.loc[UP, "shift"] == "none"
    assert usage_shift_table(ctrl, case, NAMES, K, q_threshold=0.0, min_log2fc=0.0)["shift"].eq("none").all()


def test_usage_shift_constant_program_gives_nan_p_not_error(planted_data):
    ctrl, case = (u.copy() for u in planted_data)
    ctrl[:, 2] = 0.0
    case[:, 2] = 0.0  # program 2 unused by everyone
    table = usage_shift_table(ctrl, case, NAMES, K)
    assert np.isnan(table.loc[2, "p_value"]) and np.isnan(table.loc[2, "q_value"])
    assert table.loc[2, "shift"] == "none"
    assert table.loc[2, "control_share"] == 0.0 and table.loc[2, "case_share"] == 0.0
    # the other q-values are BH over the 4 finite p-values only
    ok = np.arange(K) != 2
    np.testing.assert_allclose(table["q_value"][ok], ref_bh(table["p_value"][ok].to_numpy()), rtol=1e-12)
    assert table.loc[UP, "shift"] == "up" and table.loc[DOWN, "shift"] == "down"


def test_usage_shift_single_baseline_program_is_constant_share():
    """With one baseline program its baseline share is 1 in every cell: NaN p, no call."""
    rng = np.random.default_rng(11)
    ctrl = rng.gamma(1.0, 1.0, size=(30, 2))
    case = rng.gamma(1.0, 1.0, size=(30, 2))
    table = usage_shift_table(ctrl, case, ["b", "c"], 1)
    assert len(table) == 1
    assert table.loc[0, "control_share"] == 1.0 and table.loc[0, "case_share"] == 1.0
    assert table.loc[0, "log2_fold_change"] == 0.0
    assert np.isnan(table.loc[0, "p_value"]) and table.loc[0, "shift"] == "none"


# --------------------------------------------------------------------------------------
# case_program_table
# --------------------------------------------------------------------------------------
G = 40


@pytest.fixture(scope="module")
def case_data():
    """Case program 0 is emergent (used by 50% of case cells, 5% of controls, smaller share);
    case program 1 is used alike by 30% of control and case cells."""
    rng = np.random.default_rng(12)
    n = 400
    alpha = np.full(K, 2.0)

    def cells(frac0, hi0, frac1):
        base = dirichlet_usage(rng, alpha, n)
        total = base.sum(axis=1)
        s0 = rng.uniform(0.15, hi0, n) * (rng.random(n) < frac0)
        s1 = rng.uniform(0.15, 0.4, n) * (rng.random(n) < frac1)
        base *= (1 - s0 - s1)[:, None]
        return np.hstack([base, (s0 * total)[:, None], (s1 * total)[:, None]])

    ctrl = cells(0.05, 0.2, 0.3)
    case = cells(0.5, 0.5, 0.3)
    programs = rng.gamma(0.5, 1.0, size=(G, K + C))
    programs[:, K] = programs[:, 2] + 0.3 * rng.gamma(0.5, 1.0, size=G)  # case0 resembles base2
    programs[:, K + 1] = programs[:, 4] + 0.3 * rng.gamma(0.5, 1.0, size=G)  # case1 resembles base4
    genes = np.array([f"ENSG{i:05d}" for i in range(G)])
    symbols = np.array([f"SYM{i}" for i in range(G)])
    return ctrl, case, programs, genes, symbols


def test_case_program_table_statistics_match_references(case_data):
    ctrl, case, programs, genes, symbols = case_data
    thr = 0.1
    table = case_program_table(ctrl, case, NAMES, K, programs, programs, symbols, share_threshold=thr)
    assert list(table.columns) == ["program", "case_fraction_using", "control_fraction_using", "case_mean_share",
                                   "control_mean_share", "mean_share_when_used", "log2_fold_change", "ci_low",
                                   "ci_high", "p_value", "q_value", "permutation_p_value", "emergent",
                                   "closest_baseline", "cosine_to_closest_baseline", "top_genes", "underpowered",
                                   "test_unit", "test", "n_control_samples", "n_case_samples"]
    assert (table["test_unit"] == "cell").all() and (table["test"] == "mann_whitney_u").all()
    assert list(table["program"]) == NAMES[K:]
    tc, tx = ref_share(ctrl, slice(None))[:, K:], ref_share(case, slice(None))[:, K:]
    np.testing.assert_allclose(table["case_fraction_using"], (tx >= thr).mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(table["control_fraction_using"], (tc >= thr).mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(table["case_mean_share"], tx.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(table["control_mean_share"], tc.mean(axis=0), rtol=1e-12)
    when_used = [tx[tx[:, j] >= thr, j].mean() for j in range(C)]
    np.testing.assert_allclose(table["mean_share_when_used"], when_used, rtol=1e-12)
    np.testing.assert_allclose(table["log2_fold_change"], ref_log2fc(tx.mean(axis=0), tc.mean(axis=0)), rtol=1e-12)
    p = ref_mwu(tx, tc, "greater")
    np.testing.assert_allclose(table["p_value"], p, rtol=1e-10)
    np.testing.assert_allclose(table["q_value"], ref_bh(p), rtol=1e-10)
    # planted: case0 emergent, case1 (used alike) not
    assert list(table["emergent"]) == [True, False]
    assert table.loc[1, "p_value"] > 0.01
    assert 0.4 < table.loc[0, "case_fraction_using"] < 0.6 and table.loc[0, "control_fraction_using"] < 0.1
    assert abs(table.loc[1, "case_fraction_using"] - table.loc[1, "control_fraction_using"]) < 0.1


def test_case_program_table_cosine_and_top_genes(case_data):
    """The cosine comes from the programs; the top genes from the scores given (the pipeline's
    specificity), not from the programs' weights."""
    ctrl, case, programs, genes, symbols = case_data
    base, cp = programs[:, :K], programs[:, K:]
    cos = np.array([[base[:, i] @ cp[:, j] / (np.linalg.norm(base[:, i]) * np.linalg.norm(cp[:, j]))
                     for j in range(C)] for i in range(K)])
    scores = np.random.default_rng(7).normal(size=programs.shape)
    for n_top in (10, 3):
        table = case_program_table(ctrl, case, NAMES, K, programs, scores, symbols, n_top=n_top)
        assert list(table["closest_baseline"]) == [NAMES[i] for i in cos.argmax(axis=0)] == ["base2", "base4"]
        np.testing.assert_allclose(table["cosine_to_closest_baseline"], cos.max(axis=0), rtol=1e-12)
        for j in range(C):
            top = sorted(range(G), key=lambda g: -scores[g, K + j])[:n_top]
            assert table.loc[j, "top_genes"] == ";".join(symbols[top])
            assert len(table.loc[j, "top_genes"].split(";")) == n_top
    top = np.argsort(-scores[:, K])[:10]
    assert top.tolist() != np.argsort(-cp[:, 0])[:10].tolist()  # the weights would rank otherwise
    # gene ids as labels, also as a pandas Index (as the pipeline passes them)
    for labels in (genes, pd.Index(genes)):
        table = case_program_table(ctrl, case, NAMES, K, programs, scores, labels)
        assert table.loc[0, "top_genes"] == ";".join(genes[top])


def test_case_program_table_share_threshold_and_when_used():
    """A hand-built case: case-program total shares 0.0, 0.05, 0.1 (exactly), 0.5 in case cells."""
    # columns: 2 baseline, 1 case
    case = np.array([[1.0, 1.0, 0.0],
                     [9.5, 9.5, 1.0],   # 1/20 = 0.05
                     [4.5, 4.5, 1.0],   # 1/10 = 0.1
                     [1.0, 1.0, 2.0]])  # 0.5
    ctrl = np.array([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [4.5, 4.5, 1.0]])
    programs = np.eye(3)
    names = ["b0", "b1", "c0"]
    table = case_program_table(ctrl, case, names, 2, programs, programs, ["g0", "g1", "g2"], share_threshold=0.1)
    assert table.loc[0, "case_fraction_using"] == pytest.approx(2 / 4)
    assert table.loc[0, "control_fraction_using"] == pytest.approx(1 / 3)
    assert table.loc[0, "mean_share_when_used"] == pytest.approx((0.1 + 0.5) / 2)
    assert table.loc[0, "case_mean_share"] == pytest.approx((0 + 0.05 + 0.1 + 0.5) / 4)
    table = case_program_table(ctrl, case, names, 2, programs, programs, ["g0", "g1", "g2"], share_threshold=0.6)
    assert table.loc[0, "case_fraction_using"] == 0.0
    assert table.loc[0, "mean_share_when_used"] == 0.0  # nobody uses it: 0, not NaN
    assert table.loc[0, "top_genes"].split(";")[0] == "g2"


def test_case_program_emergent_thresholds(case_data):
    ctrl, case, programs, genes, symbols = case_data
    table = case_program_table(ctrl, case, NAMES, K, programs, programs, symbols)
    lfc0, q0 = float(table.loc[0, "log2_fold_change"]), float(table.loc[0, "q_value"])
    assert lfc0 >= 1.0 and q0 < 0.05
    assert case_program_table(ctrl, case, NAMES, K, programs, programs, genes, min_log2fc=lfc0).loc[0, "emergent"]
    assert not case_program_table(ctrl, case, NAMES, K, programs, programs, genes,
                                  min_log2fc=lfc0 * (1 + 1e-9)).loc[0, "emergent"]
    assert not case_program_table(ctrl, case, NAMES, K, programs, programs, genes, q_threshold=q0).loc[0, "emergent"]
    # emergent is one-sided: a case program that *drops* in cases is never emergent
    flipped = case_program_table(case, ctrl, NAMES, K, programs, programs, genes, min_log2fc=-10.0)
    assert flipped.loc[0, "p_value"] > 0.5
    assert not flipped["emergent"].any()


def test_case_program_used_equally_is_not_emergent():
    rng = np.random.default_rng(13)
    n = 300

    def cells():
        base = dirichlet_usage(rng, np.full(K, 2.0), n)
        total = base.sum(axis=1)
        s = rng.uniform(0.2, 0.6, n) * (rng.random(n) < 0.4)
        base *= (1 - s)[:, None]
        return np.hstack([base, (s * total)[:, None], np.zeros((n, 1))])

    ctrl, case = cells(), cells()
    programs = rng.gamma(0.5, 1.0, size=(G, K + C))
    table = case_program_table(ctrl, case, NAMES, K, programs, programs, np.arange(G))
    assert not table["emergent"].any()
    assert abs(table.loc[0, "log2_fold_change"]) < 0.3
    # case1 is zero everywhere: NaN p-value, not emergent, q computed over the finite p only
    assert np.isnan(table.loc[1, "p_value"]) and np.isnan(table.loc[1, "q_value"])
    assert table.loc[0, "q_value"] == pytest.approx(table.loc[0, "p_value"])


def test_case_program_table_without_case_programs():
    rng = np.random.default_rng(14)
    ctrl, case = rng.gamma(1, 1, (20, K)), rng.gamma(1, 1, (20, K))
    table = case_program_table(ctrl, case, NAMES[:K], K, *[rng.gamma(1, 1, (G, K))] * 2, np.arange(G))
    assert len(table) == 0
    assert "emergent" in table.columns


# --------------------------------------------------------------------------------------
# group_usage_table
# --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def group_data():
    """300 controls (group label 'ctrl', 20 of them labelled 'A'); case groups A, B, C of
    100 cells. B: program UP raised / DOWN lowered; C: case program 0 takes 30-60% of the
    usage in every cell; A: like control."""
    rng = np.random.default_rng(15)
    alpha = np.full(K, 2.0)
    shifted = alpha.copy()
    shifted[UP], shifted[DOWN] = 4.0, 0.5
    blocks, groups, is_control = [], [], []

    def add(u, label, control):
        blocks.append(u)
        groups.extend([label] * len(u))
        is_control.extend([control] * len(u))

    ctrl = np.hstack([dirichlet_usage(rng, alpha, 300), np.zeros((300, C))])
    add(ctrl[:280], "ctrl", True)
    add(np.hstack([dirichlet_usage(rng, alpha, 50), np.zeros((50, C))]), "A", False)
    add(np.hstack([dirichlet_usage(rng, shifted, 100), np.zeros((100, C))]), "B", False)
    add(ctrl[280:], "A", True)  # control cells that carry a case group's label
    add(np.hstack([dirichlet_usage(rng, alpha, 50), np.zeros((50, C))]), "A", False)
    c_cells, _ = add_case_program(rng, dirichlet_usage(rng, alpha, 100), C, fraction=1.0, lo=0.3, hi=0.6)
    add(c_cells, "C", False)
    usage = np.vstack(blocks)
    perm = rng.permutation(len(usage))  # interleave the groups
    return usage[perm], np.array(groups, dtype=object)[perm], np.array(is_control)[perm]


def test_group_usage_table_layout_and_counts(group_data):
    usage, groups, is_control = group_data
    table = group_usage_table(usage, groups, is_control, NAMES, K)
    assert list(table.columns) == ["group", "program", "program_kind", "n_cells", "share", "control_share",
                                   "log2_fold_change", "ci_low", "ci_high", "p_value", "q_value",
                                   "permutation_p_value", "group_p_value", "group_q_value", "stagewise_q_value",
                                   "called", "test_unit", "test", "n_control_samples", "n_case_samples"]
    assert (table["test_unit"] == "cell").all() and (table["test"] == "mann_whitney_u").all()
    assert len(table) == 3 * (K + C)
    assert set(table["group"]) == {"A", "B", "C"}  # control cells never form a group
    assert "ctrl" not in set(table["group"])
    for g, sub in table.groupby("group"):
        assert list(sub["program"]) == NAMES
        assert list(sub["program_kind"]) == ["baseline"] * K + ["case"] * C
        assert (sub["n_cells"] == ((groups == g) & ~is_control).sum()).all()
    assert (table.loc[table["group"] == "A", "n_cells"] == 100).all()  # the 20 controls labelled A excluded
    assert table.groupby(["group", "program"]).size().eq(1).all()


@pytest.mark.smoke
def test_group_usage_table_statistics_match_references(group_data):
    usage, groups, is_control = group_data
    table = group_usage_table(usage, groups, is_control, NAMES, K)
    shares = np.hstack([ref_share(usage, slice(0, K)), ref_share(usage, slice(None))[:, K:]])
    control = shares[is_control]
    p_all = []
    order = list(dict.fromkeys(table["group"]))  # the table's group order (first appearance)
    assert sorted(order) == ["A", "B", "C"]
    for g in order:
        sub = table[table["group"] == g]
        members = shares[(groups == g) & ~is_control]
        np.testing.assert_allclose(sub["share"], members.mean(axis=0), rtol=1e-12)
        np.testing.assert_allclose(sub["control_share"], control.mean(axis=0), rtol=1e-12)
        np.testing.assert_allclose(sub["log2_fold_change"],
                                   ref_log2fc(members.mean(axis=0), control.mean(axis=0)), rtol=1e-12)
        # two-sided for baseline programs, one-sided (group above control) for case programs
        p = np.array([mannwhitneyu(members[:, j], control[:, j],
                                   alternative="two-sided" if j < K else "greater").pvalue
                      if np.ptp(np.concatenate([members[:, j], control[:, j]])) > 0 else np.nan
                      for j in range(K + C)])
        np.testing.assert_allclose(sub["p_value"], p, rtol=1e-10)
        p_all.append(p)
    # the baseline rows use the baseline share: they are unaffected by C's case usage
    c_rows = table[(table["group"] == "C") & (table["program_kind"] == "baseline")]
    assert c_rows["share"].sum() == pytest.approx(1.0)
    # q is BH over the whole table (NaN p's excluded)
    p_all = np.concatenate(p_all)
    np.testing.assert_allclose(table["p_value"], p_all, rtol=1e-10)
    np.testing.assert_allclose(table["q_value"], ref_bh(p_all), rtol=1e-10, equal_nan=True)
    # calls are stage-wise: a group selected by BH over its Simes p-value, then BH within it
    group_q = ref_bh(np.array([min(len(p) * np.sort(p)[i] / (i + 1) for i in range(len(p))) for p in
                               (p_all.reshape(3, -1)[g][np.isfinite(p_all.reshape(3, -1)[g])] for g in range(3))]))
    np.testing.assert_allclose(table.groupby("group", sort=False)["group_q_value"].first(), group_q, rtol=1e-10)
    within = np.concatenate([ref_bh(p) * 3 / max((group_q < 0.05).sum(), 1) if q < 0.05 else np.full(len(p), np.nan)
                             for p, q in zip(p_all.reshape(3, -1), group_q)])
    strong = np.where(table["program_kind"] == "case", table["log2_fold_change"] >= 1.0,
                      table["log2_fold_change"].abs() >= 0.25)
    called = (np.minimum(within, 1) < 0.05) & strong
    assert table["called"].tolist() == called.tolist()


def test_group_usage_table_calls_planted_groups_only(group_data):
    usage, groups, is_control = group_data
    table = group_usage_table(usage, groups, is_control, NAMES, K)
    calls = {(g, p) for g, p in table.loc[table["called"], ["group", "program"]].itertuples(index=False)}
    assert calls == {("B", NAMES[UP]), ("B", NAMES[DOWN]), ("C", "case0")}
    assert not table.loc[table["group"] == "A", "called"].any()
    # case1 is zero everywhere: NaN p and q, never called
    case1 = table[table["program"] == "case1"]
    assert case1["p_value"].isna().all() and case1["q_value"].isna().all() and not case1["called"].any()


def test_group_usage_table_thresholds(group_data):
    usage, groups, is_control = group_data
    strict = group_usage_table(usage, groups, is_control, NAMES, K, q_threshold=1e-300)
    assert not strict["called"].any()
    wide = group_usage_table(usage, groups, is_control, NAMES, K, q_threshold=1.0, min_log2fc=0.0)
    assert wide["called"].tolist() == (wide["q_value"] < 1.0).tolist()


def test_group_usage_table_empty_groups():
    rng = np.random.default_rng(16)
    usage = rng.gamma(1, 1, (30, K + C))
    # every cell a control: no case group
    table = group_usage_table(usage, np.array(["ctrl"] * 30), np.ones(30, dtype=bool), NAMES, K)
    assert isinstance(table, pd.DataFrame) and table.empty
    # no cells at all
    table = group_usage_table(np.zeros((0, K + C)), np.array([], dtype=str), np.zeros(0, dtype=bool), NAMES, K)
    assert table.empty


def test_group_usage_table_with_nan_control_labels_and_numeric_groups():
    """Group labels as the pipeline passes them (obs column .to_numpy()): controls may carry
    NaN, case groups may be numbers; groups are compared as strings."""
    rng = np.random.default_rng(17)
    usage = rng.gamma(1, 1, (60, K + C))
    groups = np.array([np.nan] * 20 + [1] * 20 + [2] * 20, dtype=object)
    is_control = np.arange(60) < 20
    table = group_usage_table(usage, groups, is_control, NAMES, K)
    assert sorted(set(table["group"])) == ["1", "2"]
    assert (table["n_cells"] == 20).all()
