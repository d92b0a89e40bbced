"""Programs onto new cells: the usage of a finished run's programs, or of reference programs
from a file, in any dataset (``deltanmf.project``; ``python -m deltanmf.project``).

The new cells are prepared as the run prepared its own: the run's genes (matched by ID,
Ensembl versions stripped; genes the new data lacks are left out of the programs), its
matrix (its layer, or ``.raw`` when it read ``.raw``), its normalisation (the same target total) and its gene scale, so the programs apply
in the units they were fitted in. The usage is then each cell's non-negative least squares
fit (:func:`deltanmf.core.refit_usage`, batched, on a GPU when there is one), the solver the
pipeline uses for ``X_deltanmf_refit``: projecting a run onto its own cells reproduces that
usage.

Reference programs from a file (:mod:`deltanmf.data.reference`) carry no gene scale: the
new cells' genes are scaled to unit variance over those cells (as starCAT scales a query),
and expression programs are divided by the same scale.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import yaml

from ..data.blocks import looks_like_counts
from ..data.genes import check_unique
from ..data.prepare import prepare
from ..data.programs import fitted_programs, gene_scale, is_run, read_run, results_file
from ..data.reference import ReferencePrograms, coverage, in_run_units, read_programs
from ..errors import InputError
from ..resources import strip_version
from ..settings import NORMALIZE, DataSettings

log = logging.getLogger(__name__)

BATCH_CELLS = 10_000  # cells per NNLS block: memory bounded on any dataset size
FILE_NNLS_ITERATIONS = 500  # sweeps at most for file programs; the solver stops once they change < 1e-6


@dataclass
class _Source:
    """What a projection needs of its programs."""

    reference: ReferencePrograms  # the programs (genes x K) and their gene IDs
    kinds: list[str] | None
    scale: np.ndarray | None  # per gene of reference.genes; None: computed on the new cells
    layer: str | None
    use_raw: bool  # the run read .raw.X
    normalize: str
    target: float | None
    gene_id_column: str | None
    nnls_iterations: int
    counts: bool  # the run's input held counts (whole numbers)


def _run_source(path, what: str) -> _Source:
    result = read_run(path, what)
    info = result.uns["deltanmf"]
    config = yaml.safe_load(str(info.get("config", "{}"))) or {}  # the run's resolved configuration
    data = config.get("data", {})
    id_column = data.get("gene_id_column")
    ids = result.var[id_column] if id_column and id_column in result.var else result.var_names
    normalize = data.get("normalize", "none")
    target = info.get("normalize_target")
    if target is None and normalize == "total":
        target = data.get("target_sum") or 1e4
    if target is None and normalize == "median":  # a run written before the target was kept
        log.warning("%s: %s does not record its normalisation target; the median total of the new cells is used",
                    what, results_file(path))
    names = list(np.asarray(info["program_names"]).astype(str))
    genes = [strip_version(str(g)) for g in ids]
    programs = ReferencePrograms(fitted_programs(result).astype(np.float64), names, genes, "scaled",
                                 "run", str(results_file(path)))
    iterations = config.get("model", {}).get("consensus", {}).get("nnls_iterations", FILE_NNLS_ITERATIONS)
    return _Source(programs, list(np.asarray(info["program_kind"]).astype(str)), gene_scale(result),
                   data.get("layer"), bool(data.get("use_raw", False)), normalize,
                   None if target is None else float(target), id_column, int(iterations),
                   bool(info.get("input_counts", False)))


def _preparation(layer: str | None, use_raw: bool, normalize: str, target: float | None,
                 scale_genes: bool) -> DataSettings:
    """The data settings of the cells to project: every cell (:func:`prepare` with
    ``all_cells``) and the programs' genes, so the condition and gene filters do not apply."""
    if normalize not in NORMALIZE:
        raise InputError(f"normalize={normalize!r} must be one of {', '.join(NORMALIZE)}")
    if normalize == "median" and target is not None:
        normalize = "total"  # the run's median, a fixed target for the new cells
    return DataSettings(source="anndata", path=None, layer=layer, use_raw=use_raw, condition_key="condition",
                        control="control", case=None, allow_unlabelled=True, group_key=None, sample_key=None, pair_key=None, celltype_key=None,
                        symbol_key=None, gene_id_column=None, min_cells=0, remove_genes=(), gene_mask_key=None, n_top_genes=None, normalize=normalize,
                        target_sum=target, scale_genes=scale_genes, batch_size=None, backed=False, num_workers=0,
                        transposed_copy="auto", cache_dir=None, simulation=None)


