"""The replicate units of a dataset (``data.sample_key``) and their covariates, checked
before any training.

A *sample* is the unit of replication: a donor, a sample, a guide in a Perturb-seq screen.
Each sample belongs to one condition. Covariates (``report.covariates``) are properties of
samples (sex, batch): constant within a sample. A *pair* (``data.pair_key``) is a unit
measured in both conditions (a donor split into a control and a stimulated sample): a
blocking factor of the tests; without a sample key the units are the pairs' halves.
"""
from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from ..errors import InputError
from .sampletests import SampleOptions, block_columns, condition_in_covariates, covariate_matrix, units_of

log = logging.getLogger(__name__)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _examples(values, n: int = 3) -> str:
    values = list(values)
    more = f" and {len(values) - n} more" if len(values) > n else ""
    return ", ".join(repr(v) for v in values[:n]) + more


def sample_labels(obs: pd.DataFrame, sample_key: str) -> np.ndarray:
    """Each cell's sample, as text (labels compared as strings, like conditions)."""
    if sample_key not in obs.columns:
        raise InputError(f"data.sample_key={sample_key!r} is not a column of .obs; columns: {list(obs.columns)} "
                         "(give the column of the replicate unit: donor, sample or guide; data.sample_key=null "
                         "tests cells as replicates)")
    column = obs[sample_key]
    missing = column.isna().to_numpy()
    if missing.any():
        raise InputError(f"data.sample_key={sample_key!r}: {int(missing.sum())} cells have no sample (NaN in "
                         f".obs[{sample_key!r}]); give every cell its sample, or drop those cells")
    return column.astype(str).to_numpy()


def sample_covariates(obs: pd.DataFrame, samples: np.ndarray, covariates) -> pd.DataFrame | None:
    """One row per sample (index: the sample labels) of the covariates' values; refuses a
    covariate that is not a column, is missing for some cells, or varies within a sample."""
    if not covariates:
        return None
    for name in covariates:
        if name not in obs.columns:
            raise InputError(f"report.covariates: {name!r} is not a column of .obs; columns: {list(obs.columns)}")
        missing = obs[name].isna().to_numpy()
        if missing.any():
            raise InputError(f"report.covariates: {name!r} is missing (NaN) for {int(missing.sum())} cells; "
                             f"give every sample a value, or leave {name!r} out of report.covariates")
    frame = obs[list(covariates)].copy()
    frame.index = pd.Index(samples, name="sample")
    for name in covariates:
        levels = frame[name].astype(str).groupby(level=0, sort=True).nunique()
        varying = levels.index[levels > 1]
        if len(varying):
            raise InputError(f"report.covariates: {name!r} varies within samples ({_examples(varying)}); a covariate "
                             "is a property of the sample (sex, batch), constant over its cells: leave "
                             f"{name!r} out of report.covariates or choose a data.sample_key nested in it")
    return frame[~frame.index.duplicated()].sort_index()


def pair_labels(obs: pd.DataFrame, pair_key: str) -> np.ndarray:
    """Each cell's pair (the unit measured in both conditions: donor, patient), as text."""
    if pair_key not in obs.columns:
        raise InputError(f"data.pair_key={pair_key!r} is not a column of .obs; columns: {list(obs.columns)} "
                         "(give the column of the unit measured in both conditions: donor, patient, slice)")
    column = obs[pair_key]
    if column.isna().any():
        raise InputError(f"data.pair_key={pair_key!r}: {int(column.isna().sum())} cells have no pair (NaN in "
                         f".obs[{pair_key!r}]); give every cell its pair, or drop those cells")
    return column.astype(str).to_numpy()


def unit_labels(obs: pd.DataFrame, is_control: np.ndarray, sample_key: str | None,
                pair_key: str | None) -> np.ndarray:
    """Each cell's replicate unit: its sample, or with only a pair key, its pair in its
    condition (``"<pair> | control"``, ``"<pair> | case"``)."""
    if sample_key:
        return sample_labels(obs, sample_key)
    pairs = pair_labels(obs, pair_key)
    return np.char.add(np.char.add(pairs.astype(str), " | "),
                       np.where(np.asarray(is_control, dtype=bool), "control", "case"))


