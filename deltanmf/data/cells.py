"""Which cells a fit uses: the control / case split of ``.obs[condition_key]``, with cells
that have no condition left out and counted, and labels that differ from the configured
ones only by spaces or capitals refused."""
from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from ..errors import InputError
from ..settings import DataSettings
from .genes import check_unique

log = logging.getLogger(__name__)


def _label_text(values: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """``(text, missing)``: each cell's condition as text, and whether it has none (NaN, None,
    or an empty or blank string)."""
    missing = values.isna().to_numpy()
    text = values.astype(object).where(~values.isna(), "").astype(str).to_numpy()
    missing |= np.char.strip(text.astype(str)) == ""
    return text, missing


def _near_misses(text: np.ndarray, wanted: str, key: str, setting: str) -> None:
    """Refuse labels that differ from ``wanted`` only by white space or letter case: a typo in a
    file must not silently split a condition (``"control "`` would become a case)."""
    folded = str(wanted).strip().casefold()
    near = sorted({t for t in np.unique(text) if t != str(wanted) and t.strip().casefold() == folded})
    if near and str(wanted) not in text:  # the setting's spelling is not in the data at all
        raise InputError(f"{setting}={str(wanted)!r}: no cell has this value, but .obs[{key!r}] holds "
                         f"{', '.join(repr(t) for t in near)}, which differs only by spaces or capitals: "
                         f"give {setting}={near[0]!r}")
    if near:
        merge = ", ".join(f"{t!r}: {str(wanted)!r}" for t in near)
        raise InputError(f".obs[{key!r}] holds {', '.join(repr(t) for t in near)} beside {setting}={str(wanted)!r}: "
                         "labels that differ only by spaces or capitals would be treated as different "
                         f"conditions. Make them one label first (e.g. adata.obs[{key!r}] = "
                         f"adata.obs[{key!r}].astype(str).replace({{{merge}}})), or give the exact spelling "
                         f"in {setting}")


def split_conditions(obs: pd.DataFrame, condition_key: str, control, case=None,
                     allow_unlabelled: bool = True) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """Boolean masks (control, case) over ``obs``, and how many cells each condition got.

    Values are compared as text, so ``control: 0`` in a config matches an integer or a ``"0"``
    column alike. With ``case=None`` every other labelled cell is a case. Cells without a
    condition (NaN, None, empty) are left out and counted (``unlabelled``), or refused with
    ``allow_unlabelled=False``; with a ``case`` value, cells of other conditions are left out
    too (``other``). Labels that differ from the control or case value only by white space or
    letter case are refused (both spellings named).
    """
    if condition_key not in obs.columns:
        raise InputError(f"data.condition_key={condition_key!r} is not a column of .obs; "
                         f"columns present: {list(obs.columns)}")
    text, missing = _label_text(obs[condition_key])
    found = pd.Series(text[~missing]).value_counts()
    described = ", ".join(f"{v!r} ({n} cells)" for v, n in found.items())
    if missing.any():
        if not allow_unlabelled:
            first = list(obs.index[missing][:3])
            raise InputError(f"{int(missing.sum())} cells have no condition in .obs[{condition_key!r}] (NaN or "
                             f"empty; e.g. {first}): label them, or leave them out with data.allow_unlabelled=true")
        log.warning("%d cells have no condition in .obs[%r] (NaN or empty) and are left out", int(missing.sum()),
                    condition_key)
    _near_misses(text[~missing], control, condition_key, "data.control")
    is_control = ~missing & (text == str(control))
    if not is_control.any():
        raise InputError(f"data.control={control!r}: no cell has this value in .obs[{condition_key!r}]; "
                         f"values found: {described}")
    if case is None:
        is_case = ~missing & ~is_control
    else:
        _near_misses(text[~missing], case, condition_key, "data.case")
        is_case = ~missing & (text == str(case))
        if not is_case.any():
            raise InputError(f"data.case={case!r}: no cell has this value in .obs[{condition_key!r}]; "
                             f"values found: {described} (use data.case=null for every non-control cell)")
    counts = {"control": int(is_control.sum()), "case": int(is_case.sum()), "unlabelled": int(missing.sum()),
              "other": int((~missing & ~is_control & ~is_case).sum())}
    return is_control, is_case, counts


def cells_in_use(obs: pd.DataFrame, var_names: pd.Index, data: DataSettings, use_case: bool
                 ) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """``(is_control, cells, counts)``: the control mask over ``obs``, the positions in use
    (controls first, each condition in file order) and the cells per condition
    (:func:`split_conditions`)."""
    is_control, is_case, counts = split_conditions(obs, data.condition_key, data.control, data.case,
                                                   data.allow_unlabelled)
    if use_case and not is_case.any():
        raise InputError(f"no case cells: every cell in .obs[{data.condition_key!r}] is the control "
                         f"{data.control!r}")
    cells = np.flatnonzero(is_control)
    if use_case:
        cells = np.concatenate([cells, np.flatnonzero(is_case)])
    check_unique(obs.index[cells], "cell", "make them unique first (adata.obs_names_make_unique())")
    check_unique(var_names, "gene", "make them unique first (adata.var_names_make_unique())")
    if not use_case:
        counts = {**counts, "other": counts["other"] + counts["case"], "case": 0}
    log.info("cells per condition: %s", ", ".join(f"{k}={v}" for k, v in counts.items()))
    return is_control, cells, counts


def every_cell(obs: pd.DataFrame, var_names: pd.Index) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """``(is_control, cells, counts)`` of a dataset used whole, with no condition (projection
    onto new cells): every cell in file order, each counted as a control."""
    check_unique(obs.index, "cell", "make them unique first (adata.obs_names_make_unique())")
    check_unique(var_names, "gene", "make them unique first (adata.var_names_make_unique())")
    counts = {"control": len(obs), "case": 0, "unlabelled": 0, "other": 0}
    return np.ones(len(obs), dtype=bool), np.arange(len(obs)), counts
