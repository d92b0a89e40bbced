"""Choosing K from a sweep (command line: ``python -m deltanmf.select_k <sweep dir>``).

Reads the ``metrics.json`` of every run under the sweep directory and writes there

- ``k_selection.csv``: one row per run (columns in :data:`COLUMNS`);
- ``k_selection.png``: stability and relative error against K, and for two-stage runs the
  explained-variance gain of the case programs against the null, against K_case;

and prints the suggested K (and K_case) with the reason. A multirun does this by itself when
it ends (:class:`deltanmf.workflow.sweeps.SweepCallback`).

The rules
---------
K
    cNMF style: **the largest K whose stability is within ``margin`` (default 0.05) of the
    highest stability of the sweep.** Stability is the silhouette of the programs of the
    replicate fits (``model.replicates`` > 1), else that of the consensus initialisation's
    runs (``model.consensus.replicates``). With the number of programs the data hold, every
    replicate finds the same programs and stability peaks; with more, replicates split the
    real programs in different ways and it drops. The K where the relative error stops
    falling steeply (the elbow) is reported beside it as a second opinion.
K_case
    **The smallest K_case whose gain over the null is within ``gain_tolerance`` (default 2%)
    of the largest gain over the null in the sweep.** The gain is the variance of the case
    cells explained by the case programs beyond the baseline (``explained_variance_gain``);
    the null is the same gain for held-out control cells (``model.null_fit=true``), i.e. what
    K_case programs explain where there is no effect. Past the number of real case
    programs, another program explains about as much in the cases as in the null, and the
    gain over the null stops growing. Without a null the gain itself is used.

Runs that share K (or K_case) are averaged, e.g. a sweep over K and seed.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import InputError
from ..files import RESULTS

MARGIN = 0.05  # the K rule's stability margin (module docstring)
GAIN_TOLERANCE = 0.02  # the K_case rule's tolerance
CSV_NAME = "k_selection.csv"
PNG_NAME = "k_selection.png"
COLUMNS = ["run_dir", "stage", "K", "K_case", "replicates", "stability", "stability_source",
           "stage1_relative_error", "stage2_relative_error", "case_stability", "explained_variance_gain",
           "null_explained_variance_gain", "gain_over_null", "recovery_baseline_mean"]


@dataclass
class KChoice:
    """What :func:`select_k` found: the table, the suggestions and where the files are."""

    table: pd.DataFrame
    k: int | None
    k_reason: str
    k_case: int | None
    k_case_reason: str
    csv: Path
    png: Path

    def report(self) -> str:
        """The lines printed by the command line: files, then each suggestion with its reason."""
        lines = [f"k_selection: {len(self.table)} runs -> {self.csv}, {self.png}"]
        if self.k_reason:
            lines.append(("suggested " if self.k is not None else "") + self.k_reason)
        if self.k_case_reason:
            lines.append(("suggested " if self.k_case is not None else "") + self.k_case_reason)
        return "\n".join(lines)


def _number(value) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan


def _row(metrics: dict, run_dir: str) -> dict:
    s1, s2 = metrics.get("stage1", {}), metrics.get("stage2", {})
    from_replicates = "replicate_stability" in s1
    twostage = metrics.get("stage") == "twostage"
    gain = _number(s2.get("explained_variance_gain"))
    null = _number(s2.get("null_explained_variance_gain"))
    return {
        "run_dir": run_dir,
        "stage": metrics.get("stage", ""),
        "K": metrics.get("K"),
        "K_case": metrics.get("K_case") if twostage else None,
        "replicates": int(s1.get("replicates", 1)),
        "stability": _number(s1.get("replicate_stability" if from_replicates else "consensus_stability")),
        "stability_source": "replicates" if from_replicates else "initialisation",
        "stage1_relative_error": _number(s1.get("relative_error")),
        "stage2_relative_error": _number(s2.get("relative_error")),
        "case_stability": _number(s2.get("replicate_stability")),
        "explained_variance_gain": gain,
        "null_explained_variance_gain": null,
        "gain_over_null": gain - null,
        "recovery_baseline_mean": _number((metrics.get("recovery") or {}).get("baseline_mean")),
    }


def finished_runs(sweep_dir: Path) -> list[Path]:
    """The ``metrics.json`` of every finished run under ``sweep_dir``: ``<run>/results/metrics.json``
    (or ``<run>/metrics.json``, as runs were written before results became one committed set),
    not in a hidden folder (results being written, ``.submitit``, ``.hydra``)."""
    found = []
    for folder, subfolders, names in os.walk(sweep_dir):
        subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
        for candidate in (Path(folder) / RESULTS / "metrics.json", Path(folder) / "metrics.json"):
            if candidate.is_file() and Path(folder).name != RESULTS:
                found.append(candidate)
                break
    return sorted(found)


def collect(sweep_dir: str | Path) -> pd.DataFrame:
    """One row per finished run under ``sweep_dir`` (:func:`finished_runs`)."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise InputError(f"{sweep_dir} is not a directory; give the sweep directory of a multirun "
                         "(outputs/multirun/<date>/<time>)")
    rows = []
    for path in finished_runs(sweep_dir):
        rel = (path.parent.parent if path.parent.name == RESULTS else path.parent).relative_to(sweep_dir)
        try:
            metrics = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise InputError(f"{path} is not valid JSON ({err}); remove that run or rerun it") from None
        rows.append(_row(metrics, rel.as_posix() or "."))
    if not rows:
        raise InputError(f"no finished run under {sweep_dir} (no metrics.json); run a sweep first, e.g. "
                         "python train.py -m K=5,10,15")
    table = pd.DataFrame(rows, columns=COLUMNS)
    table["K"] = table["K"].astype("Int64")
    table["K_case"] = table["K_case"].astype("Int64")
    return table.sort_values(["K", "K_case", "run_dir"], na_position="first").reset_index(drop=True)


