"""The case-control tables of a run: usage refitted for every cell, then the two-condition
tables, the per-group and per-cell-type tables and the program annotation, in the design
the settings give (samples, pairs, covariates; :mod:`deltanmf.tl.samples`).
"""
from __future__ import annotations

import logging
import time

import numpy as np
import pandas as pd

from ..settings import ReportSettings
from .casecontrol import (_sample_test, _test_name, _underpowered, _unit_columns, bh_qvalues, case_program_table,
                          group_usage_table, usage_shift_table)
from .celltests import mannwhitney_groups
from .samples import sample_options
from .sampletests import units_of
from .shares import column_means, defined_baseline_share, log2_ratio, total_share

log = logging.getLogger(__name__)

CELL_WARNING = ("statistics at the cell level: p-values treat cells as independent replicates and overstate the "
                "evidence when cells come from few samples (donors, guides); set data.sample_key (the Python API's "
                "sample_key=) to the .obs column of the replicate unit to test across samples")



def _log_left_out(what: str, dropped: dict, min_cells: int) -> None:
    if dropped:
        listed = ", ".join(f"{k} ({n} cells)" for k, n in list(dropped.items())[:5])
        log.info("%s left out of the sample-level tests (fewer than report.min_cells_per_sample=%d cells): %d: %s%s",
                 what, min_cells, len(dropped), listed, " ..." if len(dropped) > 5 else "")