def project(adata: ad.AnnData, source: str | Path, *, layer: str | None = None, use_raw: bool | None = None,
            gene_id_column: str | None = None,
            varm_key: str | None = None, units: str = "auto", normalize: str | None = None,
            target_sum: float | None = None, min_coverage: float = 0.5, batch_size: int = BATCH_CELLS,
            device=None, nnls_iterations: int | None = None, key_added: str = "X_deltanmf") -> pd.DataFrame:
    """Usage of programs in the cells of ``adata``, by non-negative least squares.

    Parameters
    ----------
    adata
        Cells x genes, non-negative expression of the kind the programs were fitted on
        (counts when the run read counts). Not modified except for the keys below.
    source
        A finished run directory or its ``results.h5ad``; or a programs file
        (:mod:`deltanmf.data.reference`: a cNMF/starCAT spectra ``.tsv``/``.txt``, a genes x
        programs ``.csv``/``.tsv``, or an ``.h5ad`` with ``varm_key``).
    layer
        Layer of ``adata`` to use. With ``layer`` and ``use_raw`` both None, the matrix the run
        read (its ``data.layer``, ``.raw`` or ``.X``), refused when ``adata`` lacks it; a run
        fitted on counts warns when the new values are not whole numbers.
    use_raw
        Use ``adata.raw`` (its matrix and genes); False with no ``layer``: ``.X``.
    gene_id_column
        ``.var`` (or ``.raw.var``) column of ``adata`` holding the gene IDs the programs use; None: ``.var_names``.
    varm_key, units
        For a programs file: the ``.varm`` key of an ``.h5ad``, and the programs' units
        (``auto``, ``expression`` or ``scaled``; see :mod:`deltanmf.data.reference`).
    normalize, target_sum
        Cell normalisation (``none``, ``total``, ``median``); None: the run's (with its
        target total), or ``none`` for a programs file, as starCAT does.
    min_coverage
        Least share of the programs' genes that ``adata`` must have.
    batch_size
        Cells per NNLS block.
    device
        torch device; None: ``cuda`` when available, else ``cpu``.
    nnls_iterations
        NNLS sweeps at most; None: the run's ``model.consensus.nnls_iterations`` (500 for a file).
    key_added
        ``.obsm`` key of the usage.

    Returns
    -------
    pandas.DataFrame
        Usage, cells (``adata.obs_names``) x programs.

    Notes
    -----
    Writes ``adata.obsm[key_added]`` (cells x K, float32) and ``adata.uns[<key_added without
    "X_">]`` (``program_names``, ``program_kind`` for a run, and ``projection``: the source,
    the genes used and the coverage).
    """
    import torch

    from ..core import CellMatrix, refit_usage

    if not isinstance(adata, ad.AnnData):
        raise InputError(f"adata must be an anndata.AnnData, got {type(adata).__name__}")
    what = "source"
    if varm_key is None and is_run(source):
        found = _run_source(source, what)
    else:  # a programs file, or the .varm of an .h5ad (a run's results too)
        programs = read_programs(results_file(source), varm_key, units, what=what)
        found = _Source(programs, None, None, None, False, "none", None, None, FILE_NNLS_ITERATIONS, False)
    reference = found.reference
    if layer is None and use_raw is None:  # as the run read its cells; another matrix only when asked for
        if found.use_raw and adata.raw is None:
            raise InputError(f"{what} was fitted on .raw.X, but adata has no .raw: give use_raw=False with "
                             "layer=<the layer holding the same kind of values> (use_raw=False alone: .X) to use "
                             "another matrix")
        if found.layer is not None and found.layer not in adata.layers:
            raise InputError(f"{what} was fitted on the layer {found.layer!r}, which adata lacks (layers: "
                             f"{list(adata.layers)}); give layer=<the layer holding the same kind of values>, or "
                             "use_raw=False for .X")
        use_raw, layer = found.use_raw, found.layer
    use_raw = bool(use_raw)
    if use_raw and layer is not None:
        raise InputError(f"layer={layer!r} and use_raw=True name two matrices; give one of them")
    if use_raw and adata.raw is None:
        raise InputError("use_raw=True but adata has no .raw; give layer=<a layer with counts> or use_raw=False for .X")
    var = adata.raw.var if use_raw else adata.var
    var_where = ".raw.var" if use_raw else ".var"
    id_column = gene_id_column
    if id_column is not None and id_column not in var:
        raise InputError(f"gene_id_column={id_column!r} is not a column of {var_where}; columns: {list(var.columns)}")
    data_ids = [strip_version(str(g)) for g in (var[id_column] if id_column else var.index)]
    check_unique(pd.Index(data_ids), f"gene ID (from {var_where}, versions stripped)",
                 f"give gene_id_column=<a {var_where} column with one ID per gene>")
    fix = f"gene_id_column=<a {var_where} column with the programs' convention>"
    report = coverage(reference, data_ids, min_coverage, what=what, fix=fix, setting="min_coverage")

    # the programs' genes the data has, in the programs' order, named as the data names them
    where = {g: i for i, g in enumerate(data_ids)}
    rows = np.array([i for i, g in enumerate(reference.genes) if g in where], dtype=np.int64)
    genes = [str(var.index[where[reference.genes[i]]]) for i in rows]
    scale = None if found.scale is None else found.scale[rows]
    settings = _preparation(layer, use_raw, normalize or found.normalize, target_sum or found.target, scale is None)
    if found.counts and not looks_like_counts(adata, settings):
        matrix_name = ".raw.X" if use_raw else (f"layer {layer!r}" if layer else ".X")
        log.warning("%s was fitted on counts, but %s of adata holds values that are not whole numbers "
                    "(log-normalised?): usage will not be on the run's scale; give layer=<a counts layer>", what,
                    matrix_name)
    prepared = prepare(adata, settings, use_case=False, genes=genes, gene_scale=scale, all_cells=True)
    subset = ReferencePrograms(reference.programs[rows], reference.names, [reference.genes[i] for i in rows],
                               reference.units, reference.layout, reference.source)
    if found.scale is None:
        programs = in_run_units(subset, subset.genes, prepared.gene_scale)
    else:
        programs = subset.programs.astype(np.float32)  # a run's programs, in its units already

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    matrix = CellMatrix(prepared.X, batch_size=batch_size, device=device)
    usage = refit_usage(matrix, torch.from_numpy(programs), nnls_iterations or found.nnls_iterations)
    usage = usage.cpu().numpy().astype(np.float32)
    log.info("projected %d programs onto %d cells using %d genes (%.1f%% of the programs' genes)",
             reference.k, adata.n_obs, len(rows), 100 * report["coverage"])

    adata.obsm[key_added] = usage
    info = {"program_names": np.asarray(reference.names, dtype=object),
            "projection": {**report, "genes_used": len(rows), "source": str(source)}}
    if found.kinds is not None:
        info["program_kind"] = np.asarray(found.kinds, dtype=object)
    adata.uns[key_added[2:] if key_added.startswith("X_") else key_added] = info
    return pd.DataFrame(usage, index=adata.obs_names.copy(), columns=reference.names)
