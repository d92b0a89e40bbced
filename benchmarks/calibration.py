"""Calibration of the case-control tests: the numbers behind docs/statistics.md.

Usage from the simulator's generative model with samples (donors) and a donor random effect
on every baseline program (``deltanmf.data.generative.make_usage``, 10 programs,
concentration 0.3, donor log-scale SD 0.5, 100-150 cells per donor); a fresh dataset per
seed. Measures, for the sample-level test (Welch's t, or OLS with a covariate) and the
cell-level test (Mann-Whitney U) on the same data:

1. pseudo-splits of 16 control donors into 8 pseudo-case and 8 pseudo-control donors (no
   true effect): KS test of the p-values against uniform (one program per seed, so the
   p-values are independent), the fraction of p < 0.05, of calls (q < 0.05), and of tables
   with any call;
2. the same with 10 donors split 4 / 6: the exact permutation p-value (210 splits);
3. 16 donors in two batches, the batch raising one program, pseudo-case donors mostly from
   one batch: OLS with the batch as covariate vs Welch's t without it (that program);
4. 8 control and 8 case donors, 3 of 10 programs shifted (concentration /3, or raised by
   what the others give up): false calls among unshifted programs and true shifts found.

Writes ``benchmarks/results/calibration.md``.

    python benchmarks/calibration.py [--seeds 200]
"""
from __future__ import annotations

import argparse
import sys
from datetime import date
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from deltanmf.data.generative import make_usage
from deltanmf.tl.casecontrol import usage_shift_table
from deltanmf.tl.sampletests import SampleOptions

ROOT = Path(__file__).resolve().parents[1]
K = 10
NAMES = [f"baseline_{i + 1}" for i in range(K)]


def controls(seed: int, n_samples: int, cells: int = 100):
    rng = np.random.default_rng(seed)
    usage, *_, sample, _ = make_usage(rng, K, 0, n_samples * cells, 1, 1, 0, 1.0, 0.4, (0.3, 0.7), 0.3,
                                      n_control_samples=n_samples, n_case_samples=1, sample_sigma=0.5)
    return usage[:n_samples * cells], sample[:n_samples * cells], rng


def tables(usage, sample, is_case, covariates=None):
    by_sample = usage_shift_table(usage[~is_case], usage[is_case], NAMES, K, control_samples=sample[~is_case],
                                  case_samples=sample[is_case], options=SampleOptions(covariates=covariates))
    return by_sample, usage_shift_table(usage[~is_case], usage[is_case], NAMES, K)


def summary(p: np.ndarray, q: np.ndarray, seeds: int) -> dict:
    one = p[np.arange(seeds), np.arange(seeds) % K]
    return {"KS p-value (uniform)": stats.kstest(one, "uniform").pvalue, "p < 0.05": (p < 0.05).mean(),
            "calls (q < 0.05)": (q < 0.05).mean(), "tables with a call": (q < 0.05).any(axis=1).mean()}


def pseudo_splits(seeds: int, n_samples: int, n_case: int) -> tuple[dict, dict, np.ndarray]:
    ps, qs, pc, qc, perm = [], [], [], [], []
    for seed in range(seeds):
        usage, sample, rng = controls(seed, n_samples)
        is_case = np.isin(sample, rng.permutation(n_samples)[:n_case])
        s, c = tables(usage, sample, is_case)
        ps.append(s["p_value"]), qs.append(s["q_value"]), perm.append(s["permutation_p_value"])
        pc.append(c["p_value"]), qc.append(c["q_value"])
    return (summary(np.array(ps), np.array(qs), seeds), summary(np.array(pc), np.array(qc), seeds),
            np.array(perm)[np.arange(seeds), np.arange(seeds) % K])


def batch(seeds: int) -> tuple[np.ndarray, np.ndarray]:
    adjusted, naive = [], []
    for seed in range(seeds):
        rng = np.random.default_rng(seed)
        groups = np.repeat(["A", "B"], 8)
        blocks = [rng.dirichlet(0.3 * np.exp(rng.normal(0, 0.5, K) + (groups[s] == "B") * np.r_[1.0, np.zeros(K - 1)]),
                                size=100) for s in range(16)]
        usage, sample = np.vstack(blocks), np.repeat([f"d{s}" for s in range(16)], 100)
        pseudo = np.r_[rng.choice(8, 2, replace=False), 8 + rng.choice(8, 6, replace=False)]
        is_case = np.isin(sample, [f"d{s}" for s in pseudo])
        frame = pd.DataFrame({"batch": groups}, index=[f"d{s}" for s in range(16)])
        adjusted.append(tables(usage, sample, is_case, frame)[0]["p_value"][0])
        naive.append(tables(usage, sample, is_case)[0]["p_value"][0])
    return np.array(adjusted), np.array(naive)


