"""A pooled CRISPR screen (Perturb-seq) benchmark: a simulated screen, a streamed two-stage fit
and how many of the planted target effects the per-target table (``group_usage.csv``) finds.

    python benchmarks/screen.py --cells 300000 --seeds 0 1 2            # the issue's screen, 3 seeds
    python benchmarks/screen.py --cells 1000000 --seeds 0 1 2 --scratch /big/disk
    python benchmarks/screen.py --cells 20000 --targets 200 --shift-targets 8 --case-targets 4 --nt-guides 20
    python benchmarks/screen.py --cells 300000 --seeds 0 report.q_threshold=0.1   # extra Hydra overrides

The simulated screen (:func:`write_screen`): ``--targets`` targets with ``--guides`` guides each
and ``--nt-guides`` non-targeting guides holding ``--nt-fraction`` of the cells. Guides get
unequal numbers of cells (lognormal cell-share weights, then a multinomial draw, separately
for the targeting and the non-targeting pool), and every guide, non-targeting ones too, has
a small random effect on the Dirichlet concentration of every program. Of the targets,
``--shift-targets`` move usage from one baseline program to another, ``--case-targets``
make a share of their cells use a case-only program, and the others do nothing. Counts are
``Poisson(library * usage @ programs.T)`` with the planted programs of the demo simulator
and the library of ``benchmarks/make_large.py`` (solved for ``--density`` non-zero entries),
written in chunks so the matrix is never held whole.

Per seed (:func:`main`): the file is written (timed), read once whole with
``anndata.read_h5ad`` in a child process (the yardstick: the fit's wall time is reported
in "reads of the file"), then fitted by ``train.py stage=twostage data=h5ad data.backed=true``
with ``data.group_key=target data.sample_key=guide`` in another child process; its wall
time, peak RSS and per-phase times (``metrics.json``'s ``timings`` when the run writes
them) are recorded, with the load average before and after. :func:`evaluate` then scores
the run against the planted truth: matched cosines of the programs, recall of shifting and
case-program targets, false target calls and the tail calibration of the null targets'
p-values. The numbers go to ``benchmarks/results/screen_<cells>.json`` and ``.md``.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
from scipy.optimize import linear_sum_assignment

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from deltanmf.data.generative import make_embedding, make_programs  # noqa: E402  (the planted programs)


def _load_make_large():
    """``benchmarks/make_large.py`` as a module, so its library solver is shared, not copied
    (``benchmarks`` is not a package; loading by path works from any working directory)."""
    file = Path(__file__).with_name("make_large.py")
    spec = importlib.util.spec_from_file_location("deltanmf_bench_make_large", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_make_large = _load_make_large()
solve_library = _make_large.solve_library
LIBRARY_SIGMA = _make_large.LIBRARY_SIGMA

# Spread (log scale) of the guides' cell-share weights: with sigma 0.4 the largest of 8,000
# guides holds about 3.5x the cells of the smallest, as in real screens where guides differ
# in how well they are delivered and how many cells they keep.
GUIDE_SIZE_SIGMA = 0.4
# A screen's default shift: the moved program's mean share falls 3-fold (concentration / 3, the
# concentration given to the other program). With 4 guides of ~34 cells (300k cells, 2,000
# targets) a 2-fold shift is found for about 3 in 4 targets: docs/benchmarks.md has the curve.
SHIFT_FACTOR = 3.0
# Non-zero share of the matrix: 0.22 gives the file sizes (1.1 GB at 300,000 cells x
# 2,000 genes, 3.6 GB at 1,000,000), typical of 2,000 highly variable genes in Perturb-seq.
DENSITY = 0.22
NON_TARGETING = "non-targeting"
SCREEN_KEY = "screen"


# --------------------------------------------------------------------------------------------
# The simulated screen
# --------------------------------------------------------------------------------------------
def _names(prefix: str, n: int, width: int) -> list[str]:
    return [f"{prefix}{i + 1:0{max(width, len(str(n)))}d}" for i in range(n)]


def _allocate(rng: np.random.Generator, n_cells: int, n_guides: int) -> np.ndarray:
    """Cells per guide: lognormal cell-share weights, then one multinomial draw of the cells."""
    if n_guides == 0:
        return np.zeros(0, dtype=np.int64)
    weights = rng.lognormal(0.0, GUIDE_SIZE_SIGMA, size=n_guides)
    return rng.multinomial(n_cells, weights / weights.sum()).astype(np.int64)


def _screen_usage(rng: np.random.Generator, guide: np.ndarray, guide_alpha: np.ndarray, case_of_guide: np.ndarray,
                  n_case_programs: int, case_fraction: float) -> np.ndarray:
    """Usage shares of a chunk of cells, cells x (K + K_case), rows on the simplex.

    Each cell is one Dirichlet draw with its guide's concentrations, drawn for the whole
    chunk at once as normalised Gamma variates (the same distribution as ``rng.dirichlet``,
    which takes one concentration vector per call and would need a call per guide).
    ``case_of_guide`` is the case program of each guide's target, -1 for none.
    """
    k = guide_alpha.shape[1]
    gamma = rng.standard_gamma(guide_alpha[guide])
    total = gamma.sum(axis=1, keepdims=True)
    # A row of exact zeros needs every Gamma(~0.3) draw to underflow (probability ~1e-300);
    # guarded anyway so that no cell ever divides by zero.
    gamma[total[:, 0] <= 0] = 1.0
    total[total <= 0] = k
    usage = np.zeros((len(guide), k + n_case_programs))
    usage[:, :k] = gamma / total
    case = case_of_guide[guide]
    users = np.flatnonzero((case >= 0) & (rng.random(len(guide)) < case_fraction))
    share = rng.uniform(0.3, 0.7, size=len(users))
    usage[users] *= (1.0 - share)[:, None]  # the whole row, so it stays on the simplex
    usage[users, k + case[users]] = share
    return usage


def write_screen(path: str | Path, n_cells: int = 300_000, n_genes: int = 2000, n_targets: int = 2000,
                 guides_per_target: int = 4, n_nt_guides: int = 40, nt_fraction: float = 0.10,
                 n_programs: int = 12, n_case_programs: int = 2, n_shift_targets: int = 40,
                 n_case_targets: int = 20, guide_sd: float = 0.1, shift_factor: float = SHIFT_FACTOR,
                 case_fraction: float = 0.5, usage_concentration: float = 0.3, density: float = DENSITY,
                 chunk: int = 20_000, seed: int = 0, verbose: bool = True, markers_per_program: int = 60,
                 background_weight: float = 0.5) -> dict:
    """Write a simulated pooled screen as an ``.h5ad``, one chunk of cells at a time.

    Parameters
    ----------
    path : str or Path
        The file to write. It is written under a temporary name and renamed when complete,
        so an interrupted write never leaves a file that looks finished.
    n_cells : int
        All cells, targeting and non-targeting.
    n_genes : int
        Genes; at least ``(n_programs + n_case_programs) * markers_per_program``.
    n_targets : int
        Targeted genes, named ``T0001``, ``T0002``, ...
    guides_per_target : int
        Guides per target, named ``T0001_g1``, ``T0001_g2``, ...
    n_nt_guides : int
        Non-targeting guides, named ``NT01``, ``NT02``, ...
    nt_fraction : float
        Share of the cells that carry a non-targeting guide (the controls).
    n_programs, n_case_programs : int
        Planted baseline programs and case-only programs.
    n_shift_targets : int
        Targets (drawn at random) that move usage from a baseline program ``a`` to another,
        ``b`` (a distinct pair drawn per target): ``alpha[a] /= shift_factor`` and the
        concentration removed is added to ``alpha[b]``, in every guide of the target on top
        of the guide's own effect.
    n_case_targets : int
        Targets (drawn at random, none of them a shift target) of which a share
        ``case_fraction`` of the cells use a case program (round-robin over the case
        programs) with a share drawn from U(0.3, 0.7); the rest of the row is rescaled.
    guide_sd : float
        Standard deviation of each guide's log-scale effect on each program's concentration
        (every guide, non-targeting ones too): the guide-to-guide variation that a test at
        the guide level must allow for.
    shift_factor : float
        See ``n_shift_targets``. The total concentration is unchanged, so the expected share
        of ``a`` is divided by exactly ``shift_factor`` and that of ``b`` rises by
        ``alpha[a] (1 - 1 / shift_factor) / alpha[b]`` (1.5x at the default 2 with equal
        concentrations). The default 2 (log2 fold change -1 on ``a``, +0.58 on ``b``) is
        meant to be found: with 12 programs at concentration 0.3 a cell's share of one
        program has mean 0.083 and standard deviation 0.13, so 4 guides of ~130 cells
        (300,000 cells) measure a target's mean share to about +-0.007 including the guide
        effects, against a change of 0.042 (about 6 standard errors on the true usage,
        fewer on usage refitted from counts). A factor of 1.5 (a change of 0.028) sits at
        the edge of what Benjamini-Hochberg over ~28,000 rows can call.
    case_fraction : float
        Share of a case-program target's cells that use its case program. 0.5: half the
        cells at a share of 0.3-0.7 gives a target mean share of ~0.25 against ~0 in the
        controls, a strong signal, as case programs are in real screens (a new state).
    usage_concentration : float
        Dirichlet concentration of every baseline program (before the guide effects), as in
        ``benchmarks/make_large.py``: sparse usage, a few programs per cell.
    density : float
        Target share of non-zero entries; the median library size is solved for it.
    chunk : int
        Cells drawn and written at a time (memory ~ chunk x genes x 8 bytes, a few times).
    seed : int
        Seeds everything.
    verbose : bool
        Print progress every 10 chunks.
    markers_per_program, background_weight : int, float
        The planted programs' shape (:func:`deltanmf.data.generative.make_programs`).

    Returns
    -------
    dict
        ``path``, ``cells``, ``genes``, ``targets``, ``guides``, ``nonzeros``, ``density``,
        ``library_size``, ``seconds`` (writing) and ``bytes`` (the file's size).

    Notes
    -----
    ``.obs``: ``condition`` ("control" for non-targeting cells, "case" otherwise),
    ``target`` ("non-targeting" or the target), ``guide``, ``library_size``. The truth:
    ``.varm["sim_programs"]`` / ``["sim_case_programs"]`` (genes x programs),
    ``.obsm["sim_usage"]`` and ``.uns["screen"]`` (``params``, ``shift_targets``,
    ``shift_from``, ``shift_to``, ``case_targets``, ``case_program``, the guides with their
    target, cells and effects). ``.varm["sim_embedding"]`` and ``.uns["simulation"]``
    complete the keys :func:`deltanmf.data.simulation_truth` reads: with only some of them
    present a run would stop, and with all of them it reports the programs' recovery.
    """
    start = time.perf_counter()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    n_total = n_programs + n_case_programs
    if n_genes < n_total * markers_per_program:
        raise ValueError(f"n_genes={n_genes} is too small for {n_total} programs of {markers_per_program} markers "
                         f"(lower markers_per_program)")
    if n_shift_targets + n_case_targets > n_targets:
        raise ValueError(f"{n_shift_targets} shift + {n_case_targets} case-program targets exceed {n_targets} targets")
    if n_shift_targets and n_programs < 2:
        raise ValueError("a shift moves usage between two baseline programs: n_programs must be >= 2")
    if n_case_targets and not n_case_programs:
        raise ValueError("case-program targets need n_case_programs >= 1")
    programs, specific = make_programs(rng, n_genes, n_total, markers_per_program, background_weight)
    embedding = make_embedding(rng, specific, 32, 0.5)

    # The design: targets, their guides and which targets do what.
    targets = _names("T", n_targets, 4)
    guide_names = [f"{t}_g{j + 1}" for t in targets for j in range(guides_per_target)]
    guide_names += _names("NT", n_nt_guides, 2)
    n_tg_guides = n_targets * guides_per_target
    n_guides = len(guide_names)
    guide_target = np.concatenate([np.repeat(np.arange(n_targets), guides_per_target),
                                   np.full(n_nt_guides, -1)]).astype(np.int64)
    chosen = rng.choice(n_targets, size=n_shift_targets + n_case_targets, replace=False)
    shift_idx, case_idx = np.sort(chosen[:n_shift_targets]), np.sort(chosen[n_shift_targets:])
    pairs = np.array([rng.choice(n_programs, size=2, replace=False) for _ in shift_idx], dtype=np.int64
                     ).reshape(-1, 2)
    case_program = (np.arange(len(case_idx)) % max(n_case_programs, 1)).astype(np.int64)

    # Concentrations per guide: every guide's own effect, then its target's shift on top.
    guide_effect = rng.normal(0.0, guide_sd, size=(n_guides, n_programs))
    guide_alpha = usage_concentration * np.exp(guide_effect)
    for t, (a, b) in zip(shift_idx, pairs):
        rows = np.flatnonzero(guide_target == t)
        removed = guide_alpha[rows, a] * (1.0 - 1.0 / shift_factor)
        guide_alpha[rows, a] -= removed
        guide_alpha[rows, b] += removed
    case_of_target = np.full(n_targets, -1, dtype=np.int64)
    case_of_target[case_idx] = case_program
    case_of_guide = np.where(guide_target >= 0, case_of_target[np.maximum(guide_target, 0)], -1)

    # Cells: unequal guide sizes, in the two pools apart, then in random order.
    n_nt_cells = int(round(nt_fraction * n_cells)) if n_nt_guides else 0
    guide_cells = np.concatenate([_allocate(rng, n_cells - n_nt_cells, n_tg_guides),
                                  _allocate(rng, n_nt_cells, n_nt_guides)])
    cell_guide = rng.permutation(np.repeat(np.arange(n_guides, dtype=np.int32), guide_cells))

    sample = np.sort(rng.choice(n_cells, size=min(n_cells, 4000), replace=False))
    sample_usage = _screen_usage(rng, cell_guide[sample], guide_alpha, case_of_guide, n_case_programs, case_fraction)
    library_size = solve_library(rng, programs, sample_usage, density)
    library = rng.lognormal(np.log(library_size), LIBRARY_SIGMA, size=n_cells)

    cell_target = guide_target[cell_guide]
    target_labels = np.array([NON_TARGETING, *targets], dtype=object)
    obs = pd.DataFrame({
        "condition": pd.Categorical.from_codes((cell_target >= 0).astype(np.int8), categories=["control", "case"]),
        "target": pd.Categorical.from_codes((cell_target + 1).astype(np.int32), categories=target_labels),
        "guide": pd.Categorical.from_codes(cell_guide, categories=np.array(guide_names, dtype=object)),
        "library_size": library,
    }, index=pd.Index([f"cell_{i}" for i in range(n_cells)]))
    var = pd.DataFrame({"gene_symbol": [f"GENE{i + 1}" for i in range(n_genes)]},
                       index=pd.Index([f"ENSG{i + 1:011d}" for i in range(n_genes)]))
    params = dict(n_cells=n_cells, n_genes=n_genes, n_targets=n_targets, guides_per_target=guides_per_target,
                  n_nt_guides=n_nt_guides, nt_fraction=nt_fraction, n_programs=n_programs,
                  n_case_programs=n_case_programs, n_shift_targets=n_shift_targets, n_case_targets=n_case_targets,
                  guide_sd=guide_sd, shift_factor=shift_factor, case_fraction=case_fraction,
                  usage_concentration=usage_concentration, density=density, seed=seed,
                  markers_per_program=markers_per_program, background_weight=background_weight,
                  guide_size_sigma=GUIDE_SIZE_SIGMA, library_size=library_size, library_sigma=LIBRARY_SIGMA)
    names = np.array(targets, dtype=object)
    case_program_names = [f"case_{c + 1}" for c in range(n_case_programs)]
    uns = {
        SCREEN_KEY: {
            "params": params,
            "shift_targets": names[shift_idx], "shift_from": pairs[:, 0], "shift_to": pairs[:, 1],
            "case_targets": names[case_idx], "case_program": case_program,
            "guides": np.array(guide_names, dtype=object), "guide_target": target_labels[guide_target + 1],
            "guide_cells": guide_cells, "guide_effect": guide_effect,
        },
        # What deltanmf.data.simulation_truth needs besides varm/obsm: no shift of the whole
        # case condition is planted (each target has its own), so none is expected there.
        "simulation": {
            "params": params, "shifted_programs": np.zeros(n_programs, dtype=np.int64),
            "case_program_groups": np.array([",".join(names[case_idx[case_program == c]]) or "none"
                                             for c in range(n_case_programs)], dtype=object),
            "program_names": np.array([f"baseline_{k + 1}" for k in range(n_programs)], dtype=object),
            "case_program_names": np.array(case_program_names, dtype=object),
        },
    }
    partial = path.with_name(path.name + ".partial")
    _make_large.write_annotations(partial, obs, var, uns, programs, n_programs, embedding)
    del obs

    programs_t = np.ascontiguousarray(programs.T)
    nnz = _make_large.append_counts(
        partial, rng, programs_t, library,
        lambda first, last: _screen_usage(rng, cell_guide[first:last], guide_alpha, case_of_guide, n_case_programs,
                                          case_fraction),
        chunk, start if verbose else None)
    os.replace(partial, path)
    return {"path": str(path), "cells": n_cells, "genes": n_genes, "targets": n_targets, "guides": n_guides,
            "control_cells": n_nt_cells, "nonzeros": nnz, "density": nnz / (n_cells * n_genes),
            "library_size": library_size, "seconds": time.perf_counter() - start, "bytes": path.stat().st_size}


# --------------------------------------------------------------------------------------------
# Scoring a run against the truth
# --------------------------------------------------------------------------------------------
def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine between the columns of ``a`` (genes x m) and ``b`` (genes x n)."""
    norms = np.outer(np.linalg.norm(a, axis=0), np.linalg.norm(b, axis=0))
    return (a.T @ b) / np.maximum(norms, 1e-300)


def _match(fitted: np.ndarray, planted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Hungarian matching on cosine: for each planted program, the fitted one (-1: none) and the cosine."""
    if fitted.shape[1] == 0 or planted.shape[1] == 0:
        return np.full(planted.shape[1], -1), np.zeros(planted.shape[1])
    cos = _cosine(fitted, planted)
    rows, cols = linear_sum_assignment(-cos)
    match, value = np.full(planted.shape[1], -1), np.zeros(planted.shape[1])
    match[cols], value[cols] = rows, cos[rows, cols]
    return match, value


def _as_bool(column: pd.Series) -> np.ndarray:
    """``called`` read back from CSV: bool, or strings when the column had blanks."""
    if column.dtype == bool:
        return column.to_numpy()
    return column.astype(str).str.strip().str.lower().isin(["true", "1"]).to_numpy()


def _tail(p: np.ndarray) -> dict:
    """How often null p-values fall below 1e-3 and 1e-4, against how often they should."""
    p = p[np.isfinite(p)]
    out = {"rows": int(len(p)), "min_p": float(p.min()) if len(p) else float("nan")}
    for label, level in (("1e-3", 1e-3), ("1e-4", 1e-4)):
        below = int((p < level).sum())
        fraction = below / len(p) if len(p) else float("nan")
        out[f"below_{label}"] = below
        out[f"fraction_below_{label}"] = fraction
        out[f"ratio_{label}"] = fraction / level
    return out


def _calls(called: set, shift_hits: set, case_hits: set, shift: list, case: list, null: list) -> dict:
    """Recall and false calls for one way of calling targets."""
    null_called = len(called & set(null))
    return {"called_targets": len(called), "shift_recall": len(shift_hits) / len(shift) if shift else float("nan"),
            "case_recall": len(case_hits) / len(case) if case else float("nan"),
            "null_called": null_called, "null_targets": len(null),
            "false_discovery_proportion": null_called / len(called) if called else 0.0}


def evaluate(run_dir: str | Path, path: str | Path, clean_cosine: float = 0.9) -> dict:
    """Score a screen run against the planted truth of its file.

    Parameters
    ----------
    run_dir : str or Path
        The run directory (``results/group_usage.csv``, ``results/results.h5ad``).
    path : str or Path
        The screen written by :func:`write_screen`; only its ``.uns`` and ``.varm`` are read.
    clean_cosine : float
        The case programs' matching is "clean" when every planted case program has a fitted
        partner with at least this cosine; the case recall then uses the matched program.

    Returns
    -------
    dict
        ``baseline_cosine`` / ``case_cosine`` (matched, per planted program, with mean and
        min), ``calls`` (a target is called when any of its rows is: recall of the shift
        targets called on a program they move with the planted sign, of the case targets on
        their matched case program and on any case row, null targets called and the false
        discovery proportion), ``null_tail`` (p < 1e-3 and < 1e-4 on the null targets'
        baseline and case rows) and, when the table has ``group_q_value``, ``group_calls``
        (targets with group q < 0.05).
    """
    run_dir, path = Path(run_dir), Path(path)
    truth = ad.read_h5ad(path, backed="r")
    try:
        screen = truth.uns[SCREEN_KEY]
        planted_base = pd.DataFrame(np.asarray(truth.varm["sim_programs"]), index=truth.var_names)
        planted_case = pd.DataFrame(np.asarray(truth.varm["sim_case_programs"]), index=truth.var_names)
    finally:
        truth.file.close()
    targets = sorted({str(t) for t in screen["guide_target"]} - {NON_TARGETING})
    shift_targets = [str(t) for t in np.atleast_1d(screen["shift_targets"])]
    shift_from = np.atleast_1d(np.asarray(screen["shift_from"], dtype=np.int64))
    shift_to = np.atleast_1d(np.asarray(screen["shift_to"], dtype=np.int64))
    case_targets = [str(t) for t in np.atleast_1d(screen["case_targets"])]
    case_program = np.atleast_1d(np.asarray(screen["case_program"], dtype=np.int64))
    null_targets = sorted(set(targets) - set(shift_targets) - set(case_targets))

    result = ad.read_h5ad(run_dir / "results" / "results.h5ad")
    info = result.uns["deltanmf"]
    names = [str(n) for n in info["program_names"]]
    kinds = np.asarray(info["program_kind"]).astype(str)
    fitted = pd.DataFrame(np.asarray(result.varm["deltanmf_programs"], dtype=np.float64), index=result.var_names,
                          columns=names)
    # The run keeps a subset of the genes (detection filter); genes it did not fit are NaN.
    genes = fitted.index[fitted.notna().all(axis=1)].intersection(planted_base.index)
    base_names = [n for n, k in zip(names, kinds) if k == "baseline"]
    case_names = [n for n, k in zip(names, kinds) if k == "case"]
    base_match, base_cos = _match(fitted.loc[genes, base_names].to_numpy(), planted_base.loc[genes].to_numpy())
    case_match, case_cos = _match(fitted.loc[genes, case_names].to_numpy(), planted_case.loc[genes].to_numpy())
    base_of = {k: base_names[m] if m >= 0 else None for k, m in enumerate(base_match)}
    case_of = {c: case_names[m] if m >= 0 else None for c, m in enumerate(case_match)}
    clean = bool(len(case_cos) and (case_match >= 0).all() and case_cos.min() >= clean_cosine)

    table = pd.read_csv(run_dir / "results" / "group_usage.csv")
    table["group"] = table["group"].astype(str)
    table["called"] = _as_bool(table["called"])
    called_rows = table[table["called"]]
    called = set(called_rows["group"])
    rows_by_target = {g: rows for g, rows in called_rows.groupby("group")}

    def moved(target, a, b, rows) -> bool:
        """Called on a program the target moves, in the planted direction."""
        fc = rows.set_index("program")["log2_fold_change"]
        down, up = base_of.get(a), base_of.get(b)
        return bool((down in fc.index and fc[down] < 0) or (up in fc.index and fc[up] > 0))

    shift_hits = {t for t, a, b in zip(shift_targets, shift_from, shift_to)
                  if t in rows_by_target and moved(t, a, b, rows_by_target[t])}
    case_any = {t for t in case_targets if t in rows_by_target and (rows_by_target[t]["program_kind"] == "case").any()}
    case_matched = {t for t, c in zip(case_targets, case_program)
                    if t in rows_by_target and case_of.get(c) in set(rows_by_target[t]["program"])}
    calls = _calls(called, shift_hits, case_matched if clean else case_any, shift_targets, case_targets, null_targets)
    calls.update(case_recall_matched=len(case_matched) / len(case_targets) if case_targets else float("nan"),
                 case_recall_any=len(case_any) / len(case_targets) if case_targets else float("nan"),
                 shift_called_any=(len(called & set(shift_targets)) / len(shift_targets) if shift_targets
                                   else float("nan")),
                 case_matching_clean=clean)

    null_rows = table[table["group"].isin(null_targets)]
    tail = {kind: _tail(null_rows.loc[null_rows["program_kind"] == kind, "p_value"].to_numpy(dtype=np.float64))
            for kind in ("baseline", "case")}
    out = {"genes_compared": int(len(genes)),
           "baseline_cosine": {"matched": base_cos.tolist(), "mean": float(base_cos.mean()),
                               "min": float(base_cos.min())},
           "case_cosine": {"matched": case_cos.tolist(), "mean": float(case_cos.mean()) if len(case_cos) else None,
                           "min": float(case_cos.min()) if len(case_cos) else None},
           "calls": calls, "null_tail": tail, "table_rows": int(len(table)),
           "table_targets": int(table["group"].nunique()),
           "p_value_missing": int(table["p_value"].isna().sum())}

    if "group_q_value" in table.columns:
        # The target-level answer ("does this target do anything"): direction and program
        # are not part of it, so a shift target counts when its group q-value passes.
        group_q = table.groupby("group")["group_q_value"].min()
        group_called = set(group_q.index[group_q < 0.05])
        out["group_calls"] = _calls(group_called, group_called & set(shift_targets),
                                    group_called & set(case_targets), shift_targets, case_targets, null_targets)
    return out


# --------------------------------------------------------------------------------------------
# Child processes: a full read and the fit, each with its own peak RSS
# --------------------------------------------------------------------------------------------
# The wrapper each measured run goes through. A child's peak RSS as the kernel reports it
# includes the memory of the process it was forked from, before its exec: launched straight
# from this process (which held a simulated chunk, or the evaluation's tables) a small run
# would report our peak, not its own. Launched from this small wrapper, the run's peak is
# its own to within the wrapper's ~10 MB; the wrapper reports it and the run's wall time.
_WRAPPER = ("import json, resource, subprocess, sys, time\n"
            "start = time.perf_counter()\n"
            "code = subprocess.call(sys.argv[2:])\n"
            "wall = time.perf_counter() - start\n"
            "peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss\n"
            "with open(sys.argv[1], 'w') as f:\n"
            "    json.dump({'exit_code': code, 'wall_s': wall, 'peak_rss_kib': peak}, f)\n")


def _run_child(cmd: list[str], log_path: Path) -> dict:
    """Run ``cmd`` through the wrapper, its output to ``log_path``; its wall time, exit code
    and its own peak RSS (in GB; Linux reports KiB)."""
    usage_path = log_path.with_name(log_path.name + ".rusage.json")
    with open(log_path, "w") as log:
        subprocess.run([sys.executable, "-c", _WRAPPER, str(usage_path), *cmd], stdout=log,
                       stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        usage = json.loads(usage_path.read_text())
    except (OSError, ValueError):  # the wrapper itself failed (killed, no disk)
        return {"wall_s": float("nan"), "exit_code": -1, "peak_rss_gb": float("nan")}
    finally:
        usage_path.unlink(missing_ok=True)
    return {"wall_s": usage["wall_s"], "exit_code": usage["exit_code"],
            "peak_rss_gb": usage["peak_rss_kib"] * 1024 / 1e9}


_READ = ("import sys, time, json\n"
         "import anndata\n"
         "start = time.perf_counter()\n"
         "adata = anndata.read_h5ad(sys.argv[1])\n"
         "print(json.dumps({'read_s': time.perf_counter() - start, 'nnz': int(adata.X.nnz)}))\n")


def full_read(path: Path, log_path: Path) -> dict:
    """One whole ``anndata.read_h5ad`` of ``path`` in a child process (its memory is not ours).

    Two times: the child's wall time (``wall_s``: the interpreter's start, ``import anndata``
    and the read, what ``time python -c "import anndata; anndata.read_h5ad(FILE)"`` gives a
    user, as the fit's wall time includes its own start), and the read call alone
    (``read_s``). The fit's wall time is reported in both.
    """
    out = _run_child([sys.executable, "-c", _READ, str(path)], log_path)
    if out["exit_code"] != 0:
        raise SystemExit(f"reading {path} failed; see {log_path}")
    lines = [line for line in log_path.read_text().splitlines() if line.startswith("{")]
    out.update(json.loads(lines[-1]))
    return out


def _overrides(defaults: list[str], extra: list[str]) -> list[str]:
    """``defaults`` with any key given again in ``extra`` replaced (Hydra refuses a key twice)."""
    keys = {item.split("=", 1)[0].lstrip("+~") for item in extra if "=" in item}
    return [item for item in defaults if item.split("=", 1)[0] not in keys] + list(extra)


def fit(path: Path, run_dir: Path, n_programs: int, n_case_programs: int, extra: list[str]) -> dict:
    """``train.py`` on the screen in a child process; wall time, peak RSS and ``metrics.json``."""
    defaults = ["stage=twostage", "data=h5ad", f"data.path={path}", "data.condition_key=condition",
                "data.control=control", "data.group_key=target", "data.sample_key=guide", "data.backed=true",
                "data.batch_size=4096", f"K={n_programs}", f"K_case={n_case_programs}", "logger=none",
                "trainer.enable_progress_bar=false", f"hydra.run.dir={run_dir}", "overwrite=true"]
    cmd = [sys.executable, str(ROOT / "train.py"), *_overrides(defaults, extra)]
    log_path = run_dir.parent / f"{run_dir.name}.log"
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    started = time.time()
    out = _run_child(cmd, log_path)
    if out["exit_code"] != 0:
        raise SystemExit(f"train.py failed with exit code {out['exit_code']}; see {log_path}")
    out["metrics"] = json.loads((run_dir / "results" / "metrics.json").read_text())
    out.update(command="python " + " ".join(cmd[1:]), log=str(log_path), run_dir=str(run_dir),
               log_phases=_log_phases(log_path, started))
    return out


def _load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def _flat(d: dict, prefix: str = "") -> dict:
    """Nested numbers as one level of dotted keys (``metrics.json``'s timings may nest)."""
    out = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[f"{prefix}{key}"] = float(value)
    return out


def _negative_controls(metrics: dict) -> dict | None:
    """The run's negative-control check, wherever and under whichever names ``metrics.json``
    holds it (top level or under ``group_tests``; ``R``/``m`` or ``sets``/``units_per_set``):
    the key is being settled while this benchmark is written. None when the run has none."""
    found = metrics.get("negative_controls") or (metrics.get("group_tests") or {}).get("negative_controls")
    if not isinstance(found, dict):
        return None
    out = dict(found)
    out.setdefault("R", found.get("sets"))
    out.setdefault("m", found.get("units_per_set"))
    return out


# Log lines that end each part of a run, for a rough time line when metrics.json has no
# ``timings`` (seconds from the child's start, so the first includes the imports).
_MARKS = {"first log line": "", "stage 1 initialised": "stage 1: consensus initialisation",
          "stage 1 trained": "stage 1: ", "stage 2 initialised": "stage 2: initialised",
          "stage 2 trained": "stage 2: the baseline alone", "negative-control check done": "negative-control check",
          "tables done": "summary: ", "results written": "results written to "}


def _log_phases(log_path: Path, started: float) -> dict:
    """Seconds from ``started`` (epoch) to the last log line matching each of ``_MARKS``."""
    out = {}
    for line in Path(log_path).read_text().splitlines():
        stamp = re.match(r"\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+)\]", line)
        if not stamp:
            continue
        at = datetime.strptime(stamp.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp() - started
        out.setdefault("first log line", at)
        for name, text in _MARKS.items():
            if text and text in line and (name != "stage 1 trained" or " steps (" in line):
                out[name] = at
    return {name: out[name] for name in _MARKS if name in out}


# --------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------
def _rows(r: dict) -> list[tuple[str, object, str]]:
    """(label, value, format) of one seed's result, in the report's order."""
    ev, run, f = r["evaluation"], r["fit"], r["file"]
    c = ev["calls"]
    rows = [
        ("file: cells", f["cells"], ",d"), ("file: GB", f["bytes"] / 1e9, ".2f"),
        ("file: written in (s)", f.get("seconds"), ".1f"),
        ("full read: python -c 'import anndata; anndata.read_h5ad(FILE)' (s)", r["read"]["wall_s"], ".1f"),
        ("full read: the read_h5ad call alone (s)", r["read"]["read_s"], ".1f"),
        ("full read, peak RSS (GB)", r["read"]["peak_rss_gb"], ".2f"),
        ("fit: wall time (s)", run["wall_s"], ".1f"),
        ("fit: reads of the file (fresh-process read)", run["wall_s"] / r["read"]["wall_s"], ".1f"),
        ("fit: reads of the file (the call alone)", run["wall_s"] / r["read"]["read_s"], ".1f"),
        ("fit: peak RSS (GB)", run["peak_rss_gb"], ".2f"),
    ]
    rows += [(f"time: {k} (s)", v, ".1f") for k, v in r.get("timings", {}).items()]
    if not r.get("timings"):  # no per-phase times in metrics.json: the log's time line instead
        rows += [(f"log: {k} (s from start)", v, ".1f") for k, v in run.get("log_phases", {}).items()]
    rows.append(("metrics.json wall_time_s", r.get("metrics_wall_time_s"), ".1f"))
    if r.get("metrics_wall_time_s") is not None:  # interpreter, imports and Hydra: not on the run's own clock
        rows.append(("fit: outside metrics.json's clock (s)", run["wall_s"] - r["metrics_wall_time_s"], ".1f"))
    rows += [
        ("baseline programs, matched cosine mean", ev["baseline_cosine"]["mean"], ".3f"),
        ("baseline programs, matched cosine min", ev["baseline_cosine"]["min"], ".3f"),
        ("case programs, matched cosine mean", ev["case_cosine"]["mean"], ".3f"),
        ("case programs, matched cosine min", ev["case_cosine"]["min"], ".3f"),
        ("shift recall (moved program, planted sign)", c["shift_recall"], ".3f"),
        ("shift targets called on any row", c["shift_called_any"], ".3f"),
        ("case recall (matched case program)", c["case_recall_matched"], ".3f"),
        ("case recall (any case row)", c["case_recall_any"], ".3f"),
        ("called targets", c["called_targets"], "d"),
        ("null targets called", c["null_called"], "d"),
        ("false discovery proportion", c["false_discovery_proportion"], ".3f"),
    ]
    for kind in ("baseline", "case"):
        t = ev["null_tail"][kind]
        rows += [(f"null {kind} rows", t["rows"], ",d"),
                 (f"null {kind} rows: p < 1e-3 (count)", t["below_1e-3"], "d"),
                 (f"null {kind} rows: p < 1e-3 / nominal", t["ratio_1e-3"], ".2f"),
                 (f"null {kind} rows: p < 1e-4 (count)", t["below_1e-4"], "d"),
                 (f"null {kind} rows: p < 1e-4 / nominal", t["ratio_1e-4"], ".2f"),
                 (f"null {kind} rows: smallest p", t["min_p"], ".1e")]
    if "group_calls" in ev:
        g = ev["group_calls"]
        rows += [("group q < 0.05: shift recall", g["shift_recall"], ".3f"),
                 ("group q < 0.05: case recall", g["case_recall"], ".3f"),
                 ("group q < 0.05: called targets", g["called_targets"], "d"),
                 ("group q < 0.05: null targets called", g["null_called"], "d"),
                 ("group q < 0.05: false discovery proportion", g["false_discovery_proportion"], ".3f")]
    nc = r.get("negative_controls")
    if nc:
        rows += [("negative controls: R", nc.get("R"), "d"), ("negative controls: m", nc.get("m"), "d")]
        for key, what in (("fraction_below", ""), ("fraction_below_baseline", " (baseline)"),
                          ("fraction_below_case", " (case)")):
            for level, value in (nc.get(key) or {}).items():
                rows.append((f"negative controls{what}: fraction p < {level}", value, ".4f"))
    rows += [("load average (1 min) before", r["load_before"][0], ".2f"),
             ("load average (1 min) after", r["load_after"][0], ".2f")]
    return rows


def _fmt(value, spec: str) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "–"
    if spec.endswith("d"):
        value = int(round(value))
    return format(value, spec)


def report(results: list[dict], argv: list[str], extra: list[str]) -> tuple[str, dict]:
    """The markdown table (a column per seed and their mean) and the means."""
    columns = [dict((label, (value, spec)) for label, value, spec in _rows(r)) for r in results]
    labels = list(dict.fromkeys(label for r in results for label, _, _ in _rows(r)))
    means = {}
    seeds = " | ".join(f"seed {r['seed']}" for r in results)
    lines = [f"| quantity | {seeds} | mean |",
             "|---|" + "---:|" * (len(results) + 1)]
    for label in labels:
        cells, values, spec = [], [], ".3f"
        for col in columns:
            value, spec = col.get(label, (None, spec))
            cells.append(_fmt(value, spec))
            if value is not None and np.isfinite(float(value)):
                values.append(float(value))
        means[label] = float(np.mean(values)) if values else None
        mean_spec = spec if not spec.endswith("d") else (",.1f" if spec.startswith(",") else ".1f")
        lines.append(f"| {label} | {' | '.join(cells)} | {_fmt(means[label], mean_spec)} |")
    first = results[0]
    p = first["params"]
    head = [
        f"# Pooled screen: {p['n_cells']:,} cells",
        "",
        f"Simulated by `benchmarks/screen.py`: {p['n_cells']:,} cells x {p['n_genes']:,} genes, "
        f"{p['n_targets']:,} targets x {p['guides_per_target']} guides, {p['n_nt_guides']} non-targeting guides "
        f"({p['nt_fraction']:.0%} of the cells), {p['n_shift_targets']} shift targets (factor "
        f"{p['shift_factor']:g}), {p['n_case_targets']} case-program targets (case fraction {p['case_fraction']:g}), "
        f"guide effects sd {p['guide_sd']:g} (log concentration), K={p['n_programs']}, K_case={p['n_case_programs']}.",
        f"Machine: {os.cpu_count()} CPU cores, {platform.machine()}, {datetime.now():%Y-%m-%d %H:%M}; "
        "load average (1 min) before and after each fit in the table (the times vary with it on a shared machine).",
        "",
        "```",
        "python benchmarks/screen.py " + " ".join(argv),
        f"# each seed runs: {first['fit']['command']}",
        "```",
        "",
        "A target is called when any of its rows in `group_usage.csv` is. Shift recall: shift targets called "
        "on a program they move (the fitted program matched to the planted source with log2 FC < 0, or to the "
        "destination with log2 FC > 0). Null rows: the rows of targets with no planted effect.",
        "",
    ]
    return "\n".join(head + lines) + "\n", means


def _file_name(args, seed: int) -> str:
    """A name that says the design, so ``--reuse`` never picks up another design's file."""
    design = json.dumps({k: getattr(args, k) for k in sorted(_DESIGN_ARGS)}, sort_keys=True)
    return f"screen_{args.cells}_seed{seed}_{hashlib.sha1(design.encode()).hexdigest()[:8]}.h5ad"


_DESIGN_ARGS = ("cells", "genes", "targets", "guides", "nt_guides", "nt_fraction", "programs", "case_programs",
                "shift_targets", "case_targets", "guide_sd", "shift_factor", "case_fraction", "concentration",
                "density", "markers")


def main(argv=None) -> None:
    """The command line: simulate, read, fit and score each seed; write the JSON and markdown."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="Arguments not listed here go to train.py as Hydra overrides.")
    parser.add_argument("--cells", type=int, default=300_000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--scratch", default=None,
                        help="folder for the screen files and runs (default: a new temporary folder)")
    parser.add_argument("--genes", type=int, default=2000)
    parser.add_argument("--targets", type=int, default=2000)
    parser.add_argument("--guides", type=int, default=4, help="guides per target")
    parser.add_argument("--nt-guides", type=int, default=40, help="non-targeting guides")
    parser.add_argument("--nt-fraction", type=float, default=0.10, help="share of cells with a non-targeting guide")
    parser.add_argument("--programs", type=int, default=12, help="planted baseline programs (and K)")
    parser.add_argument("--case-programs", type=int, default=2, help="planted case programs (and K_case)")
    parser.add_argument("--shift-targets", type=int, default=40)
    parser.add_argument("--case-targets", type=int, default=20)
    parser.add_argument("--guide-sd", type=float, default=0.1, help="sd of the guides' log-concentration effects")
    parser.add_argument("--shift-factor", type=float, default=SHIFT_FACTOR)
    parser.add_argument("--case-fraction", type=float, default=0.5)
    parser.add_argument("--concentration", type=float, default=0.3, help="Dirichlet concentration per program")
    parser.add_argument("--density", type=float, default=DENSITY)
    parser.add_argument("--markers", type=int, default=60, help="marker genes per planted program")
    parser.add_argument("--chunk", type=int, default=20_000, help="cells simulated and written at a time")
    parser.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--keep", action="store_true", help="keep the screen files and run directories")
    parser.add_argument("--reuse", action="store_true", help="reuse a screen file already in --scratch")
    args, extra = parser.parse_known_args(argv)
    argv = list(sys.argv[1:] if argv is None else argv)
    unknown = [item for item in extra if item.startswith("-")]
    if unknown:
        parser.error(f"unrecognised arguments: {' '.join(unknown)}")

    scratch = Path(args.scratch) if args.scratch else Path(tempfile.mkdtemp(prefix="deltanmf_screen_"))
    scratch.mkdir(parents=True, exist_ok=True)
    created: list[Path] = []  # only what this invocation made is removed at the end
    results = []
    try:
        for seed in args.seeds:
            path = scratch / _file_name(args, seed)
            if args.reuse and path.exists():
                print(f"seed {seed}: reusing {path}", flush=True)
                file = {"path": str(path), "cells": args.cells, "bytes": path.stat().st_size, "seconds": None}
            else:
                print(f"seed {seed}: writing {path}", flush=True)
                created.append(path)
                file = write_screen(path, args.cells, args.genes, args.targets, args.guides, args.nt_guides,
                                    args.nt_fraction, args.programs, args.case_programs, args.shift_targets,
                                    args.case_targets, args.guide_sd, args.shift_factor, args.case_fraction,
                                    args.concentration, args.density, args.chunk, seed,
                                    markers_per_program=args.markers)
            read = full_read(path, scratch / f"read_seed{seed}.log")
            created.append(scratch / f"read_seed{seed}.log")
            print(f"seed {seed}: {file['bytes'] / 1e9:.2f} GB, full read {read['read_s']:.1f}s", flush=True)
            run_dir = scratch / f"run_{path.stem}"
            created += [run_dir, run_dir.parent / f"{run_dir.name}.log"]
            load_before = _load()
            run = fit(path, run_dir, args.programs, args.case_programs, extra)
            load_after = _load()
            print(f"seed {seed}: fit {run['wall_s']:.1f}s, peak {run['peak_rss_gb']:.2f} GB", flush=True)
            metrics = run.pop("metrics")
            evaluation = evaluate(run_dir, path)
            truth = ad.read_h5ad(path, backed="r")
            params = dict(truth.uns[SCREEN_KEY]["params"])
            truth.file.close()
            results.append({
                "seed": seed, "params": {k: v.item() if hasattr(v, "item") else v for k, v in params.items()},
                "file": file, "read": read, "fit": run, "load_before": load_before, "load_after": load_after,
                "timings": _flat(metrics.get("timings") or {}),
                "negative_controls": _negative_controls(metrics),
                "metrics_wall_time_s": metrics.get("wall_time_s"),
                "recovery": metrics.get("recovery"), "evaluation": evaluation,
            })
    finally:
        if not args.keep:
            for item in created:
                if item.is_dir():
                    shutil.rmtree(item, ignore_errors=True)
                elif item.exists():
                    item.unlink()
            if not args.scratch:
                shutil.rmtree(scratch, ignore_errors=True)
    if not results:
        return
    text, means = report(results, argv, extra)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"screen_{args.cells}"
    summary = {"argv": argv, "extra_overrides": extra, "date": datetime.now().isoformat(timespec="seconds"),
               "machine": {"cpus": os.cpu_count(), "arch": platform.machine(), "python": platform.python_version()},
               "scratch": str(scratch), "kept": args.keep, "seeds": results, "mean": means}
    (out_dir / f"{stem}.json").write_text(json.dumps(summary, indent=2, default=_json_default))
    (out_dir / f"{stem}.md").write_text(text)
    print(text)


def _json_default(value):
    """numpy scalars and arrays in the summary."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


if __name__ == "__main__":
    main()
