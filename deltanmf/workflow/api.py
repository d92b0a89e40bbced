"""Python API for notebooks: the same code path as ``train.py``, on an in-memory AnnData.

>>> import deltanmf
>>> res = deltanmf.fit_twostage(adata, K=12, K_case=3, condition_key="guide", control="NTC")
>>> res.usage_shift.sort_values("q_value").head()
>>> adata.obsm["X_deltanmf"]          # written back, scanpy style

Every keyword left at ``None`` takes the configuration's default (``conf/``, the same as the
command line's); errors name the keywords of this API (``layer="counts"``), not the command
line's keys.
"""
from __future__ import annotations

import contextlib
import logging
import re
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
from ..data.programs import PROGRAMS_KEY, SCALED_KEY, SPECIFICITY_KEY
from ..errors import InputError
from ..settings import show
from .config import compose, load_settings

log = logging.getLogger(__name__)

# configuration keys this API takes as keywords
KEYWORDS = {"K": "K", "K_case": "K_case", "seed": "seed", "stage1_from": "stage1_from", "data.layer": "layer",
            "data.use_raw": "use_raw", "data.condition_key": "condition_key", "data.control": "control",
            "data.case": "case", "data.group_key": "group_key", "data.sample_key": "sample_key",
            "data.pair_key": "pair_key", "data.celltype_key": "celltype_key",
            "data.normalize": "normalize", "data.batch_size": "batch_size",
            "hydra.run.dir": "out_dir"}
_SETTING = re.compile(r"(?<![\w.])(" + "|".join(re.escape(k) for k in sorted(KEYWORDS, key=len, reverse=True))
                      + r")=('[^']*'|\"[^\"]*\"|\.\.\.|[^\s,;():'\"]*[^\s,;():'\".])")


@dataclass
class DeltaNMFResult:
    """What a fit returns.

    Attributes
    ----------
    results
        The results AnnData (as ``results/results.h5ad``): fitted cells x kept genes, no ``.X``.
    programs
        Programs in expression units, genes x programs (``baseline_1``..., then ``case_1``...);
        the fitted (scaled) programs and the specificity score are in ``results.varm``
        (``docs/programs.md``).
    usage
        Usage, fitted cells x programs.
    usage_refit
        Two-stage fits: the usage of every fitted cell by NNLS on all programs (what the
        case-control statistics use), cells x programs; else None.
    usage_shift, case_programs, group_usage, celltype_shift
        Case-control tables (two-stage fits; ``group_usage`` with ``group_key``,
        ``celltype_shift`` with ``celltype_key``), else None.
    tables
        Every table the run wrote, by name (``program_annotation``, ``negative_controls``...).
    metrics
        The contents of ``metrics.json``.
    out_dir
        Where the files were written (``out_dir/results/``), or None.
    """

    results: ad.AnnData
    programs: pd.DataFrame
    usage: pd.DataFrame
    usage_refit: pd.DataFrame | None
    usage_shift: pd.DataFrame | None
    case_programs: pd.DataFrame | None
    group_usage: pd.DataFrame | None
    celltype_shift: pd.DataFrame | None
    tables: dict
    metrics: dict
    out_dir: Path | None


def _python(value: str) -> str:
    """A command-line value as Python code (``null`` -> ``None``, ``counts`` -> ``'counts'``)."""
    if value in ("null", "true", "false"):
        return {"null": "None", "true": "True", "false": "False"}[value]
    try:
        float(value)
        return value
    except ValueError:
        return repr(value.strip("'\""))


_OVERRIDE = re.compile(r"(?<![\w.\"])((?:overwrite|resume)=true)")


def for_python(message: str) -> str:
    """An error message with the command line's keys (``data.layer=counts``) as this API's
    keywords (``layer='counts'``), and settings it takes no keyword for as its ``overrides``
    (``overrides=["overwrite=true"]``)."""
    message = _OVERRIDE.sub(lambda m: f'overrides=["{m.group(1)}"]', message)
    return _SETTING.sub(lambda m: f"{KEYWORDS[m.group(1)]}=" + ("..." if m.group(2) == "..." else _python(m.group(2))),
                        message)


