"""Reading programs back: the baseline of a finished run, for ``stage1_from``."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from ..errors import InputError
from ..files import results_dir


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


def load_stage1(path: str | Path) -> Baseline:
    """Read a finished stage 1 from its run directory or its ``results.h5ad``."""
    path = Path(path).expanduser()
    file = results_dir(path) / "results.h5ad" if path.is_dir() else path
    if not file.exists():
        raise InputError(f"stage1_from: no results.h5ad at {file}; give a finished run directory or its results.h5ad")
    try:
        result = ad.read_h5ad(file)
    except Exception as err:  # noqa: BLE001 - h5py/anndata raise many types for a damaged file
        raise InputError(f"stage1_from: cannot read {file} ({type(err).__name__}: {err}); the file is damaged or not "
                         "an .h5ad: rerun that stage 1, or give another run") from None
    info = result.uns.get("deltanmf")
    if info is None or "deltanmf_programs" not in result.varm:
        raise InputError(f"stage1_from: {file} is not a DeltaNMF result (no .uns['deltanmf'] / .varm['deltanmf_programs'])")
    kind = np.asarray(info["program_kind"]).astype(str)
    base = kind == "baseline"
    names = list(np.asarray(info["program_names"]).astype(str)[base])
    usage = pd.DataFrame(np.asarray(result.obsm["X_deltanmf"])[:, base], index=result.obs_names, columns=names)
    scale_key = "deltanmf_gene_scale"
    scale = result.var[scale_key].to_numpy() if scale_key in result.var else np.ones(result.n_vars)
    return Baseline(programs=np.asarray(result.varm["deltanmf_programs"])[:, base].astype(np.float32),
                    names=names, genes=list(result.var_names), gene_scale=scale, usage=usage,
                    stats=dict(info.get("stage1", {})), source=str(file), twostage=bool((~base).any()))