def unit_pairs(obs: pd.DataFrame, samples: np.ndarray, pair_key: str, sample_key: str | None) -> pd.Series:
    """Each unit's pair (index: the unit labels); refuses a sample spread over several pairs."""
    frame = pd.DataFrame({"unit": samples, "pair": pair_labels(obs, pair_key)})
    spread = frame.groupby("unit")["pair"].nunique()
    if (spread > 1).any():
        raise InputError(f"data.sample_key={sample_key!r} is not nested in data.pair_key={pair_key!r}: "
                         f"{_count(int((spread > 1).sum()), 'sample')} hold cells of several pairs "
                         f"({_examples(spread.index[spread > 1])}); each sample must come from one pair (donor)")
    return frame.groupby("unit")["pair"].first()


def sample_options(obs: pd.DataFrame, sample_key: str | None, covariates, permutations: int, min_cells: int,
                   seed: int, moderate: bool = True, negative_controls: int = 200, pair_key: str | None = None,
                   is_control: np.ndarray | None = None, quiet: bool = False) -> tuple[np.ndarray, SampleOptions]:
    """Each cell's unit and the options of the sample-level tests. With ``pair_key``, the
    units' pairs; covariates constant within every pair are absorbed by the pair term and
    dropped (with a log line unless ``quiet``)."""
    if pair_key and not sample_key and is_control is None:
        raise ValueError("sample_options: a pair_key without a sample_key needs is_control (the units are pair halves)")
    samples = unit_labels(obs, is_control, sample_key, pair_key)
    pairs = None
    covariates = list(covariates or ())
    if pair_key:
        pairs = unit_pairs(obs, samples, pair_key, sample_key)
        cell_pairs = pair_labels(obs, pair_key)
        absorbed = [c for c in covariates if c in obs.columns
                    and (obs[c].astype(str).groupby(cell_pairs).nunique() <= 1).all()]
        if absorbed and not quiet:
            log.info("report.covariates %s are constant within every pair of data.pair_key=%r: the pair term "
                     "absorbs them, so they leave the model", absorbed, pair_key)
        covariates = [c for c in covariates if c not in absorbed]
    return samples, SampleOptions(covariates=sample_covariates(obs, samples, covariates), permutations=permutations,
                                  min_cells=min_cells, seed=seed, moderate=moderate,
                                  negative_controls=negative_controls, pairs=pairs)


