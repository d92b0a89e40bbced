"""Calibration of the case-control tests under a true null, and their behaviour under a
donor random effect (issue 20).

The usage comes from the simulator's generative model (``deltanmf.data.generative.make_usage``)
with samples: every sample (donor) multiplies every baseline program's concentration by its
own factor, so cells of one donor resemble each other more than cells of different donors.

- Pseudo-splits: the control samples of a simulated dataset are split at random into
  pseudo-case and pseudo-control samples: there is no true effect, so the sample-level
  p-values must be uniform and calls rare. The cell-level test on the same splits is not
  calibrated (the reason for the sample level), which the tests also show.
- Donor design: 8 control and 8 case donors, 3 of 10 programs truly shifted; the
  sample-level test keeps false calls near zero and finds the true shifts, where the
  cell-level test calls many unshifted programs.

Each check draws a fresh dataset per seed, so the p-values of different seeds are
independent. Bounds are the nominal rates plus about three binomial standard errors.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats

from deltanmf.data.generative import make_usage
from deltanmf.tl.casecontrol import usage_shift_table
from deltanmf.tl.sampletests import SampleOptions

K = 10
NAMES = [f"baseline_{i + 1}" for i in range(K)]
SEEDS = 200


def control_samples(seed: int, n_samples: int, cells: int = 100, sigma: float = 0.5):
    """Control cells of ``n_samples`` donors (usage, sample index), and the seed's generator."""
    rng = np.random.default_rng(seed)
    usage, *_, sample, _ = make_usage(rng, K, 0, n_samples * cells, 1, 1, 0, 1.0, 0.4, (0.3, 0.7), 0.3,
                                      n_control_samples=n_samples, n_case_samples=1, sample_sigma=sigma)
    n = n_samples * cells
    return usage[:n], sample[:n], rng


def pseudo_split(seed: int, n_samples: int, n_case: int, **options):
    """Sample-level and cell-level usage_shift tables of one random pseudo-case split."""
    usage, sample, rng = control_samples(seed, n_samples)
    is_case = np.isin(sample, rng.permutation(n_samples)[:n_case])
    by_sample = usage_shift_table(usage[~is_case], usage[is_case], NAMES, K, control_samples=sample[~is_case],
                                  case_samples=sample[is_case], options=SampleOptions(**options))
    by_cell = usage_shift_table(usage[~is_case], usage[is_case], NAMES, K)
    return by_sample, by_cell


def test_sample_level_pvalues_are_uniform_on_pseudo_splits_of_control_samples():
    p_sample, p_cell, calls_sample, calls_cell = [], [], [], []
    for seed in range(SEEDS):
        by_sample, by_cell = pseudo_split(seed, n_samples=16, n_case=8)
        p_sample.append(by_sample["p_value"].to_numpy())
        p_cell.append(by_cell["p_value"].to_numpy())
        calls_sample.append((by_sample["q_value"] < 0.05).to_numpy())
        calls_cell.append((by_cell["q_value"] < 0.05).to_numpy())
        assert (by_sample["n_case_samples"] == 8).all() and (by_sample["n_control_samples"] == 8).all()
    p_sample, p_cell = np.array(p_sample), np.array(p_cell)
    one = np.arange(SEEDS), np.arange(SEEDS) % K  # one program per seed: independent p-values
    assert stats.kstest(p_sample[one], "uniform").pvalue > 0.01
    assert abs((p_sample < 0.05).mean() - 0.05) < 3 * np.sqrt(0.05 * 0.95 / SEEDS)
    assert np.mean(calls_sample) < 0.05 + 0.02
    assert np.mean(np.any(calls_sample, axis=1)) < 0.05 + 3 * np.sqrt(0.05 * 0.95 / SEEDS)  # BH: any call, <= 5%
    # the cell-level test on the same splits takes donor noise for effects
    assert stats.kstest(p_cell[one], "uniform").pvalue < 1e-6
    assert np.mean(calls_cell) > 0.3