@contextlib.contextmanager
def _logging(verbose: bool):
    """The command line's log lines on stderr while a fit runs (``verbose``), unless logging is
    configured already; ``verbose=False``: warnings only."""
    logger = logging.getLogger("deltanmf")
    # Lightning's own lines ("GPU available: ...") come from loggers that have levels of their own
    lightning_loggers = [logging.getLogger(name) for name in ("lightning", "lightning.pytorch", "lightning.fabric")]
    level, lightning_levels, handler = logger.level, [lg.level for lg in lightning_loggers], None
    logger.setLevel(logging.INFO if verbose else logging.WARNING)
    if not verbose:
        for lightning_logger in lightning_loggers:
            lightning_logger.setLevel(logging.WARNING)
    if verbose and not logging.getLogger().handlers and not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("deltanmf: %(message)s"))
        logger.addHandler(handler)
    try:
        yield
    finally:
        logger.setLevel(level)
        for lightning_logger, lightning_level in zip(lightning_loggers, lightning_levels):
            lightning_logger.setLevel(lightning_level)
        if handler is not None:
            logger.removeHandler(handler)


def _no_scratch_path(record: logging.LogRecord) -> bool:
    """Drop the line naming the run directory when it is a scratch folder about to go."""
    return not str(record.msg).startswith("results written to")


def _write_back(adata: ad.AnnData, result: ad.AnnData) -> None:
    """Scanpy style: results go into the user's AnnData; cells or genes not fitted get NaN (genes
    of ``.raw`` that ``.var`` lacks, with ``use_raw=True``, are not written back)."""
    cells = adata.obs_names.get_indexer(result.obs_names)
    genes = adata.var_names.get_indexer(result.var_names)
    found = genes >= 0
    n_programs = result.obsm["X_deltanmf"].shape[1]
    usage = np.full((adata.n_obs, n_programs), np.nan, dtype=np.float32)
    usage[cells] = result.obsm["X_deltanmf"]
    adata.obsm["X_deltanmf"] = usage
    if "X_deltanmf_refit" in result.obsm:
        refit = np.full_like(usage, np.nan)
        refit[cells] = result.obsm["X_deltanmf_refit"]
        adata.obsm["X_deltanmf_refit"] = refit
    for key in (PROGRAMS_KEY, SCALED_KEY, SPECIFICITY_KEY):
        if key in result.varm:
            values = np.full((adata.n_vars, n_programs), np.nan, dtype=np.float32)
            values[genes[found]] = np.asarray(result.varm[key])[found]
            adata.varm[key] = values
    scale = np.full(adata.n_vars, np.nan)
    scale[genes[found]] = result.var["deltanmf_gene_scale"].to_numpy()[found]
    adata.var["deltanmf_gene_scale"] = scale
    if "deltanmf_novelty" in result.obs:
        novelty = np.full(adata.n_obs, np.nan)
        novelty[cells] = result.obs["deltanmf_novelty"].to_numpy()
        adata.obs["deltanmf_novelty"] = novelty
    adata.uns["deltanmf"] = dict(result.uns["deltanmf"])