def case_control_tables(prepared, programs: np.ndarray, names: list[str], n_baseline: int, report: ReportSettings, *,
                        scores: np.ndarray, group_key: str | None, symbol_key: str | None, batch_size: int | None,
                        nnls_iterations: int, device, sample_key: str | None = None, seed: int = 0,
                        pair_key: str | None = None, celltype_key: str | None = None
                        ) -> tuple[dict[str, pd.DataFrame], np.ndarray, dict]:
    """The case-control tables, from usage refitted by NNLS on all programs for every cell of
    ``prepared`` (a :class:`~deltanmf.data.PreparedData`), on ``device``, so that controls and
    cases are measured the same way.

    ``usage_shift`` and ``case_programs`` always (``scores`` rank the case programs' top
    genes, :func:`~deltanmf.tl.casecontrol.case_program_table`); ``group_usage`` with
    ``group_key``; ``celltype_shift`` with ``celltype_key`` (each cell type's cases against
    the same type's controls, :func:`celltype_shift_table`); ``program_annotation`` with
    ``report.annotate_key``. With ``sample_key`` or ``pair_key`` the tables test at the
    sample level (``report.covariates``, ``report.permutations``,
    ``report.min_cells_per_sample``, ``report.moderate``; ``pair_key`` a paired design;
    ``seed`` seeds the relabellings); without, at the cell level, with one warning.

    Returns the tables, that usage (cells x programs) and a record for ``metrics.json``
    (``group_tests``: the screen model and the negative-control check, whose p-values are the
    table ``negative_controls``; ``moderation``: the two-condition tables' priors; the
    ``timings`` of the refit and the tables)."""
    import torch

    from ..core import CellMatrix, refit_usage

    began = time.perf_counter()
    matrix = CellMatrix(prepared.X, batch_size=batch_size, device=device)
    refit = refit_usage(matrix, torch.from_numpy(programs), nnls_iterations).cpu().numpy()
    refitted = time.perf_counter()
    is_control = prepared.is_control
    ctrl, case = refit[is_control], refit[~is_control]
    labels = prepared.var[symbol_key].to_numpy() if symbol_key and symbol_key in prepared.var else prepared.var.index
    samples, options, by_sample = None, None, {}
    if sample_key or pair_key:
        samples, options = sample_options(prepared.obs, sample_key, report.covariates, report.permutations,
                                          report.min_cells_per_sample, seed, report.moderate,
                                          report.negative_controls, pair_key=pair_key, is_control=is_control)
        by_sample = {"control_samples": samples[is_control], "case_samples": samples[~is_control], "options": options}
        what = f"data.sample_key={sample_key!r}" if sample_key else f"data.pair_key={pair_key!r} halves"
        for side, mask in (("control", is_control), ("case", ~is_control)):
            units = units_of(samples[mask], options.min_cells)
            _log_left_out(f"{side} samples", units.dropped, options.min_cells)
            log.info("%s: %d samples (%s) in the tests", side, len(units.names), what)
    else:
        log.warning(CELL_WARNING)
    moderation: dict = {}
    tables = {
        "usage_shift": usage_shift_table(ctrl, case, names, n_baseline, report.q_threshold, report.min_log2fc,
                                         record=moderation, **by_sample),
        "case_programs": case_program_table(ctrl, case, names, n_baseline, programs, scores, labels,
                                            report.share_threshold, report.q_threshold, report.emergence_log2fc,
                                            record=moderation, **by_sample),
    }
    if options is not None and options.pairs is not None:
        _log_incomplete_pairs(samples, is_control, options)
    record: dict = {}
    if moderation:
        record["moderation"] = moderation
    if group_key:
        groups = prepared.obs[group_key].to_numpy()
        _warn_shared_groups(groups, is_control, group_key, celltype_key)
        tables["group_usage"] = group_usage_table(refit, groups, is_control, names, n_baseline, report.q_threshold,
                                                  report.min_log2fc, report.emergence_log2fc, samples=samples,
                                                  options=options, record=record)
        if samples is not None:
            _log_left_out("group units (group, sample)", record.pop("left_out"), options.min_cells)
            _log_screen(record, report.q_threshold)
            null_p = record.pop("negative_control_p")
            if null_p is not None:
                kinds = ["baseline"] * n_baseline + ["case"] * (len(names) - n_baseline)
                tables["negative_controls"] = pd.DataFrame({
                    "set": np.repeat(np.arange(len(null_p)), len(names)),
                    "program": np.tile(np.asarray(names, dtype=object), len(null_p)),
                    "program_kind": np.tile(np.asarray(kinds, dtype=object), len(null_p)),
                    "p_value": null_p.ravel()})
    if celltype_key:
        tables["celltype_shift"] = celltype_shift_table(
            refit, prepared.obs[celltype_key].to_numpy(), is_control, names, n_baseline, report.q_threshold,
            report.min_log2fc, report.emergence_log2fc, samples=samples, options=options)
    if report.annotate_key:
        tables["program_annotation"] = program_annotation(refit, prepared.obs[report.annotate_key].to_numpy(), names)
    record["timings"] = {"refit": refitted - began, "tables": time.perf_counter() - refitted}
    return tables, refit, record


CELLTYPE_COLUMNS = ["celltype", "program", "program_kind", "n_control_cells", "n_case_cells", "control_share",
                    "share", "log2_fold_change", "ci_low", "ci_high", "p_value", "q_value", "permutation_p_value",
                    "called", "underpowered", "test_unit", "test", "n_control_samples", "n_case_samples"]


