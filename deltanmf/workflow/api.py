"""Python API for notebooks: the same code path as ``train.py``, on an in-memory AnnData.

>>> import deltanmf
>>> res = deltanmf.fit_twostage(adata, K=12, K_case=3, condition_key="guide", control="NTC")
>>> res.usage_shift.sort_values("q_value").head()
>>> adata.obsm["X_deltanmf"]          # written back, scanpy style
"""
from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
from ..errors import InputError
from .config import compose, load_settings


@dataclass
class DeltaNMFResult:
    """What a fit returns.

    Attributes
    ----------
    results
        The results AnnData (as ``results.h5ad``): fitted cells x kept genes, no ``.X``.
    programs
        Programs, genes x programs (``baseline_1``..., then ``case_1``...).
    usage
        Usage, fitted cells x programs.
    usage_shift, case_programs, group_usage
        Case-control tables (two-stage fits; ``group_usage`` with ``group_key``), else None.
    metrics
        The contents of ``metrics.json``.
    out_dir
        Where the files were written, or None.
    """

    results: ad.AnnData
    programs: pd.DataFrame
    usage: pd.DataFrame
    usage_shift: pd.DataFrame | None
    case_programs: pd.DataFrame | None
    group_usage: pd.DataFrame | None
    metrics: dict
    out_dir: Path | None


def _value(v) -> str:
    if v is None:
        return "null"
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_value(x) for x in v) + "]"
    if isinstance(v, str):
        return "'" + v.replace("'", "\\'") + "'"
    return str(v)


def _write_back(adata: ad.AnnData, result: ad.AnnData) -> None:
    """Scanpy style: results go into the user's AnnData; cells or genes not fitted get NaN."""
    cells = adata.obs_names.get_indexer(result.obs_names)
    genes = adata.var_names.get_indexer(result.var_names)
    n_programs = result.obsm["X_deltanmf"].shape[1]
    usage = np.full((adata.n_obs, n_programs), np.nan, dtype=np.float32)
    usage[cells] = result.obsm["X_deltanmf"]
    adata.obsm["X_deltanmf"] = usage
    if "X_deltanmf_refit" in result.obsm:
        refit = np.full_like(usage, np.nan)
        refit[cells] = result.obsm["X_deltanmf_refit"]
        adata.obsm["X_deltanmf_refit"] = refit
    programs = np.full((adata.n_vars, n_programs), np.nan, dtype=np.float32)
    programs[genes] = result.varm["deltanmf_programs"]
    adata.varm["deltanmf_programs"] = programs
    scale = np.full(adata.n_vars, np.nan)
    scale[genes] = result.var["deltanmf_gene_scale"].to_numpy()
    adata.var["deltanmf_gene_scale"] = scale
    if "deltanmf_novelty" in result.obs:
        novelty = np.full(adata.n_obs, np.nan)
        novelty[cells] = result.obs["deltanmf_novelty"].to_numpy()
        adata.obs["deltanmf_novelty"] = novelty
    adata.uns["deltanmf"] = dict(result.uns["deltanmf"])


def _fit(adata: ad.AnnData, stage: str, settings: dict, out_dir, overrides: Sequence[str]) -> DeltaNMFResult:
    if not isinstance(adata, ad.AnnData):
        raise InputError(f"adata must be an anndata.AnnData, got {type(adata).__name__}")
    if len(set(adata.obs_names)) != adata.n_obs or len(set(adata.var_names)) != adata.n_vars:
        raise InputError("adata has duplicate cell or gene names; run adata.obs_names_make_unique() / "
                         "adata.var_names_make_unique() first")
    items = [f"stage={stage}", "data=h5ad", "data.path=null", "data.source=anndata"]
    items += [f"{key}={_value(value)}" for key, value in settings.items()]
    if out_dir is None:
        items.append("logger=none")  # nothing is kept: no TensorBoard files in a folder about to go
    settings = load_settings(compose(items + list(overrides)))
    from .main import quiet_lightning
    from .run import run  # torch, Lightning: after the settings are checked

    quiet_lightning()
    with tempfile.TemporaryDirectory(prefix="deltanmf-") as scratch:
        run_dir = Path(out_dir) if out_dir is not None else Path(scratch)
        out = run(settings, run_dir, adata=adata)
    result = out.results
    names = list(result.uns["deltanmf"]["program_names"])
    _write_back(adata, result)
    return DeltaNMFResult(
        results=result,
        programs=pd.DataFrame(result.varm["deltanmf_programs"], index=result.var_names, columns=names),
        usage=pd.DataFrame(result.obsm["X_deltanmf"], index=result.obs_names, columns=names),
        usage_shift=out.tables.get("usage_shift"),
        case_programs=out.tables.get("case_programs"),
        group_usage=out.tables.get("group_usage"),
        metrics=out.metrics,
        out_dir=None if out_dir is None else Path(out_dir),
    )


