"""Case-control statistics of a two-stage fit: shifted usage and emerging programs.

All functions take usage matrices (cells x programs, baseline programs first) and return
pandas tables; the shares they compare are described in :mod:`deltanmf.tl.shares`.

Each table tests at one of two units, named in its ``test_unit`` column:

- ``sample`` (with per-cell sample labels, ``data.sample_key``, or pair halves): each
  sample's mean share, compared across samples on the log scale
  (:mod:`deltanmf.tl.sampletests`): Welch's t or, with covariates or pairs, OLS, the
  variances moderated across programs by default; ``log2_fold_change`` is the difference of
  mean ``log2(share + 1e-3)`` with its 95% interval (``ci_low``, ``ci_high``);
  ``permutation_p_value`` when a side has fewer than 6 samples or ``permutations > 0``;
  ``underpowered`` where the design cannot support a call. ``group_usage`` tests a screen's
  groups in one model (:mod:`deltanmf.tl.screentests`).
- ``cell`` (no samples): Mann-Whitney U over cells (:mod:`deltanmf.tl.celltests`);
  ``log2_fold_change`` is ``log2((mean case share + 1e-3) / (mean control share + 1e-3))``.

q-values are Benjamini-Hochberg over the finite p-values of one table.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.stats import false_discovery_control

from ..core.metrics import cosine_matrix
from .celltests import mannwhitney_groups
from .programs import top_gene_labels
from .sampletests import (AUTO_PERMUTATIONS, Relabellings, SampleOptions, UnitShares, compare_units,
                          covariate_matrix, resamples, smallest_permutation_p, units_of)
from .screentests import screen_tests, simes
from .shares import (PSEUDO, baseline_share, column_means, defined_baseline_share, log2_ratio, log2_share,
                     novelty, total_share, unit_means)


__all__ = ["PSEUDO", "SampleOptions", "baseline_share", "bh_qvalues", "case_program_table",
           "group_usage_table", "novelty", "total_share", "usage_shift_table"]

def bh_qvalues(p: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg q-values (:func:`scipy.stats.false_discovery_control`) of the
    finite p-values; NaN p-values stay NaN and are not counted."""
    p = np.asarray(p, dtype=float)
    q = np.full_like(p, np.nan)
    ok = np.isfinite(p)
    if ok.any():
        q[ok] = false_discovery_control(p[ok], method="bh")
    return q


def _design(options: SampleOptions, case_samples: list, control_samples: list) -> tuple:
    """The covariate columns of the case and control units (one design for both)."""
    if options.covariates is None:
        return None, None
    z = covariate_matrix(options.covariates.loc[list(case_samples) + list(control_samples)])
    return z[:len(case_samples)], z[len(case_samples):]


def _relabellings(options: SampleOptions, salt: int) -> Relabellings:
    return Relabellings(options.permutations or AUTO_PERMUTATIONS, np.random.SeedSequence([options.seed, salt]))


def _sample_test(case_shares, control_shares, case_labels, control_labels, options, alternative, salt) -> dict:
    """One sample-level comparison of every program: unit means, the test, and the counts.
    In a paired design, units whose pair lacks the other condition are left out first."""
    case_units, control_units = units_of(case_labels, options.min_cells), units_of(control_labels, options.min_cells)
    blocks = {}
    if options.pairs is not None:
        case_units, control_units = complete_pairs(case_units, control_units, options.pairs)
        blocks = {"case_blocks": options.pairs.loc[case_units.names].to_numpy(),
                  "control_blocks": options.pairs.loc[control_units.names].to_numpy()}
    case_means = unit_means(case_shares, case_units.index, len(case_units.names))
    control_means = unit_means(control_shares, control_units.index, len(control_units.names))
    case_z, control_z = _design(options, case_units.names, control_units.names)
    relabel = _relabellings(options, salt) if resamples(options, len(case_units.names),
                                                         len(control_units.names)) else None
    found = compare_units(log2_share(case_means), log2_share(control_means), case_z=case_z, control_z=control_z,
                          alternative=alternative, relabel=relabel, moderate=options.moderate, **blocks)
    found.update(case_units=case_units, control_units=control_units, case_means=case_means,
                 control_means=control_means,
                 smallest_p=smallest_permutation_p(alternative, n_case=len(case_units.names),
                                                   n_control=len(control_units.names), **blocks))
    return found


