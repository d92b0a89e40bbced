"""Case-control statistics of a two-stage fit: shifted usage and emerging programs.

All functions take usage matrices (cells x programs, baseline programs first) and return
pandas tables. Two kinds of share are used:

- *baseline share*: a baseline program's usage over the cell's total **baseline** usage.
  Case programs taking part of a case cell's usage therefore do not read as a drop of
  every baseline program; this is the share the shift test uses. A cell with no
  baseline usage at all has no baseline composition and is left out of those means
  and tests (its share is NaN there).
- *total share*: a program's usage over the cell's total usage (all programs); used for
  case programs and reported beside the baseline share.

Fold changes are ``log2((mean_case + eps) / (mean_control + eps))`` with ``eps = 1e-3``
(shares live in [0, 1]); p-values are Mann-Whitney U tests; q-values are
Benjamini-Hochberg over the programs of one table.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.stats import false_discovery_control, mannwhitneyu

from ..core.metrics import cosine_matrix
from ..settings import ReportSettings

PSEUDO = 1e-3


def bh_qvalues(p: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg q-values (:func:`scipy.stats.false_discovery_control`) of the
    finite p-values; NaN p-values stay NaN and are not counted."""
    p = np.asarray(p, dtype=float)
    q = np.full_like(p, np.nan)
    ok = np.isfinite(p)
    if ok.any():
        q[ok] = false_discovery_control(p[ok], method="bh")
    return q


def _share(usage: np.ndarray, columns: slice | None = None) -> np.ndarray:
    usage = np.asarray(usage, dtype=np.float64)
    part = usage if columns is None else usage[:, columns]
    total = part.sum(axis=1, keepdims=True)
    return np.divide(part, total, out=np.zeros_like(part), where=total > 0)


def baseline_share(usage: np.ndarray, n_baseline: int) -> np.ndarray:
    """Each baseline program's share of the cell's baseline usage (cells x K)."""
    return _share(usage, slice(0, n_baseline))


def total_share(usage: np.ndarray) -> np.ndarray:
    """Each program's share of the cell's total usage (cells x all programs)."""
    return _share(usage)


def novelty(usage: np.ndarray, n_baseline: int) -> np.ndarray:
    """Per cell, the share of its usage that comes from case programs."""
    return total_share(usage)[:, n_baseline:].sum(axis=1)


def _log2fc(case_mean, control_mean):
    return np.log2((np.asarray(case_mean) + PSEUDO) / (np.asarray(control_mean) + PSEUDO))


def _defined_baseline_share(usage: np.ndarray, n_baseline: int) -> np.ndarray:
    """Baseline share with NaN rows for cells without any baseline usage."""
    share = baseline_share(usage, n_baseline)
    share[np.asarray(usage)[:, :n_baseline].sum(axis=1) <= 0] = np.nan
    return share


def _mwu(case: np.ndarray, control: np.ndarray, alternative: str) -> np.ndarray:
    """Column-wise Mann-Whitney U p-values over the non-NaN cells of each column; NaN where
    a group is empty or the column is constant in both groups."""
    p = np.full(case.shape[1], np.nan)
    for j in range(case.shape[1]):
        a, b = case[:, j], control[:, j]
        a, b = a[~np.isnan(a)], b[~np.isnan(b)]
        if len(a) and len(b) and np.ptp(np.concatenate([a, b])) > 0:
            p[j] = mannwhitneyu(a, b, alternative=alternative, method="asymptotic").pvalue
    return p


def _mean(x: np.ndarray) -> np.ndarray:
    """Column means over the non-NaN cells (NaN for a column without any)."""
    count = (~np.isnan(x)).sum(axis=0)
    return np.divide(np.nansum(x, axis=0), count, out=np.full(x.shape[1], np.nan), where=count > 0)