def _fit(adata: ad.AnnData, stage: str, settings: dict, out_dir, overrides: Sequence[str],
         verbose: bool) -> DeltaNMFResult:
    if not isinstance(adata, ad.AnnData):
        raise InputError(f"adata must be an anndata.AnnData, got {type(adata).__name__}")
    if adata.isbacked:
        raise InputError(f"adata is opened in backed mode ({adata.filename}): load it into memory with "
                         "anndata.read_h5ad(path), or fit the file from disk on the command line: "
                         "python train.py data=h5ad data.path=<file> data.backed=true data.batch_size=4096")
    if len(set(adata.obs_names)) != adata.n_obs or len(set(adata.var_names)) != adata.n_vars:
        raise InputError("adata has duplicate cell or gene names; run adata.obs_names_make_unique() / "
                         "adata.var_names_make_unique() first")
    items = [f"stage={stage}", "data=h5ad", "data.path=null", "data.source=anndata"]
    given = {key for key, value in settings.items() if value is not None}
    items += [f"{key}={show(value, quoted=True)}" for key, value in settings.items() if value is not None]
    if out_dir is None:
        items.append("logger=none")  # nothing is kept: no TensorBoard files in a folder about to go
    if not verbose:
        items.append("trainer.enable_progress_bar=false")  # overrides may still turn it on
    # a K given must agree with stage1_from's programs (deltanmf.workflow.run)
    given = frozenset(given | {item.split("=", 1)[0].lstrip("+~") for item in overrides})
    try:
        run_settings = load_settings(compose(items + list(overrides)))
        from .main import quiet_lightning
        from .run import run  # torch, Lightning: after the settings are checked

        quiet_lightning()
        with _logging(verbose), tempfile.TemporaryDirectory(prefix="deltanmf-") as scratch:
            run_dir = Path(out_dir) if out_dir is not None else Path(scratch)
            run_log = logging.getLogger("deltanmf.workflow.run")
            if out_dir is None:  # the files go with the scratch folder: do not send the user there
                run_log.addFilter(_no_scratch_path)
            try:
                out = run(run_settings, run_dir, adata=adata, given=given)
            finally:
                run_log.removeFilter(_no_scratch_path)
            if out_dir is None:
                log.info("results returned and written into adata (out_dir=<folder> also keeps the files)")
    except InputError as err:
        raise InputError(for_python(str(err))) from None
    result = out.results
    names = list(result.uns["deltanmf"]["program_names"])
    _write_back(adata, result)
    refit = result.obsm.get("X_deltanmf_refit")
    return DeltaNMFResult(
        results=result,
        programs=pd.DataFrame(result.varm["deltanmf_programs"], index=result.var_names, columns=names),
        usage=pd.DataFrame(result.obsm["X_deltanmf"], index=result.obs_names, columns=names),
        usage_refit=None if refit is None else pd.DataFrame(refit, index=result.obs_names, columns=names),
        usage_shift=out.tables.get("usage_shift"),
        case_programs=out.tables.get("case_programs"),
        group_usage=out.tables.get("group_usage"),
        celltype_shift=out.tables.get("celltype_shift"),
        tables=dict(out.tables),
        metrics=out.metrics,
        out_dir=None if out_dir is None else Path(out_dir),
    )


def fit_onestage(adata: ad.AnnData, K: int | None = None, *, condition_key: str | None = None, control=None,
                 layer: str | None = None, use_raw: bool | None = None, normalize: str | None = None,
                 batch_size: int | None = None,
                 seed: int | None = None, out_dir: str | Path | None = None, overrides: Sequence[str] = (),
                 verbose: bool = True) -> DeltaNMFResult:
    """Fit baseline programs on the control cells (stage 1 only).

    Parameters
    ----------
    adata
        Cells x genes, non-negative expression (counts or normalised, not log-centred), in memory.
    K
        Number of baseline programs (None: the configuration's ``K``).
    condition_key, control
        ``.obs`` column and the value marking control cells (None: ``condition`` / ``control``).
    layer
        Layer to factorise instead of ``.X``.
    use_raw
        Factorise ``.raw.X`` (e.g. the counts scanpy keeps there) instead of ``.X``.
    normalize
        Cell normalisation before fitting: ``none`` (the values as given), ``total`` (every cell
        to 10,000) or ``median`` (to the median total); None: the configuration's (``none``).
    batch_size
        Cells per minibatch; None for full batch.
    seed
        Random seed.
    out_dir
        Also write every output file (as ``train.py`` does) into this folder.
    overrides
        Any further Hydra overrides, e.g. ``["model.lr=0.005", "data.normalize=median"]``.
    verbose
        Log the run's summary lines on stderr (as the command line does); False: warnings only.

    Returns
    -------
    DeltaNMFResult

    Notes
    -----
    Writes into ``adata``: ``.obsm["X_deltanmf"]`` (usage, cells x K; NaN for cells not
    fitted), ``.varm["deltanmf_programs"]`` (genes x K in expression units; NaN for genes
    filtered out), ``.varm["deltanmf_programs_scaled"]`` (as fitted), ``.varm["deltanmf_specificity"]``,
    ``.var["deltanmf_gene_scale"]`` (divisor of unit-variance scaling) and ``.uns["deltanmf"]`` (program names and kinds, configuration, gene counts, losses).
    """
    settings = {"K": K, "seed": seed, "data.condition_key": condition_key, "data.control": control,
                "data.layer": layer, "data.use_raw": use_raw, "data.normalize": normalize,
                "data.batch_size": batch_size}
    return _fit(adata, "onestage", settings, out_dir, overrides, verbose)