def complete_pairs(case_units, control_units, pairs: pd.Series):
    """The units of pairs that have both conditions (a pair without one cannot contrast them);
    the others move to ``dropped`` as ``"<unit> (pair <pair> incomplete)"``."""
    case_pairs = set(pairs.loc[case_units.names]) if case_units.names else set()
    control_pairs = set(pairs.loc[control_units.names]) if control_units.names else set()
    both = case_pairs & control_pairs
    return (_keep_units(case_units, [pairs[n] in both for n in case_units.names], pairs),
            _keep_units(control_units, [pairs[n] in both for n in control_units.names], pairs))


def _keep_units(units, keep, pairs):
    keep = np.asarray(keep, dtype=bool)
    if keep.all():
        return units
    new = np.full(len(keep) + 1, -1)
    new[:-1][keep] = np.arange(int(keep.sum()))
    dropped = dict(units.dropped)
    dropped.update({f"{n} (pair {pairs[n]} incomplete)": int(c)
                    for n, c, k in zip(units.names, units.n_cells, keep) if not k})
    return UnitShares(names=[n for n, k in zip(units.names, keep) if k], index=new[units.index],
                      n_cells=units.n_cells[keep], dropped=dropped)


def _unit_columns(table: pd.DataFrame, unit: str, test: str, n_control=None, n_case=None) -> None:
    """The columns saying how a table was tested; sample counts empty (NA) at the cell level."""
    table["test_unit"], table["test"] = unit, test
    for column, count in (("n_control_samples", n_control), ("n_case_samples", n_case)):
        values = np.broadcast_to(np.asarray(pd.NA if count is None else count, dtype=object), len(table))
        table[column] = pd.array(values, dtype="Int64")


def _test_name(options: SampleOptions | None, found: dict | None = None) -> str:
    """The test a table used: ``mann_whitney_u`` (cells), else ``welch_t`` / ``ols``, prefixed
    ``moderated_`` when a prior was fitted (``found``: the test's result, whose ``moderated``
    says so; a table of one or two programs has none)."""
    if options is None:
        return "mann_whitney_u"
    name = "ols" if options.covariates is not None or options.pairs is not None else "welch_t"
    moderated = options.moderate and (found is None or found.get("moderated", True))
    return f"moderated_{name}" if moderated else name


def _underpowered(found: dict, q_threshold: float) -> np.ndarray:
    """Rows whose design cannot support a call: fewer than 3 residual degrees of freedom
    before moderation, or no exact permutation p-value as small as ``q_threshold``."""
    df = np.asarray(found["df_residual"], dtype=np.float64)
    return ~(np.nan_to_num(df, nan=0.0) >= 3) | (found["smallest_p"] >= q_threshold)


def usage_shift_table(control_usage: np.ndarray, case_usage: np.ndarray, names: list[str], n_baseline: int,
                      q_threshold: float = 0.05, min_log2fc: float = 0.25, *, control_samples=None,
                      case_samples=None, options: SampleOptions | None = None,
                      record: dict | None = None) -> pd.DataFrame:
    """Per baseline program: does its usage share shift between control and case?

    With ``control_samples`` and ``case_samples`` (each cell's sample) the test is at the
    sample level, run as ``options`` say; else at the cell level.

    Columns: ``program``; ``control_share``, ``case_share`` (mean baseline share: over
    samples of each sample's mean, or over cells); ``log2_fold_change`` with ``ci_low``,
    ``ci_high`` (95%; sample level only); ``p_value`` (two-sided: Welch's t or OLS across
    samples, or Mann-Whitney U across cells; ``test`` names it); ``q_value`` (BH);
    ``permutation_p_value`` (sample level with few samples, else NaN); ``shift``
    (``up``/``down`` when ``q < q_threshold`` and ``|log2 FC| >= min_log2fc``, else
    ``none``); ``control_total_share``, ``case_total_share`` (mean total share);
    ``test_unit`` (``sample`` or ``cell``), ``test``, ``n_control_samples``,
    ``n_case_samples`` (empty at the cell level).
    """
    ctrl = defined_baseline_share(control_usage, n_baseline)
    case = defined_baseline_share(case_usage, n_baseline)
    ctrl_total, case_total = total_share(control_usage)[:, :n_baseline], total_share(case_usage)[:, :n_baseline]
    if control_samples is None:
        shares = column_means(ctrl), column_means(case)
        total_shares = ctrl_total.mean(axis=0), case_total.mean(axis=0)
        found = {"effect": log2_ratio(shares[1], shares[0]), "ci_low": np.nan, "ci_high": np.nan,
                 "p_value": mannwhitney_groups(case, np.zeros(len(case), int), 1, ctrl)[0],
                 "permutation_p_value": np.nan}
        counts = (None, None)
    else:
        options = options or SampleOptions()
        found = _sample_test(case, ctrl, np.asarray(case_samples), np.asarray(control_samples), options,
                             "two-sided", salt=1)
        units = found["control_units"], found["case_units"]
        shares = column_means(found["control_means"]), column_means(found["case_means"])
        total_shares = tuple(column_means(unit_means(total, u.index, len(u.names)))
                             for total, u in zip((ctrl_total, case_total), units))
        counts = (len(units[0].names), len(units[1].names))
    table = pd.DataFrame({"program": names[:n_baseline], "control_share": shares[0], "case_share": shares[1],
                          "log2_fold_change": found["effect"], "ci_low": found["ci_low"], "ci_high": found["ci_high"],
                          "p_value": found["p_value"]})
    table["q_value"] = bh_qvalues(table["p_value"])
    table["permutation_p_value"] = found["permutation_p_value"]
    called = (table["q_value"] < q_threshold) & (table["log2_fold_change"].abs() >= min_log2fc)
    table["shift"] = np.where(called, np.where(table["log2_fold_change"] > 0, "up", "down"), "none")
    table["control_total_share"], table["case_total_share"] = total_shares
    table["underpowered"] = False if control_samples is None else _underpowered(found, q_threshold)
    _unit_columns(table, "cell" if control_samples is None else "sample",
                  _test_name(None if control_samples is None else options, found), *counts)
    if record is not None and "prior" in found:
        record["usage_shift"] = found["prior"]
    return table