def celltype_shift_table(usage: np.ndarray, celltypes, is_control: np.ndarray, names: list[str], n_baseline: int,
                         q_threshold: float = 0.05, min_log2fc: float = 0.25, emergence_log2fc: float = 1.0, *,
                         samples=None, options=None) -> pd.DataFrame:
    """Per cell type and program: does the program's share shift between the type's control
    cells and its case cells? Each cell type's cases are compared with the *same* type's
    controls, so cell identity does not read as an effect.

    Baseline programs use the baseline share and are tested two-sided; case programs the
    total share, one-sided (case above control). At the sample level a unit is one sample's
    cells of the type (paired, covariates and moderation as ``options`` say; moderation
    across the type's programs); else Mann-Whitney U across cells. q-values are BH over cell
    type x program; ``called`` as in ``group_usage`` (``min_log2fc`` for baseline programs,
    ``emergence_log2fc`` for case programs); ``underpowered`` as in ``usage_shift``.

    Columns: ``celltype``, ``program``, ``program_kind``, ``n_control_cells``,
    ``n_case_cells``, ``control_share``, ``share`` (the case cells'), ``log2_fold_change``,
    ``ci_low``, ``ci_high``, ``p_value``, ``q_value``, ``permutation_p_value``, ``called``,
    ``underpowered``, ``test_unit``, ``test``, ``n_control_samples``, ``n_case_samples``.
    """
    celltypes = np.asarray(celltypes).astype(str)
    is_control = np.asarray(is_control, dtype=bool)
    shares = np.hstack([defined_baseline_share(usage, n_baseline), total_share(usage)[:, n_baseline:]])
    kinds = np.array(["baseline"] * n_baseline + ["case"] * (len(names) - n_baseline))
    parts = []
    for celltype in sorted(set(celltypes)):
        control, case = is_control & (celltypes == celltype), ~is_control & (celltypes == celltype)
        if not control.any() or not case.any():
            log.info("celltype_shift: %r has %d control and %d case cells; left out (a contrast needs both)",
                     celltype, int(control.sum()), int(case.sum()))
            continue
        row = {"celltype": celltype, "program": names, "program_kind": kinds, "n_control_cells": int(control.sum()),
               "n_case_cells": int(case.sum())}
        if samples is None:
            found = {"control_share": column_means(shares[control]), "share": column_means(shares[case])}
            found["log2_fold_change"] = log2_ratio(found["share"], found["control_share"])
            p = mannwhitney_groups(shares[case], np.zeros(int(case.sum()), int), 1, shares[control])[0]
            p[n_baseline:] = mannwhitney_groups(shares[case][:, n_baseline:], np.zeros(int(case.sum()), int), 1,
                                                shares[control][:, n_baseline:], "greater")[0]
            found.update(ci_low=np.nan, ci_high=np.nan, p_value=p, permutation_p_value=np.nan, underpowered=False)
            counts, test = (None, None), _test_name(None)
        else:
            found, counts, moderated = _celltype_samples(shares, case, control, samples, options, n_baseline,
                                                         q_threshold)
            test = _test_name(options, {"moderated": moderated})
        frame = pd.DataFrame({**row, **found})
        _unit_columns(frame, "cell" if samples is None else "sample", test, *counts)
        parts.append(frame)
    if not parts:
        return pd.DataFrame(columns=CELLTYPE_COLUMNS)
    table = pd.concat(parts, ignore_index=True)
    untested = table.groupby("celltype")["p_value"].apply(lambda p: p.isna().all())
    if untested.any():
        log.info("celltype_shift: %s not tested (fewer than 2 units, or complete pairs, of at least "
                 "report.min_cells_per_sample cells in a condition); their rows have no p-value",
                 ", ".join(untested.index[untested]))
    table["q_value"] = bh_qvalues(table["p_value"])
    fc = table["log2_fold_change"]
    strong = np.where(table["program_kind"] == "case", fc >= emergence_log2fc, fc.abs() >= min_log2fc)
    table["called"] = (table["q_value"] < q_threshold) & strong
    return table[CELLTYPE_COLUMNS]


def _celltype_samples(shares, case, control, samples, options, n_baseline, q_threshold) -> tuple[dict, tuple]:
    """One cell type at the sample level: baseline programs two-sided, case programs one-sided."""
    out = {key: np.full(shares.shape[1], np.nan) for key in ("control_share", "share", "log2_fold_change", "ci_low",
                                                             "ci_high", "p_value", "permutation_p_value")}
    out["underpowered"] = np.ones(shares.shape[1], dtype=bool)
    counts, moderated = (0, 0), False
    for columns, alternative, salt in ((slice(0, n_baseline), "two-sided", 4), (slice(n_baseline, None), "greater", 5)):
        if columns.stop == 0 or shares[:, columns].shape[1] == 0:
            continue
        found = _sample_test(shares[case][:, columns], shares[control][:, columns], samples[case], samples[control],
                             options, alternative, salt)
        out["control_share"][columns] = column_means(found["control_means"])
        out["share"][columns] = column_means(found["case_means"])
        out["log2_fold_change"][columns] = found["effect"]
        for key in ("ci_low", "ci_high", "p_value", "permutation_p_value"):
            out[key][columns] = found[key]
        out["underpowered"][columns] = _underpowered(found, q_threshold)
        counts = (len(found["control_units"].names), len(found["case_units"].names))
        moderated |= bool(found.get("moderated", False))
    return out, counts, moderated