def fit_onestage(adata: ad.AnnData, K: int = 10, *, condition_key: str = "condition", control="control",
                 layer: str | None = None, batch_size: int | None = None, seed: int = 0,
                 out_dir: str | Path | None = None, overrides: Sequence[str] = ()) -> DeltaNMFResult:
    """Fit baseline programs on the control cells (stage 1 only).

    Parameters
    ----------
    adata
        Cells x genes, non-negative expression (counts or normalised, not log-centred).
    K
        Number of baseline programs.
    condition_key, control
        ``.obs`` column and the value marking control cells.
    layer
        Layer to factorise instead of ``.X``.
    batch_size
        Cells per minibatch; None for full batch.
    seed
        Random seed.
    out_dir
        Also write every output file (as ``train.py`` does) into this folder.
    overrides
        Any further Hydra overrides, e.g. ``["model.lr=0.005", "data.normalize=median"]``.

    Returns
    -------
    DeltaNMFResult

    Notes
    -----
    Writes into ``adata``: ``.obsm["X_deltanmf"]`` (usage, cells x K; NaN for cells not
    fitted), ``.varm["deltanmf_programs"]`` (genes x K; NaN for genes filtered out),
    ``.var["deltanmf_gene_scale"]`` (divisor of unit-variance scaling) and ``.uns["deltanmf"]`` (program names and kinds, configuration, gene counts, losses).
    """
    settings = dict(K=K, seed=seed, **{"data.condition_key": condition_key, "data.control": control,
                                        "data.layer": layer, "data.batch_size": batch_size})
    return _fit(adata, "onestage", settings, out_dir, overrides)


def fit_twostage(adata: ad.AnnData, K: int = 10, K_case: int = 3, *, condition_key: str = "condition",
                 control="control", case=None, group_key: str | None = None, sample_key: str | None = None,
                 layer: str | None = None, batch_size: int | None = None, stage1_from: str | Path | None = None,
                 seed: int = 0,
                 out_dir: str | Path | None = None, overrides: Sequence[str] = ()) -> DeltaNMFResult:
    """Fit baseline programs on controls, then case-specific programs on cases (baseline frozen).

    Parameters
    ----------
    adata
        Cells x genes, non-negative expression.
    K, K_case
        Numbers of baseline and case-specific programs.
    condition_key, control, case
        ``.obs`` column, control value, and case value (None: every non-control cell).
    group_key
        ``.obs`` column of perturbation groups for the per-group table.
    sample_key
        ``.obs`` column of the replicate unit (donor, sample, guide): the tables then test
        across samples (``docs/statistics.md``); None tests cells, with a warning.
    layer, batch_size, seed, out_dir, overrides
        As for :func:`fit_onestage`.
    stage1_from
        A finished run directory (or its ``results.h5ad``) whose baseline is reused.

    Returns
    -------
    DeltaNMFResult
        With ``usage_shift``, ``case_programs`` and (with ``group_key``) ``group_usage``.

    Notes
    -----
    Writes into ``adata``: ``.obsm["X_deltanmf"]`` (cells x (K + K_case); control cells
    carry their stage-1 usage and zero case usage; NaN for cells not fitted),
    ``.obsm["X_deltanmf_refit"]`` (usage of every fitted cell by NNLS on all programs, which
    the statistics use), ``.varm["deltanmf_programs"]``, ``.obs["deltanmf_novelty"]`` (share
    of a cell's usage from case programs) and ``.uns["deltanmf"]``.
    """
    settings = dict(K=K, K_case=K_case, seed=seed, stage1_from=None if stage1_from is None else str(stage1_from),
                    **{"data.condition_key": condition_key, "data.control": control, "data.case": case,
                       "data.group_key": group_key, "data.sample_key": sample_key, "data.layer": layer,
                       "data.batch_size": batch_size})
    return _fit(adata, "twostage", settings, out_dir, overrides)