def _error_elbow(k: np.ndarray, error: np.ndarray) -> tuple[int, float, float] | None:
    """The K where the error's fall per added program drops most (before/after ratio); None with < 3 Ks."""
    if len(k) < 3:
        return None
    slope = -np.diff(error) / np.diff(k)  # fall per program between neighbouring Ks
    before, after = slope[:-1], slope[1:]
    ratio = before / np.maximum(after, 1e-12 * max(float(np.abs(slope).max()), 1e-30))
    i = int(np.argmax(ratio))
    return int(k[i + 1]), float(before[i]), float(after[i])


def suggest_k(table: pd.DataFrame, margin: float = MARGIN) -> tuple[int | None, str]:
    """The largest K whose mean stability is within ``margin`` of the best (module docstring).

    Returns the suggestion (None when the sweep has fewer than two K values with a stability)
    and the reason as one line.
    """
    per_k = table.groupby("K")[["stability", "stage1_relative_error"]].mean().sort_index()
    if len(per_k) < 2:
        return None, ""
    stable = per_k["stability"].dropna()
    errors = per_k["stage1_relative_error"].dropna()
    elbow = _error_elbow(errors.index.to_numpy(dtype=float), errors.to_numpy(dtype=float))
    elbow_text = ("" if elbow is None else
                  f"; the relative error bends at K={elbow[0]} (falls {elbow[1]:.4f} per program before, "
                  f"{elbow[2]:.4f} after)")
    if len(stable) < 2:
        return None, f"K: fewer than two K values have a stability (K=1 has none){elbow_text}"
    best_k = int(stable.idxmax())
    best = float(stable.max())
    chosen = int(stable[stable >= best - margin].index.max())
    reason = (f"K={chosen}: the largest K whose stability ({stable[chosen]:.3f}) is within {margin:g} of the "
              f"best ({best:.3f}, K={best_k}){elbow_text}{_at_the_edge('K', chosen, stable.index)}")
    return chosen, reason


def _at_the_edge(key: str, chosen: int, tried) -> str:
    """A warning when the suggestion is the smallest or largest value the sweep tried: the
    answer may lie beyond it."""
    values = sorted(int(v) for v in tried)
    if len(values) < 2 or values[0] < chosen < values[-1]:
        return ""
    step = values[-1] - values[-2] if chosen == values[-1] else values[1] - values[0]
    beyond = ([chosen + step * i for i in (1, 2, 3)] if chosen == values[-1] else
              [v for v in (chosen - step * i for i in (3, 2, 1)) if v >= 1])
    side = "largest" if chosen == values[-1] else "smallest"
    if not beyond:
        return ""
    return (f". {key}={chosen} is the {side} {key} the sweep tried: extend the sweep past it to be sure, "
            f"e.g. {key}={','.join(str(v) for v in sorted({*beyond, chosen}))}")