def program_annotation(usage: np.ndarray, categories, names: list[str]) -> pd.DataFrame:
    """Mean total share of each program per category of an ``.obs`` column (``report.annotate_key``,
    e.g. the cell type), over every cell: which cells use which program. One row per
    category (``category``, ``n_cells``, then one column per program), categories in order."""
    categories = pd.Series(np.asarray(categories)).astype(str)
    shares = pd.DataFrame(total_share(usage), columns=names)
    table = shares.groupby(categories.to_numpy(), sort=True).mean()
    table.insert(0, "n_cells", categories.value_counts().reindex(table.index).to_numpy())
    return table.rename_axis("category").reset_index()


def _warn_shared_groups(groups, is_control: np.ndarray, group_key: str, celltype_key: str | None) -> None:
    """A group held by both control and case cells is a cell-type-like column: its cases are
    compared with *all* controls, so cell identity reads as an effect."""
    groups = np.asarray(groups).astype(str)
    shared = np.intersect1d(groups[is_control], groups[~is_control])
    if len(shared):
        log.warning("data.group_key=%r: %d values are held by both control and case cells (%s): each group's cases "
                    "are compared with all control cells, so what sets the group apart (a cell type) reads as an "
                    "effect. For cell types use data.celltype_key=%s (each type's cases against the same type's "
                    "controls)", group_key, len(shared), ", ".join(map(repr, shared[:3])) +
                    (" ..." if len(shared) > 3 else ""), celltype_key or group_key)


def _log_incomplete_pairs(samples: np.ndarray, is_control: np.ndarray, options) -> None:
    from .casecontrol import complete_pairs

    case_units = units_of(samples[~is_control], options.min_cells)
    control_units = units_of(samples[is_control], options.min_cells)
    case_units, control_units = complete_pairs(case_units, control_units, options.pairs)
    dropped = {k: v for side in (case_units, control_units) for k, v in side.dropped.items() if "incomplete" in k}
    if dropped:
        log.info("paired design: %d samples left out, their pair lacking the other condition: %s", len(dropped),
                 ", ".join(list(dropped)[:5]) + (" ..." if len(dropped) > 5 else ""))
    log.info("paired design: %d pairs with both conditions in the tests",
             len(set(options.pairs.loc[case_units.names])))


def _log_screen(record: dict, q_threshold: float) -> None:
    """The group tests' model and the negative-control check, in the log."""
    check = record["negative_controls"]
    if not check["ran"]:
        log.info("negative-control check not run: %s", check["reason"])
        return
    below = {level: (value if value is not None else float("nan")) for level, value in check["fraction_below"].items()}
    log.info("negative-control check: %d sets of %d control units (%d cells each) tested as targets; p < 0.05: "
             "%.3f, p < 0.01: %.4f, p < 0.001: %.4f (nominal: the level)", check["sets"], check["units_per_set"],
             check["cells_per_unit"], below["0.05"], below["0.01"], below["0.001"])
    if check["miscalibrated"]:
        log.warning("negative-control check: %.4f of the control sets' p-values are below 0.01, above the %.4f "
                    "that chance allows: the group tests are anti-conservative on these data, and q < %g "
                    "overstates the evidence (docs/statistics.md, 'Screens')", below["0.01"],
                    check["limit_below_0.01"], q_threshold)
