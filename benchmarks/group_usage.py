"""group_usage.csv for a genome-wide screen: the vectorised table against the implementation
it replaced, side by side in one run.

A synthetic screen (default: 200,000 cells, 2,000 perturbation groups, 30 programs, 10%
control cells) with NNLS-like usage (Dirichlet compositions, 30% exact zeros, so ranks tie
heavily). Times, in one process:

- ``current``: ``group_usage_table`` as it was at 71b59d5 (copied below: one
  ``scipy.stats.mannwhitneyu`` per group and program, each ranking the control cells again);
- ``new, cells``: ``deltanmf.tl.casecontrol.group_usage_table`` at the cell level (each
  program's control cells sorted once, every group's U and tie term from binary searches);
- ``new, samples``: the same with guides as samples (``samples=``): 4 guides per group,
  so each group also gets an exact or Monte-Carlo permutation p-value (9,999 relabellings),
  and 6 guides per group (Welch's t only);

checks that the two cell-level tables agree (p-values, q-values, calls), and writes
``benchmarks/results/group_usage.md`` with the command, date, machine and load.

    python benchmarks/group_usage.py                 # the issue's scale
    python benchmarks/group_usage.py --cells 20000 --groups 200   # a quick look
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import mannwhitneyu

from deltanmf.tl.casecontrol import bh_qvalues, group_usage_table

ROOT = Path(__file__).resolve().parents[1]


# -- the implementation at 71b59d5 (deltanmf/tl/casecontrol.py), kept for the comparison ----------
def _old_share(usage, columns=None):
    usage = np.asarray(usage, dtype=np.float64)
    part = usage if columns is None else usage[:, columns]
    total = part.sum(axis=1, keepdims=True)
    return np.divide(part, total, out=np.zeros_like(part), where=total > 0)


def _old_defined_baseline_share(usage, n_baseline):
    share = _old_share(usage, slice(0, n_baseline))
    share[np.asarray(usage)[:, :n_baseline].sum(axis=1) <= 0] = np.nan
    return share


def _old_mwu(case, control, alternative):
    p = np.full(case.shape[1], np.nan)
    for j in range(case.shape[1]):
        a, b = case[:, j], control[:, j]
        a, b = a[~np.isnan(a)], b[~np.isnan(b)]
        if len(a) and len(b) and np.ptp(np.concatenate([a, b])) > 0:
            p[j] = mannwhitneyu(a, b, alternative=alternative, method="asymptotic").pvalue
    return p


def _old_mean(x):
    count = (~np.isnan(x)).sum(axis=0)
    return np.divide(np.nansum(x, axis=0), count, out=np.full(x.shape[1], np.nan), where=count > 0)


def old_group_usage_table(usage, groups, is_control, names, n_baseline, q_threshold=0.05, min_log2fc=0.25,
                          emergence_log2fc=1.0):
    groups = np.asarray(groups).astype(str)
    is_control = np.asarray(is_control, dtype=bool)
    shares = np.hstack([_old_defined_baseline_share(usage, n_baseline), _old_share(usage)[:, n_baseline:]])
    kinds = ["baseline"] * n_baseline + ["case"] * (len(names) - n_baseline)
    control = shares[is_control]
    rows = []
    for group in pd.unique(groups[~is_control]):
        members = shares[(groups == group) & ~is_control]
        p = _old_mwu(members, control, "two-sided")
        share, control_share = _old_mean(members), _old_mean(control)
        for j, name in enumerate(names):
            rows.append({"group": group, "program": name, "program_kind": kinds[j], "n_cells": len(members),
                         "share": share[j], "control_share": control_share[j], "p_value": p[j]})
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    table["log2_fold_change"] = np.log2((table["share"] + 1e-3) / (table["control_share"] + 1e-3))
    table["q_value"] = bh_qvalues(table["p_value"])  # unchanged since 71b59d5
    fc = table["log2_fold_change"]
    strong = np.where(table["program_kind"] == "case", fc >= emergence_log2fc, fc.abs() >= min_log2fc)
    table["called"] = (table["q_value"] < q_threshold) & strong
    return table[["group", "program", "program_kind", "n_cells", "share", "control_share", "log2_fold_change",
                  "p_value", "q_value", "called"]]


# -- the screen ----------------------------------------------------------------------------------
def screen(n_cells: int, n_groups: int, n_programs: int, n_baseline: int, seed: int = 0):
    """Usage, group labels, control mask; a tenth of the groups shift two programs."""
    rng = np.random.default_rng(seed)
    n_control = n_cells // 10
    group = np.r_[np.full(n_control, -1), rng.integers(0, n_groups, n_cells - n_control)]
    alpha = np.full((n_groups + 1, n_programs), 0.5)
    hit = rng.choice(n_groups, n_groups // 10, replace=False)
    alpha[hit, 0] *= 3
    alpha[hit, 1] /= 3
    usage = rng.gamma(alpha[group + 1], 1.0)
    usage[rng.random(usage.shape) < 0.3] = 0.0  # NNLS leaves many exact zeros
    labels = np.where(group < 0, "NTC", np.char.add("GENE", group.astype(str)))
    return usage, labels, group < 0, group


def guides(group: np.ndarray, per_group: int, n_control_guides: int, seed: int = 1) -> np.ndarray:
    """Each cell's guide: ``per_group`` guides per target, ``n_control_guides`` non-targeting ones."""
    rng = np.random.default_rng(seed)
    guide = np.where(group < 0, rng.integers(0, n_control_guides, len(group)), rng.integers(0, per_group, len(group)))
    return np.char.add(np.char.add(np.where(group < 0, "NTC", group.astype(str)), "_g"), guide.astype(str))


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=200_000)
    parser.add_argument("--groups", type=int, default=2_000)
    parser.add_argument("--programs", type=int, default=30)
    parser.add_argument("--case-programs", type=int, default=5)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "group_usage.md")
    args = parser.parse_args()
    n_baseline = args.programs - args.case_programs
    names = [f"baseline_{i + 1}" for i in range(n_baseline)] + [f"case_{i + 1}" for i in range(args.case_programs)]
    usage, labels, is_control, group = screen(args.cells, args.groups, args.programs, n_baseline)
    load_before = Path("/proc/loadavg").read_text().split()[:3]

    new, t_new = timed(lambda: group_usage_table(usage, labels, is_control, names, n_baseline))
    print(f"new, cells: {t_new:.1f} s", flush=True)
    old, t_old = timed(lambda: old_group_usage_table(usage, labels, is_control, names, n_baseline))
    print(f"current: {t_old:.1f} s", flush=True)
    samples4 = guides(group, 4, 100)
    four, t_four = timed(lambda: group_usage_table(usage, labels, is_control, names, n_baseline, samples=samples4))
    print(f"new, samples (4 guides): {t_four:.1f} s", flush=True)
    six, t_six = timed(lambda: group_usage_table(usage, labels, is_control, names, n_baseline,
                                                 samples=guides(group, 6, 100)))
    print(f"new, samples (6 guides): {t_six:.1f} s", flush=True)
    load_after = Path("/proc/loadavg").read_text().split()[:3]

    # the two cell-level tables: same rows, same p-values and calls
    key = ["group", "program"]
    merged = old.merge(new, on=key, suffixes=("_old", "_new"))
    assert len(merged) == len(old) == len(new), "the tables differ in their rows"
    both = merged[["p_value_old", "p_value_new"]].dropna()
    p_diff = float(np.max(np.abs(both["p_value_old"] - both["p_value_new"]) / np.maximum(both["p_value_old"], 1e-300)))
    q_diff = float(np.nanmax(np.abs(merged["q_value_old"] - merged["q_value_new"])))
    same_nan = bool((merged["p_value_old"].isna() == merged["p_value_new"].isna()).all())
    same_calls = bool((merged["called_old"] == merged["called_new"]).all())

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    rows = [
        ("current (71b59d5): Mann-Whitney U per group and program", "cells", t_old, 1.0),
        ("new: ranks once per program, all groups at once", "cells", t_new, t_old / t_new),
        ("new: 4 guides per group vs 100 control guides (Welch's t + permutation p, 9,999 relabellings)", "samples",
         t_four, t_old / t_four),
        ("new: 6 guides per group vs 100 control guides (Welch's t)", "samples", t_six, t_old / t_six),
    ]
    n_control = int(is_control.sum())
    lines = [
        "# group_usage.csv at screen scale",
        "",
        f"Command: `python benchmarks/group_usage.py{' ' + ' '.join(sys.argv[1:]) if sys.argv[1:] else ''}` "
        f"({date.today().isoformat()}).",
        f"Machine: {os.cpu_count()} CPUs ({cpu}); load average before {' '.join(load_before)}, "
        f"after {' '.join(load_after)} (1, 5, 15 min).",
        f"Screen: {args.cells:,} cells ({n_control:,} control), {args.groups:,} groups, {args.programs} programs "
        f"({n_baseline} baseline, {args.case_programs} case); {len(new):,} rows.",
        "",
        "| implementation | test unit | time (s) | speed-up over current |",
        "|---|---|---|---|",
        *[f"| {name} | {unit} | {t:.1f} | {ratio:.0f}x |" for name, unit, t, ratio in rows],
        "",
        f"Cell-level tables, current vs new: largest relative p-value difference {p_diff:.1e}, largest q-value "
        f"difference {q_diff:.1e}; NaN p-values in the same places: {same_nan}; calls identical: {same_calls}.",
        f"Sample-level tables: {int(four['called'].sum())} (4 guides) and {int(six['called'].sum())} (6 guides) "
        f"calls; {int(new['called'].sum())} at the cell level.",
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