def usage_shift_table(control_usage: np.ndarray, case_usage: np.ndarray, names: list[str], n_baseline: int,
                      q_threshold: float = 0.05, min_log2fc: float = 0.25) -> pd.DataFrame:
    """Per baseline program: does its usage share shift between control and case cells?

    Columns: ``program``, ``control_share``, ``case_share`` (mean baseline share),
    ``log2_fold_change``, ``p_value`` (two-sided Mann-Whitney U on the baseline share),
    ``q_value`` (BH), ``control_total_share``, ``case_total_share`` (mean total share),
    ``shift`` (``up``/``down`` when ``q < q_threshold`` and ``|log2 FC| >= min_log2fc``,
    else ``none``).
    """
    ctrl = _defined_baseline_share(control_usage, n_baseline)
    case = _defined_baseline_share(case_usage, n_baseline)
    table = pd.DataFrame({"program": names[:n_baseline], "control_share": _mean(ctrl), "case_share": _mean(case)})
    table["log2_fold_change"] = _log2fc(table["case_share"], table["control_share"])
    table["p_value"] = _mwu(case, ctrl, "two-sided")
    table["q_value"] = bh_qvalues(table["p_value"])
    table["control_total_share"] = total_share(control_usage)[:, :n_baseline].mean(axis=0)
    table["case_total_share"] = total_share(case_usage)[:, :n_baseline].mean(axis=0)
    called = (table["q_value"] < q_threshold) & (table["log2_fold_change"].abs() >= min_log2fc)
    table["shift"] = np.where(called, np.where(table["log2_fold_change"] > 0, "up", "down"), "none")
    return table


def case_program_table(control_usage: np.ndarray, case_usage: np.ndarray, names: list[str], n_baseline: int,
                       programs: np.ndarray, genes, symbols=None, share_threshold: float = 0.1,
                       q_threshold: float = 0.05, min_log2fc: float = 1.0, n_top: int = 10) -> pd.DataFrame:
    """Per case program: how many case cells use it, how strongly, and is it case-specific?

    ``control_usage`` must be the control cells' usage of **all** programs (baseline and
    case, e.g. NNLS on the final programs): a case program that the controls use just as
    much is not case-specific. A cell *uses* a program when its total share is at least
    ``share_threshold``.

    Columns: ``program``, ``case_fraction_using``, ``control_fraction_using``,
    ``case_mean_share``, ``control_mean_share``, ``mean_share_when_used``,
    ``log2_fold_change``, ``p_value`` (one-sided Mann-Whitney U, case > control),
    ``q_value``, ``emergent`` (``q < q_threshold`` and log2 FC >= ``min_log2fc``),
    ``closest_baseline`` and ``cosine_to_closest_baseline``, ``top_genes`` (";"-joined).
    """
    ctrl = total_share(control_usage)[:, n_baseline:]
    case = total_share(case_usage)[:, n_baseline:]
    case_names = names[n_baseline:]
    used = case >= share_threshold
    table = pd.DataFrame({
        "program": case_names,
        "case_fraction_using": used.mean(axis=0) if len(case) else np.nan,
        "control_fraction_using": (ctrl >= share_threshold).mean(axis=0) if len(ctrl) else np.nan,
        "case_mean_share": case.mean(axis=0),
        "control_mean_share": ctrl.mean(axis=0),
        "mean_share_when_used": [case[used[:, j], j].mean() if used[:, j].any() else 0.0
                                 for j in range(case.shape[1])],
    })
    table["log2_fold_change"] = _log2fc(table["case_mean_share"], table["control_mean_share"])
    table["p_value"] = _mwu(case, ctrl, "greater")
    table["q_value"] = bh_qvalues(table["p_value"])
    table["emergent"] = (table["q_value"] < q_threshold) & (table["log2_fold_change"] >= min_log2fc)
    cos = cosine_matrix(programs[:, :n_baseline], programs[:, n_baseline:])
    table["closest_baseline"] = [names[i] for i in cos.argmax(axis=0)] if n_baseline else ""
    table["cosine_to_closest_baseline"] = cos.max(axis=0) if n_baseline else np.nan
    labels = np.asarray(symbols if symbols is not None else genes).astype(str)
    table["top_genes"] = [";".join(labels[np.argsort(-programs[:, n_baseline + j], kind="stable")[:n_top]])
                          for j in range(len(case_names))]
    return table