def case_program_table(control_usage: np.ndarray, case_usage: np.ndarray, names: list[str], n_baseline: int,
                       programs: np.ndarray, scores: np.ndarray, labels, share_threshold: float = 0.1,
                       q_threshold: float = 0.05, min_log2fc: float = 1.0, n_top: int = 10, *,
                       control_samples=None, case_samples=None, options: SampleOptions | None = None,
                       record: dict | None = None) -> pd.DataFrame:
    """Per case program: how many case cells use it, how strongly, and is it case-specific?

    ``control_usage`` must be the control cells' usage of **all** programs (baseline and
    case, e.g. NNLS on the final programs): a case program that the controls use just as
    much is not case-specific. A cell *uses* a program when its total share is at least
    ``share_threshold``. ``programs`` (genes x programs) give the cosine to the closest
    baseline program; ``scores`` (genes x programs, the specificity of
    :func:`~deltanmf.tl.programs.specificity`) rank each program's ``n_top`` genes, named by
    ``labels`` (symbols or IDs, one per gene). Samples and ``options`` as for
    :func:`usage_shift_table`.

    Columns: ``program``, ``case_fraction_using``, ``control_fraction_using`` (of cells),
    ``case_mean_share``, ``control_mean_share`` (mean total share, over samples or
    cells), ``mean_share_when_used`` (over the using case cells), ``log2_fold_change``,
    ``ci_low``, ``ci_high``, ``p_value`` (one-sided, case > control), ``q_value``,
    ``permutation_p_value``, ``emergent`` (``q < q_threshold`` and log2 FC >=
    ``min_log2fc``), ``closest_baseline`` and ``cosine_to_closest_baseline``,
    ``top_genes`` (";"-joined), ``test_unit``, ``test``, ``n_control_samples``,
    ``n_case_samples``.
    """
    ctrl = total_share(control_usage)[:, n_baseline:]
    case = total_share(case_usage)[:, n_baseline:]
    case_names = names[n_baseline:]
    used = case >= share_threshold
    table = pd.DataFrame({
        "program": case_names,
        "case_fraction_using": used.mean(axis=0) if len(case) else np.nan,
        "control_fraction_using": (ctrl >= share_threshold).mean(axis=0) if len(ctrl) else np.nan,
    })
    if control_samples is None:
        table["case_mean_share"], table["control_mean_share"] = case.mean(axis=0), ctrl.mean(axis=0)
        found = {"effect": log2_ratio(table["case_mean_share"], table["control_mean_share"]),
                 "ci_low": np.nan, "ci_high": np.nan, "permutation_p_value": np.nan,
                 "p_value": mannwhitney_groups(case, np.zeros(len(case), int), 1, ctrl, "greater")[0]}
        counts = (None, None)
    else:
        options = options or SampleOptions()
        found = _sample_test(case, ctrl, np.asarray(case_samples), np.asarray(control_samples), options,
                             "greater", salt=2)
        table["case_mean_share"] = column_means(found["case_means"])
        table["control_mean_share"] = column_means(found["control_means"])
        counts = (len(found["control_units"].names), len(found["case_units"].names))
    table["mean_share_when_used"] = [case[used[:, j], j].mean() if used[:, j].any() else 0.0
                                     for j in range(case.shape[1])]
    table["log2_fold_change"] = found["effect"]
    table["ci_low"], table["ci_high"], table["p_value"] = found["ci_low"], found["ci_high"], found["p_value"]
    table["q_value"] = bh_qvalues(table["p_value"])
    table["permutation_p_value"] = found["permutation_p_value"]
    table["emergent"] = (table["q_value"] < q_threshold) & (table["log2_fold_change"] >= min_log2fc)
    cos = cosine_matrix(programs[:, :n_baseline], programs[:, n_baseline:])
    table["closest_baseline"] = [names[i] for i in cos.argmax(axis=0)] if n_baseline else ""
    table["cosine_to_closest_baseline"] = cos.max(axis=0) if n_baseline else np.nan
    table["top_genes"] = top_gene_labels(np.asarray(scores)[:, n_baseline:], labels, n_top)
    table["underpowered"] = False if control_samples is None else _underpowered(found, q_threshold)
    _unit_columns(table, "cell" if control_samples is None else "sample",
                  _test_name(None if control_samples is None else options, found), *counts)
    if record is not None and "prior" in found:
        record["case_programs"] = found["prior"]
    return table


