"""Writing a fit's results: results.h5ad, CSV tables and metrics.json.

All files of one call are first written into a hidden staging folder inside the run
directory and then renamed into place, so a crash leaves either the previous state or
complete files, never a half-written ``results.h5ad``.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

TOP_GENES = 50


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return None if not math.isfinite(float(value)) else float(value)
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value


def write_outputs(run_dir: str | Path, files: dict[str, Callable[[Path], None]]) -> list[Path]:
    """Write every file with its writer into a staging folder, then move all into ``run_dir``."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=run_dir))
    written = []
    try:
        for name, writer in files.items():
            writer(staging / name)
        for name in files:
            target = run_dir / name
            os.replace(staging / name, target)
            written.append(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return written


def results_anndata(obs: pd.DataFrame, var: pd.DataFrame, programs: np.ndarray, usage: np.ndarray,
                    program_names: list[str], program_kind: list[str], uns: dict) -> ad.AnnData:
    """The results AnnData (no ``.X``); keys documented in README ("Outputs")."""
    result = ad.AnnData(obs=obs.copy(), var=var.copy())
    result.obsm["X_deltanmf"] = np.asarray(usage, dtype=np.float32)
    result.varm["deltanmf_programs"] = np.asarray(programs, dtype=np.float32)
    result.uns["deltanmf"] = {
        "program_names": np.asarray(program_names, dtype=object),
        "program_kind": np.asarray(program_kind, dtype=object),
        **uns,
    }
    return result


def top_genes_table(programs: np.ndarray, program_names: list[str], genes: pd.Index,
                    symbols: pd.Series | None = None, n: int = TOP_GENES) -> pd.DataFrame:
    """Long table: program, rank (1 = highest weight), gene, [symbol,] weight."""
    rows = []
    n = min(n, programs.shape[0])
    for j, name in enumerate(program_names):
        order = np.argsort(-programs[:, j], kind="stable")[:n]
        for rank, g in enumerate(order, start=1):
            row = {"program": name, "rank": rank, "gene": genes[g]}
            if symbols is not None:
                row["symbol"] = symbols.iloc[g]
            row["weight"] = float(programs[g, j])
            rows.append(row)
    return pd.DataFrame(rows)


def standard_files(result: ad.AnnData, metrics: dict, symbol_key: str | None = None) -> dict:
    """Writers for results.h5ad, programs.csv, usage.csv, top_genes.csv and metrics.json."""
    names = list(result.uns["deltanmf"]["program_names"])
    programs = np.asarray(result.varm["deltanmf_programs"])
    usage = np.asarray(result.obsm["X_deltanmf"])
    symbols = result.var[symbol_key] if symbol_key and symbol_key in result.var else None

    def _h5ad(path):
        result.write_h5ad(path)

    def _programs(path):
        table = pd.DataFrame(programs, index=result.var_names, columns=names)
        table.index.name = "gene"
        table.to_csv(path)

    def _usage(path):
        table = pd.DataFrame(usage, index=result.obs_names, columns=names)
        table.index.name = "cell"
        table.to_csv(path)

    def _top(path):
        top_genes_table(programs, names, result.var_names, symbols).to_csv(path, index=False)

    def _metrics(path):
        with open(path, "w") as fh:
            json.dump(_jsonable(metrics), fh, indent=2)

    return {"results.h5ad": _h5ad, "programs.csv": _programs, "usage.csv": _usage,
            "top_genes.csv": _top, "metrics.json": _metrics}