def group_usage_table(usage: np.ndarray, groups, is_control: np.ndarray, names: list[str],
                      n_baseline: int, q_threshold: float = 0.05, min_log2fc: float = 0.25,
                      emergence_log2fc: float = 1.0) -> pd.DataFrame:
    """Per perturbation group (among case cells) and program: share, shift against control, q-value.

    A long table, one row per group x program, so hundreds of perturbations fit in one
    file. Baseline programs use the baseline share, case programs the total share
    (see ``program_kind``). p-values are two-sided Mann-Whitney U of the group's cells against
    all control cells; q-values are BH over the whole table. ``called`` marks
    ``q < q_threshold`` with ``|log2 FC| >= min_log2fc`` for baseline programs, and with
    ``log2 FC >= emergence_log2fc`` for case programs (as for ``case_program_table``: a
    case program barely used in a group is not called there).
    """
    groups = np.asarray(groups).astype(str)
    is_control = np.asarray(is_control, dtype=bool)
    shares = np.hstack([_defined_baseline_share(usage, n_baseline), total_share(usage)[:, n_baseline:]])
    kinds = ["baseline"] * n_baseline + ["case"] * (len(names) - n_baseline)
    control = shares[is_control]
    rows = []
    for group in pd.unique(groups[~is_control]):
        members = shares[(groups == group) & ~is_control]
        p = _mwu(members, control, "two-sided")
        share, control_share = _mean(members), _mean(control)
        for j, name in enumerate(names):
            rows.append({"group": group, "program": name, "program_kind": kinds[j], "n_cells": len(members),
                         "share": share[j], "control_share": control_share[j], "p_value": p[j]})
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    table["log2_fold_change"] = _log2fc(table["share"], table["control_share"])
    table["q_value"] = bh_qvalues(table["p_value"])
    fc = table["log2_fold_change"]
    strong = np.where(table["program_kind"] == "case", fc >= emergence_log2fc, fc.abs() >= min_log2fc)
    table["called"] = (table["q_value"] < q_threshold) & strong
    return table[["group", "program", "program_kind", "n_cells", "share", "control_share", "log2_fold_change",
                  "p_value", "q_value", "called"]]


def case_control_tables(prepared, programs: np.ndarray, names: list[str], n_baseline: int, report: ReportSettings, *,
                        group_key: str | None, symbol_key: str | None, batch_size: int | None, nnls_iterations: int,
                        device) -> tuple[dict[str, pd.DataFrame], np.ndarray]:
    """``usage_shift``, ``case_programs`` and (with ``group_key``) ``group_usage``, from usage
    refitted by NNLS on all programs for every cell of ``prepared`` (a
    :class:`~deltanmf.data.PreparedData`), on ``device``, so that controls and cases are
    measured the same way. Returns the tables and that usage (cells x programs)."""
    import torch

    from ..core import CellMatrix, refit_usage

    matrix = CellMatrix(prepared.X, batch_size=batch_size, device=device)
    refit = refit_usage(matrix, torch.from_numpy(programs), nnls_iterations).cpu().numpy()
    ctrl, case = refit[prepared.is_control], refit[~prepared.is_control]
    symbols = prepared.var[symbol_key].to_numpy() if symbol_key and symbol_key in prepared.var else None
    tables = {
        "usage_shift": usage_shift_table(ctrl, case, names, n_baseline, report.q_threshold, report.min_log2fc),
        "case_programs": case_program_table(ctrl, case, names, n_baseline, programs, prepared.var.index, symbols,
                                            report.share_threshold, report.q_threshold, report.emergence_log2fc),
    }
    if group_key:
        tables["group_usage"] = group_usage_table(refit, prepared.obs[group_key].to_numpy(), prepared.is_control,
                                                  names, n_baseline, report.q_threshold, report.min_log2fc,
                                                  report.emergence_log2fc)
    return tables, refit