def check_samples(obs: pd.DataFrame, is_control: np.ndarray, sample_key: str | None, covariates=(),
                  min_cells: int = 10, group_key: str | None = None, pair_key: str | None = None) -> None:
    """Refuse a design the sample-level tests cannot use, naming the column and the fix.

    Checks that ``sample_key`` is a column with a sample for every cell; that no sample
    holds cells of both conditions; that each condition has at least 2 samples of at least
    ``min_cells`` cells; that every covariate is a column, known for every cell, constant
    within each sample, and not collinear with the condition (overall and, with
    ``group_key``, in each group's comparison with the control samples); and that the
    samples leave a residual degree of freedom to the linear model.
    """
    is_control = np.asarray(is_control, dtype=bool)
    samples, options = sample_options(obs, sample_key, covariates, 0, min_cells, 0, pair_key=pair_key,
                                      is_control=is_control, quiet=True)
    setting = f"data.sample_key={sample_key!r}" if sample_key else f"data.pair_key={pair_key!r}"
    off = "data.sample_key=null" if sample_key else "data.pair_key=null"
    both = np.intersect1d(samples[is_control], samples[~is_control])
    if len(both):
        raise InputError(f"{setting}: {_count(len(both), 'sample')} hold both control and case cells "
                         f"({_examples(both)}); each sample must belong to one condition: give the column of a "
                         "replicate unit nested in the condition (e.g. one ID per donor and condition, or the guide). "
                         f"If each {sample_key} was measured in both conditions, the design is paired: "
                         f"data.pair_key={sample_key} (with data.sample_key=null, or the column of its samples)")
    kept = {}
    for name, side in (("control", is_control), ("case", ~is_control)):
        units = units_of(samples[side], min_cells)
        if len(units.names) < 2:
            sizes = ", ".join(f"{s!r}: {n} cells" for s, n in
                              sorted({**dict(zip(units.names, units.n_cells.tolist())), **units.dropped}.items()))
            raise InputError(f"{setting}: the {name} condition has {_count(len(units.names), 'sample')} "
                             f"with at least report.min_cells_per_sample={min_cells} cells ({sizes or 'no cells'}); "
                             "a test across samples needs at least 2 per condition: add samples, lower "
                             f"report.min_cells_per_sample, or set {off} for the cell-level test")
        kept[name] = units.names
    if pair_key:
        kept = _check_pairs(options.pairs, kept, pair_key, min_cells)
    if options.covariates is None and not pair_key:
        return
    names = [] if options.covariates is None else list(options.covariates.columns)
    rows = kept["case"] + kept["control"]
    z = np.zeros((len(rows), 0)) if options.covariates is None else covariate_matrix(options.covariates.loc[rows])
    if pair_key:  # the model's pair term, beside the covariates
        z = np.hstack([z, block_columns(options.pairs.loc[rows].to_numpy())])
        if not names:
            return
    is_case = np.r_[np.ones(len(kept["case"]), bool), np.zeros(len(kept["control"]), bool)]
    if condition_in_covariates(is_case, z):
        raise InputError(f"report.covariates={names} are collinear with the condition across the samples of "
                         f"{setting}: the case effect cannot be told apart from theirs; drop "
                         "the covariate that follows the condition from report.covariates")
    rank = np.linalg.matrix_rank(np.column_stack([np.ones(len(rows)), is_case, z]))
    if len(rows) <= rank:
        raise InputError(f"report.covariates={names}: {len(rows)} samples leave no residual degree of freedom to "
                         f"a model with {rank} terms; use fewer covariates or more samples")
    if group_key is None:
        return
    groups = obs[group_key].astype(str).to_numpy()
    case = ~is_control
    units = units_of(pd.MultiIndex.from_arrays([groups[case], samples[case]]).to_numpy(), min_cells)
    by_group: dict[str, list[str]] = {}
    for group, sample in units.names:
        by_group.setdefault(group, []).append(sample)
    collinear = []
    for group, members in by_group.items():
        z = covariate_matrix(options.covariates.loc[members + kept["control"]])
        if condition_in_covariates(np.r_[np.ones(len(members), bool), np.zeros(len(kept["control"]), bool)], z):
            collinear.append(group)
    if collinear:
        raise InputError(f"report.covariates={names} are collinear with membership of {_count(len(collinear), 'group')} of "
                         f"data.group_key={group_key!r} ({_examples(collinear)}): their samples cannot be told apart "
                         "from the control samples' covariates; drop that covariate from report.covariates")


def _check_pairs(pairs: pd.Series, kept: dict, pair_key: str, min_cells: int) -> dict:
    """At least 2 pairs with both conditions among the kept units; incomplete pairs are left
    out of the tests (and logged there). Returns the kept units of complete pairs."""
    complete = set(pairs.loc[kept["case"]]) & set(pairs.loc[kept["control"]])
    if len(complete) < 2:
        raise InputError(f"data.pair_key={pair_key!r}: {_count(len(complete), 'pair')} with both conditions among the "
                         f"units of at least report.min_cells_per_sample={min_cells} cells; a paired test needs at "
                         "least 2: check data.pair_key, or lower report.min_cells_per_sample")
    return {side: [u for u in units if pairs[u] in complete] for side, units in kept.items()}