def suggest_k_case(table: pd.DataFrame, gain_tolerance: float = GAIN_TOLERANCE,
                   k: int | None = None) -> tuple[int | None, str]:
    """The smallest K_case whose gain over the null is within ``gain_tolerance`` of the largest.

    Two-stage runs only; when the sweep has several K, the runs with ``k`` (default: the K
    with the most runs) are used. Returns the suggestion (None when the sweep has fewer than
    two K_case values, or no gain above the null) and the reason as one line.
    """
    runs = table[table["stage"] == "twostage"].dropna(subset=["explained_variance_gain"])
    if runs.empty:
        return None, ""
    if runs["K"].nunique() > 1:
        k = k if k is not None and k in set(runs["K"]) else int(runs["K"].value_counts().idxmax())
        runs = runs[runs["K"] == k]
    with_null = bool(runs["null_explained_variance_gain"].notna().all())
    column = "gain_over_null" if with_null else "explained_variance_gain"
    columns = list(dict.fromkeys(["explained_variance_gain", "null_explained_variance_gain", column]))
    per = runs.groupby("K_case")[columns].mean().sort_index()
    what = "gain over the null" if with_null else "explained-variance gain (no null: model.null_fit=true adds one)"
    if len(per) < 2:
        kc = int(per.index[0])
        gain, null = float(per["explained_variance_gain"].iloc[0]), float(per["null_explained_variance_gain"].iloc[0])
        text = f"gain {gain:.4f}" + (f" vs null {null:.4f}" if with_null else "")
        return None, f"K_case: one value in the sweep (K_case={kc}: {text})"
    best_kc = int(per[column].idxmax())
    best = float(per[column].max())
    if best <= 0:
        return None, (f"K_case: no K_case explains more in case cells than in held-out control cells "
                      f"(best {what} {best:.4f}): no evidence of case-specific programs")
    chosen = int(per[per[column] >= best * (1 - gain_tolerance)].index.min())
    reason = (f"K_case={chosen}: the smallest K_case whose {what} ({per.loc[chosen, column]:.4f}) is within "
              f"{gain_tolerance:.0%} of the largest ({best:.4f}, K_case={best_kc})")
    if with_null:
        reason += (f"; gain {per.loc[chosen, 'explained_variance_gain']:.4f} vs null "
                   f"{per.loc[chosen, 'null_explained_variance_gain']:.4f}")
    if chosen == int(per.index.max()):  # the gain still grew at the largest K_case tried
        reason += _at_the_edge("K_case", chosen, per.index)
    return chosen, reason


def select_k(sweep_dir: str | Path, margin: float = MARGIN, gain_tolerance: float = GAIN_TOLERANCE) -> KChoice:
    """Summarise a sweep: write ``k_selection.csv`` and ``k_selection.png`` into it and suggest K.

    Parameters
    ----------
    sweep_dir
        A multirun directory (or any folder holding finished runs).
    margin
        Stability margin of the K rule (module docstring).
    gain_tolerance
        Relative tolerance of the K_case rule (module docstring).

    Raises
    ------
    InputError
        ``sweep_dir`` is not a directory or holds no finished run.
    """
    if not margin >= 0 or not 0 <= gain_tolerance < 1:
        raise InputError(f"margin={margin} must be >= 0 and gain_tolerance={gain_tolerance} in [0, 1)")
    sweep_dir = Path(sweep_dir)
    table = collect(sweep_dir)
    k, k_reason = suggest_k(table, margin)
    k_case, k_case_reason = suggest_k_case(table, gain_tolerance, k)
    csv, png = sweep_dir / CSV_NAME, sweep_dir / PNG_NAME
    table.to_csv(csv, index=False)
    from ..pl import k_selection_plot, save_figure  # matplotlib: only when a sweep is summarised

    save_figure(k_selection_plot(table, k, k_case, margin), png)
    return KChoice(table, k, k_reason, k_case, k_case_reason, csv, png)