def test_permutation_pvalues_are_valid_with_few_samples():
    """4 pseudo-case vs 6 pseudo-control donors: an exact permutation test over C(10, 4) = 210
    splits, whose p-value is at most alpha with probability at most alpha."""
    p_perm, p_welch = [], []
    for seed in range(SEEDS):
        by_sample, _ = pseudo_split(seed, n_samples=10, n_case=4)
        p_perm.append(by_sample["permutation_p_value"].to_numpy())
        p_welch.append(by_sample["p_value"].to_numpy())
    p_perm, p_welch = np.array(p_perm), np.array(p_welch)
    one = np.arange(SEEDS), np.arange(SEEDS) % K
    assert np.isfinite(p_perm).all()  # fewer than 6 samples: computed without being asked
    for alpha in (0.05, 0.1, 0.2, 0.5):
        assert (p_perm[one] <= alpha + 1e-9).mean() < alpha + 3 * np.sqrt(alpha * (1 - alpha) / SEEDS), alpha
    assert stats.kstest(p_welch[one], "uniform").pvalue > 0.01


def batch_confounded(seed: int, adjust: bool, moderate: bool = False):
    """16 donors in two batches; batch B raises baseline_1 (log factor 1); the pseudo-case
    donors are mostly from batch B (6 of 8), so batch and condition go together."""
    rng = np.random.default_rng(seed)
    batch = np.repeat(["A", "B"], 8)
    blocks, labels = [], []
    for s in range(16):
        alpha = 0.3 * np.exp(rng.normal(0, 0.5, K) + (batch[s] == "B") * np.r_[1.0, np.zeros(K - 1)])
        blocks.append(rng.dirichlet(alpha, size=100))
        labels += [f"d{s}"] * 100
    usage, labels = np.vstack(blocks), np.array(labels)
    pseudo = np.r_[rng.choice(8, 2, replace=False), 8 + rng.choice(8, 6, replace=False)]
    is_case = np.isin(labels, [f"d{s}" for s in pseudo])
    covariates = pd.DataFrame({"batch": batch}, index=[f"d{s}" for s in range(16)]) if adjust else None
    return usage_shift_table(usage[~is_case], usage[is_case], NAMES, K, control_samples=labels[~is_case],
                             case_samples=labels[is_case],
                             options=SampleOptions(covariates=covariates, moderate=moderate))


def test_covariates_keep_calibration_when_a_batch_follows_the_condition():
    adjusted = np.array([batch_confounded(seed, True)["p_value"][0] for seed in range(SEEDS)])
    naive = np.array([batch_confounded(seed, False)["p_value"][0] for seed in range(SEEDS)])
    assert stats.kstest(adjusted, "uniform").pvalue > 0.01
    assert (adjusted < 0.05).mean() < 0.05 + 3 * np.sqrt(0.05 * 0.95 / SEEDS)
    # Welch's t without the batch takes part of it for the condition: above the nominal rate
    assert (naive < 0.05).mean() > 0.05 + 3 * np.sqrt(0.05 * 0.95 / SEEDS)
    # moderated (the default), the adjusted test stays at or below its level
    moderated = np.array([batch_confounded(seed, True, True)["p_value"][0] for seed in range(SEEDS)])
    assert (moderated < 0.05).mean() < 0.05 + 3 * np.sqrt(0.05 * 0.95 / SEEDS)


def donor_design(seed: int):
    """8 control and 8 case donors of 150 cells, a donor effect on every program (log SD 0.5),
    3 programs shifted (concentration /3 or up by the same amount)."""
    rng = np.random.default_rng(seed)
    usage, _, shifted, _, sample, _ = make_usage(rng, K, 0, 1200, 1200, 1, 3, 3.0, 0.4, (0.3, 0.7), 0.3,
                                                 n_control_samples=8, n_case_samples=8, sample_sigma=0.5)
    ctrl, case = usage[:1200], usage[1200:]
    by_sample = usage_shift_table(ctrl, case, NAMES, K, control_samples=sample[:1200], case_samples=sample[1200:])
    by_cell = usage_shift_table(ctrl, case, NAMES, K)
    return shifted, by_sample, by_cell


def test_donor_effect_sample_level_keeps_false_calls_near_zero_and_finds_true_shifts():
    false_sample = false_cell = found = nulls = planted = 0
    for seed in range(20):
        shifted, by_sample, by_cell = donor_design(seed)
        expected = np.where(shifted > 0, "up", np.where(shifted < 0, "down", "none"))
        null = shifted == 0
        false_sample += int((by_sample["shift"].to_numpy()[null] != "none").sum())
        false_cell += int((by_cell["shift"].to_numpy()[null] != "none").sum())
        found += int((by_sample["shift"].to_numpy()[~null] == expected[~null]).sum())
        nulls, planted = nulls + int(null.sum()), planted + int((~null).sum())
    assert false_sample / nulls < 0.1
    assert false_cell / nulls > 0.3  # cells as replicates: donor noise called as shifts
    assert found / planted >= 0.8