def fit_twostage(adata: ad.AnnData, K: int | None = None, K_case: int | None = None, *,
                 condition_key: str | None = None, control=None, case=None, group_key: str | None = None,
                 sample_key: str | None = None, pair_key: str | None = None, celltype_key: str | None = None,
                 layer: str | None = None, use_raw: bool | None = None,
                 normalize: str | None = None, batch_size: int | None = None,
                 stage1_from: str | Path | None = None, seed: int | None = None, out_dir: str | Path | None = None,
                 overrides: Sequence[str] = (), verbose: bool = True) -> DeltaNMFResult:
    """Fit baseline programs on controls, then case-specific programs on cases (baseline frozen).

    Parameters
    ----------
    adata
        Cells x genes, non-negative expression, in memory.
    K, K_case
        Numbers of baseline and case-specific programs (None: the configuration's ``K`` and
        ``K_case``; with ``stage1_from``, ``K=None`` takes the number of programs it holds).
    condition_key, control, case
        ``.obs`` column, control value, and case value (None: every non-control cell).
    group_key
        ``.obs`` column of perturbation groups for the per-group table.
    sample_key
        ``.obs`` column of the replicate unit (donor, sample, guide): the tables then test
        across samples (``docs/statistics.md``); None tests cells, with a warning.
    pair_key
        ``.obs`` column of the unit measured in both conditions (donor, patient): a paired
        design, the pair a blocking factor (``docs/statistics.md``, "Paired designs").
    celltype_key
        ``.obs`` column of the cell type: ``celltype_shift`` compares each type's cases with
        the same type's controls.
    layer, use_raw, normalize, batch_size, seed, out_dir, overrides, verbose
        As for :func:`fit_onestage`.
    stage1_from
        A finished run directory (or its ``results.h5ad``) whose baseline is reused, or a
        programs file (``docs/programs.md``): its programs are the frozen baseline.

    Returns
    -------
    DeltaNMFResult
        With ``usage_refit``, ``usage_shift``, ``case_programs``, (with ``group_key``) ``group_usage``,
        (with ``celltype_key``) ``celltype_shift``; every table in ``tables``.

    Notes
    -----
    Writes into ``adata``: ``.obsm["X_deltanmf"]`` (cells x (K + K_case); control cells
    carry their stage-1 usage and zero case usage; NaN for cells not fitted),
    ``.obsm["X_deltanmf_refit"]`` (usage of every fitted cell by NNLS on all programs, which
    the statistics use), ``.varm["deltanmf_programs"]`` (expression units),
    ``.varm["deltanmf_programs_scaled"]`` (as fitted), ``.varm["deltanmf_specificity"]``,
    ``.obs["deltanmf_novelty"]`` (share of a cell's usage from case programs) and
    ``.uns["deltanmf"]`` (with the case-control tables).
    """
    settings = {"K": K, "K_case": K_case, "seed": seed, "stage1_from": stage1_from,
                "data.condition_key": condition_key, "data.control": control, "data.case": case,
                "data.group_key": group_key, "data.sample_key": sample_key, "data.pair_key": pair_key,
                "data.celltype_key": celltype_key, "data.layer": layer,
                "data.use_raw": use_raw, "data.normalize": normalize, "data.batch_size": batch_size}
    return _fit(adata, "twostage", settings, out_dir, overrides, verbose)
