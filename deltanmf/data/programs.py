"""Reading programs back: a finished run (its ``results.h5ad``), for ``stage1_from`` and for
projecting onto new cells; reference programs from other tools are read by
:mod:`deltanmf.data.reference`.

The keys a run writes are defined here, the layer both the writer
(:mod:`deltanmf.workflow.outputs`) and the readers import.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from ..errors import InputError
from ..files import results_dir

GENE_SCALE_KEY = "deltanmf_gene_scale"  # .var: the divisor of each gene's scaling
PROGRAMS_KEY = "deltanmf_programs"  # .varm: programs in expression units
SCALED_KEY = "deltanmf_programs_scaled"  # .varm: the fitted programs, in the units the run fitted (genes scaled)
SPECIFICITY_KEY = "deltanmf_specificity"  # .varm: the specificity score (deltanmf.tl.programs.specificity)


@dataclass
class Baseline:
    """The baseline programs of a finished stage 1, as read back by :func:`load_stage1`.

    Attributes
    ----------
    programs
        Genes x K, in the units that run was fitted in (its scaled genes).
    names, genes, gene_scale
        Program names, the run's genes (in order) and their scale.
    usage
        The run's usage of its control cells (cells x K).
    stats
        What that run reported of its stage 1.
    source
        The file read.
    twostage
        The source run fitted case programs too (its gene scale pooled controls and cases).
    """

    programs: np.ndarray
    names: list[str]
    genes: list[str]
    gene_scale: np.ndarray
    usage: pd.DataFrame
    stats: dict
    source: str
    twostage: bool = True


def results_file(path: str | Path) -> Path:
    """The ``results.h5ad`` of a run directory, or ``path`` itself when it is a file."""
    path = Path(path).expanduser()
    return results_dir(path) / "results.h5ad" if path.is_dir() else path


def is_run(path: str | Path) -> bool:
    """Whether ``path`` is a run directory or an ``.h5ad`` (which :func:`read_run` then reads
    as a run unless a ``.varm`` key is given)."""
    path = Path(path).expanduser()
    return path.is_dir() or path.suffix.lower() == ".h5ad"


def read_run(path: str | Path, what: str = "stage1_from") -> ad.AnnData:
    """A finished run's ``results.h5ad`` (from its directory or the file); ``what`` names the
    setting or argument in errors."""
    file = results_file(path)
    if not file.exists():
        inside = file.parent / "results" / file.name  # <run>/results.h5ad for <run>/results/results.h5ad
        hint = f" (did you mean {inside}?)" if inside.exists() else ""
        raise InputError(f"{what}: no results.h5ad at {file}{hint}; give a finished run directory or its "
                         "results/results.h5ad")
    try:
        result = ad.read_h5ad(file)
    except Exception as exc:  # noqa: BLE001 - h5py/anndata raise many types for a damaged file
        raise InputError(f"{what}: cannot read {file} as an .h5ad file ({type(exc).__name__}: {exc}); the file is "
                         "damaged or not an .h5ad: rerun that run, or give another") from None
    if "deltanmf" not in result.uns or PROGRAMS_KEY not in result.varm:
        key = "stage1_varm_key=..." if what == "stage1_from" else "varm_key=..., --varm-key on the command line"
        raise InputError(f"{what}: {file} is not a DeltaNMF result (no .uns['deltanmf'] / .varm[{PROGRAMS_KEY!r}]); "
                         f"for programs in another .h5ad's .varm, name their key ({key})")
    return result


def fitted_programs(result: ad.AnnData) -> np.ndarray:
    """A run's programs in the units it fitted them in (genes x K). Runs written before the
    expression units existed kept only those, under ``.varm['deltanmf_programs']``."""
    key = SCALED_KEY if SCALED_KEY in result.varm else PROGRAMS_KEY
    return np.asarray(result.varm[key], dtype=np.float32)


def gene_scale(result: ad.AnnData) -> np.ndarray:
    """A run's per-gene scale (ones if it did not scale)."""
    return result.var[GENE_SCALE_KEY].to_numpy(dtype=np.float64) if GENE_SCALE_KEY in result.var \
        else np.ones(result.n_vars)


def load_stage1(path: str | Path) -> Baseline:
    """Read a finished stage 1 from its run directory or its ``results.h5ad``."""
    result = read_run(path)
    info = result.uns["deltanmf"]
    kind = np.asarray(info["program_kind"]).astype(str)
    base = kind == "baseline"
    names = list(np.asarray(info["program_names"]).astype(str)[base])
    usage = pd.DataFrame(np.asarray(result.obsm["X_deltanmf"])[:, base], index=result.obs_names, columns=names)
    return Baseline(programs=fitted_programs(result)[:, base], names=names, genes=list(result.var_names),
                    gene_scale=gene_scale(result), usage=usage, stats=dict(info.get("stage1", {})),
                    source=str(results_file(path)), twostage=bool((~base).any()))