def donors(seeds: int) -> dict:
    counts = dict.fromkeys(["false sample", "false cell", "found sample", "found cell", "nulls", "planted"], 0)
    for seed in range(seeds):
        rng = np.random.default_rng(seed)
        usage, _, shifted, _, sample, _ = make_usage(rng, K, 0, 1200, 1200, 1, 3, 3.0, 0.4, (0.3, 0.7), 0.3,
                                                     n_control_samples=8, n_case_samples=8, sample_sigma=0.5)
        is_case = np.r_[np.zeros(1200, bool), np.ones(1200, bool)]
        by_sample, by_cell = tables(usage, sample, is_case)
        expected = np.where(shifted > 0, "up", np.where(shifted < 0, "down", "none"))
        null = shifted == 0
        for unit, table in (("sample", by_sample), ("cell", by_cell)):
            calls = table["shift"].to_numpy()
            counts[f"false {unit}"] += int((calls[null] != "none").sum())
            counts[f"found {unit}"] += int((calls[~null] == expected[~null]).sum())
        counts["nulls"] += int(null.sum())
        counts["planted"] += int((~null).sum())
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=200)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "calibration.md")
    args = parser.parse_args()
    seeds = args.seeds
    even_sample, even_cell, _ = pseudo_splits(seeds, 16, 8)
    few_sample, few_cell, perm = pseudo_splits(seeds, 10, 4)
    adjusted, naive = batch(seeds)
    design = donors(20)

    def row(name, values):
        return f"| {name} | " + " | ".join(f"{v:.3g}" for v in values.values()) + " |"

    lines = [
        "# Calibration of the case-control tests",
        "",
        f"Command: `python benchmarks/calibration.py{' ' + ' '.join(sys.argv[1:]) if sys.argv[1:] else ''}` "
        f"({date.today().isoformat()}); {seeds} seeds, a fresh simulated dataset per seed (10 programs, donor "
        "log-scale SD 0.5, 100 cells per donor).",
        "",
        "## Pseudo-case vs pseudo-control splits of control donors (no true effect)",
        "",
        "KS: one program per seed (independent p-values); rates over all programs and seeds.",
        "",
        "| design, test | KS p-value (uniform) | p < 0.05 | calls (q < 0.05) | tables with a call |",
        "|---|---|---|---|---|",
        row("8 vs 8 donors, sample level (Welch's t)", even_sample),
        row("8 vs 8 donors, cell level (Mann-Whitney U)", even_cell),
        row("4 vs 6 donors, sample level (Welch's t)", few_sample),
        row("4 vs 6 donors, cell level (Mann-Whitney U)", few_cell),
        "",
        "Exact permutation p-value (4 vs 6 donors, 210 splits): P(p <= a) for a = 0.05, 0.1, 0.2, 0.5: "
        + ", ".join(f"{(perm <= a + 1e-9).mean():.3f}" for a in (0.05, 0.1, 0.2, 0.5)) + ".",
        "",
        "## A batch that follows the condition (6 of 8 pseudo-case donors from the batch raising baseline_1)",
        "",
        "| test of baseline_1 | KS p-value (uniform) | p < 0.05 |",
        "|---|---|---|",
        f"| OLS with the batch as covariate | {stats.kstest(adjusted, 'uniform').pvalue:.3g} | "
        f"{(adjusted < 0.05).mean():.3g} |",
        f"| Welch's t without it | {stats.kstest(naive, 'uniform').pvalue:.3g} | {(naive < 0.05).mean():.3g} |",
        "",
        "## Donor random effect on every program, 3 of 10 programs shifted (8 vs 8 donors, 150 cells each, 20 seeds)",
        "",
        "| test | false calls (unshifted programs) | true shifts found |",
        "|---|---|---|",
        *[f"| {unit} level | {design[f'false {unit}']} of {design['nulls']} "
          f"({design[f'false {unit}'] / design['nulls']:.1%}) | {design[f'found {unit}']} of {design['planted']} "
          f"({design[f'found {unit}'] / design['planted']:.1%}) |" for unit in ("sample", "cell")],
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