GROUP_COLUMNS = ["group", "program", "program_kind", "n_cells", "share", "control_share", "log2_fold_change",
                 "ci_low", "ci_high", "p_value", "q_value", "permutation_p_value", "group_p_value", "group_q_value",
                 "stagewise_q_value", "called", "test_unit", "test", "n_control_samples", "n_case_samples"]


def group_usage_table(usage: np.ndarray, groups, is_control: np.ndarray, names: list[str],
                      n_baseline: int, q_threshold: float = 0.05, min_log2fc: float = 0.25,
                      emergence_log2fc: float = 1.0, *, samples=None, options: SampleOptions | None = None,
                      record: dict | None = None) -> pd.DataFrame:
    """Per perturbation group (among case cells) and program: share, shift against control, q-value.

    A long table, one row per group x program, so thousands of perturbations fit in one
    file. Baseline programs use the baseline share, case programs the total share
    (``program_kind``). Each group is compared (two-sided for baseline programs; one-sided,
    group above control, for case programs, as in ``case_programs``) with

    - all control cells (Mann-Whitney U across cells), or
    - with ``samples`` (each cell's sample): the control samples, in one weighted linear
      model per program over all units (one sample's cells of one group form a unit, e.g.
      one guide of a target gene) with each group's variance moderated across groups
      (:mod:`deltanmf.tl.screentests`; ``options.moderate``, ``options.covariates``).
      ``record`` (a dict), when given, receives the model's estimates and the
      negative-control check (``options.negative_controls``).

    ``q_value`` is BH over the whole table (row level). Calls are stage-wise
    (:func:`stagewise_qvalues`): ``group_p_value`` combines a group's programs (Simes),
    ``group_q_value`` is BH over groups (which groups do anything), and within the groups
    it selects, ``stagewise_q_value`` says which programs. ``called`` marks
    ``stagewise_q_value < q_threshold`` with ``|log2 FC| >= min_log2fc`` for baseline
    programs, and with ``log2 FC >= emergence_log2fc`` for case programs (a case program
    barely used in a group is not called there); at the sample level a group needs 2 units
    for a call. Row-level BH alone controls the share of false *rows*, and a screen's
    question is which *targets*: false rows fall on as many null targets, while true
    targets' calls cluster on few.

    Columns: ``group``, ``program``, ``program_kind``, ``n_cells`` (the group's cells),
    ``share`` and ``control_share`` (mean share, over units or cells),
    ``log2_fold_change``, ``ci_low``, ``ci_high``, ``p_value``, ``q_value``,
    ``permutation_p_value`` (NaN: the group tests report none), ``group_p_value``,
    ``group_q_value``, ``stagewise_q_value``, ``called``, ``test_unit``, ``test``, ``n_control_samples``,
    ``n_case_samples`` (the group's units).
    """
    groups = np.asarray(groups).astype(str)
    is_control = np.asarray(is_control, dtype=bool)
    shares = np.hstack([defined_baseline_share(usage, n_baseline), total_share(usage)[:, n_baseline:]])
    kinds = np.array(["baseline"] * n_baseline + ["case"] * (len(names) - n_baseline))
    codes, group_names = pd.factorize(groups[~is_control])  # groups in order of first appearance
    n_groups, n_programs = len(group_names), len(names)
    if n_groups == 0:
        return pd.DataFrame(columns=GROUP_COLUMNS)
    case, control = shares[~is_control], shares[is_control]
    n_cells = np.bincount(codes, minlength=n_groups)
    enough = np.ones(n_groups, dtype=bool)
    if samples is None:
        share, control_share = unit_means(case, codes, n_groups), np.tile(column_means(control), (n_groups, 1))
        effect = log2_ratio(share, control_share)
        ci_low = ci_high = np.full((n_groups, n_programs), np.nan)
        p = mannwhitney_groups(case, codes, n_groups, control, "two-sided")
        p[:, n_baseline:] = mannwhitney_groups(case[:, n_baseline:], codes, n_groups, control[:, n_baseline:],
                                               "greater")
        n_case_units, n_control_units = [None] * n_groups, None
    else:
        options = options or SampleOptions()
        found, screen = screen_tests(shares, codes, n_groups, is_control, samples, options, names, kinds)
        screen["left_out"] = {(group_names[g], s): n for (g, s), n in screen["left_out"].items()}
        if record is not None:
            record.update(screen)
        share, control_share, effect = found["share"], found["control_share"], found["effect"]
        ci_low, ci_high, p = found["ci_low"], found["ci_high"], found["p_value"]
        n_case_units, n_control_units = found["n_units"], found["n_control_units"]
        enough = n_case_units >= 2
    table = pd.DataFrame({
        "group": np.repeat(np.asarray(group_names, dtype=object), n_programs),
        "program": np.tile(np.asarray(names, dtype=object), n_groups),
        "program_kind": np.tile(kinds, n_groups),
        "n_cells": np.repeat(n_cells, n_programs),
        "share": share.ravel(), "control_share": control_share.ravel(), "log2_fold_change": effect.ravel(),
        "ci_low": ci_low.ravel(), "ci_high": ci_high.ravel(), "p_value": p.ravel(),
    })
    table["q_value"] = bh_qvalues(table["p_value"])
    table["permutation_p_value"] = np.nan
    combined = simes(p)
    group_q = bh_qvalues(combined)
    table["group_p_value"] = np.repeat(combined, n_programs)
    table["group_q_value"] = np.repeat(group_q, n_programs)
    table["stagewise_q_value"] = stagewise_qvalues(p, group_q, q_threshold).ravel()
    fc = table["log2_fold_change"]
    strong = np.where(table["program_kind"] == "case", fc >= emergence_log2fc, fc.abs() >= min_log2fc)
    table["called"] = (table["stagewise_q_value"] < q_threshold) & strong & np.repeat(enough, n_programs)
    _unit_columns(table, "cell" if samples is None else "sample",
                  "mann_whitney_u" if samples is None else screen["test"],
                  n_control_units, np.repeat(n_case_units, n_programs) if samples is not None else None)
    return table[GROUP_COLUMNS]


def stagewise_qvalues(p: np.ndarray, group_q: np.ndarray, level: float) -> np.ndarray:
    """Within-group q-values of a stage-wise procedure (groups x programs; NaN outside the
    selected groups).

    Screening selects the groups with ``group_q < level`` (BH over the groups' Simes
    p-values); confirmation applies BH within each selected group at level ``level * R / G``
    (R selected of G groups), as Benjamini and Bogomolov (2014) and stageR (Van den Berge et
    al. 2017) do. Reported on the ``level`` scale: the within-group BH q-value times ``G / R``,
    so ``stagewise_q < level`` is the call. The share of false groups among those selected
    is controlled at ``level``, and so is the average share of false programs within them.
    """
    p = np.asarray(p, dtype=np.float64)
    out = np.full(p.shape, np.nan)
    selected = np.flatnonzero(np.nan_to_num(group_q, nan=1.0) < level)
    if not len(selected):
        return out
    inflate = np.isfinite(group_q).sum() / len(selected)  # G: the groups BH was over
    for g in selected:
        out[g] = np.minimum(bh_qvalues(p[g]) * inflate, 1.0)
    return out
