"""Reference programs from a file: cNMF's and starCAT's spectra, a genes x programs table, or
an ``.h5ad``'s ``.varm``; aligned to a dataset's genes by ID and put in a run's units.

Formats (by the file's suffix, ``.gz`` allowed for text):

- ``.tsv``, ``.txt``, ``.tab``: tab-separated; ``.csv``: comma-separated. The first column
  and the header row name the programs and the genes. A table with fewer rows than columns
  is read as programs x genes (cNMF's ``*.spectra.*.txt``, starCAT's references, DeltaNMF's
  ``programs.spectra.tsv``), otherwise as genes x programs (DeltaNMF's ``programs.csv``).
- ``.h5ad``: the genes x K matrix ``.varm[varm_key]``, genes ``.var_names``; program names
  from ``.uns['deltanmf']['program_names']`` when it holds K, else ``<varm_key>_1``, ...

Units: *scaled* programs weigh each gene in units of its standard deviation (cNMF's consensus
spectra and starCAT's references, fitted on variance-scaled genes; DeltaNMF's
``programs.spectra.tsv``) and are used as they are on the run's scaled genes, as starCAT
does; *expression* programs (cNMF's ``gene_spectra_tpm``, DeltaNMF's ``programs.csv``) are
divided by the run's gene scale. ``auto``: a programs x genes table is scaled, the rest
expression.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import InputError
from ..resources import id_convention, strip_version

log = logging.getLogger(__name__)

TEXT = {".tsv": "\t", ".txt": "\t", ".tab": "\t", ".csv": ","}
FORMATS = ("a tab-separated .tsv/.txt spectra file (programs x genes: first column the program names, header the "
           "gene IDs, as cNMF and starCAT write), a genes x programs .csv/.tsv table (first column the gene IDs), "
           "or an .h5ad with its programs in .varm (stage1_varm_key=...)")


@dataclass
class ReferencePrograms:
    """Programs read from a file (:func:`read_programs`).

    Attributes
    ----------
    programs
        Genes x K, non-negative, float64.
    names
        Program names.
    genes
        Gene IDs, Ensembl version suffixes stripped.
    units
        ``"scaled"`` or ``"expression"`` (see the module docstring).
    layout
        How the file was read, e.g. ``"programs x genes"``.
    source
        The file.
    """

    programs: np.ndarray
    names: list[str]
    genes: list[str]
    units: str
    layout: str
    source: str

    @property
    def k(self) -> int:
        return self.programs.shape[1]


def _suffix(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    return suffixes[-1] if suffixes else ""


def _read_table(path: Path, sep: str, what: str) -> tuple[np.ndarray, list[str], list[str], str]:
    """``(genes x K values, program names, gene IDs, layout)`` of a text table."""
    try:
        table = pd.read_csv(path, sep=sep, index_col=0)
    except Exception as exc:  # pandas raises parser, encoding and empty-data errors
        raise InputError(f"{what}: cannot read {path} as a {'tab' if sep == chr(9) else 'comma'}-separated table "
                         f"({type(exc).__name__}: {exc}); give {FORMATS}") from exc
    if table.shape[0] == 0 or table.shape[1] == 0:
        raise InputError(f"{what}: {path} holds no values (a table of {table.shape[0]} rows x {table.shape[1]} "
                         f"columns); give {FORMATS}")
    text = [str(c) for c, t in table.dtypes.items() if not pd.api.types.is_numeric_dtype(t)]
    if text:
        raise InputError(f"{what}: {path} has columns that are not numbers (e.g. {text[:3]}); is the separator "
                         f"right for its suffix? Give {FORMATS}")
    rows, columns = [str(v) for v in table.index], [str(v) for v in table.columns]
    values = table.to_numpy(dtype=np.float64)
    if table.shape[0] < table.shape[1]:  # K programs are far fewer than genes
        return values.T, rows, columns, "programs x genes"
    return values, columns, rows, "genes x programs"


def _read_varm(path: Path, varm_key: str, what: str) -> tuple[np.ndarray, list[str], list[str], str]:
    from .backed import H5adFile  # the annotations only: a whole dataset's matrix is not read

    try:
        file = H5adFile(path)
    except InputError as err:
        raise InputError(f"{what}: {str(err).replace('data.path: ', '')}") from None
    except Exception as exc:
        raise InputError(f"{what}: cannot read {path} as an .h5ad file ({type(exc).__name__}: {exc})") from exc
    if varm_key not in file.varm:
        raise InputError(f"{what}: {path} has no .varm[{varm_key!r}]; its .varm keys: {list(file.varm) or 'none'} "
                         "(set stage1_varm_key to one of them)")
    values = np.asarray(file.varm[varm_key], dtype=np.float64)
    if values.ndim != 2:
        raise InputError(f"{what}: .varm[{varm_key!r}] of {path} is not a genes x programs matrix")
    k = values.shape[1]
    stored = np.asarray(file.uns.get("deltanmf", {}).get("program_names", [])).astype(str)
    names = list(stored) if len(stored) == k else [f"{varm_key}_{i + 1}" for i in range(k)]
    return values, names, [str(g) for g in file.var_names], f".varm[{varm_key!r}]"


def _first(flags: np.ndarray, genes: list[str], names: list[str]) -> str:
    g, j = np.argwhere(flags)[0]
    return f"gene {genes[g]!r}, program {names[j]!r}"


def read_programs(path: str | Path, varm_key: str | None = None, units: str = "auto",
                  what: str = "stage1_from") -> ReferencePrograms:
    """Read and check reference programs (formats and units in the module docstring).

    ``what`` names the setting or argument in errors. Refused, with the file and the fix
    named: a missing file or unknown format, a table that does not parse, NaN, infinite or
    negative values, gene IDs (after stripping Ensembl versions) or program names given
    twice, and a program with no positive weight.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise InputError(f"{what}: file not found: {path}; give {FORMATS}, or a finished run directory")
    suffix = _suffix(path)
    if suffix == ".h5ad":
        if varm_key is None:
            raise InputError(f"{what}: {path} is not a DeltaNMF run; name the .varm key of its programs "
                             "(stage1_varm_key=...)")
        values, names, genes, layout = _read_varm(path, varm_key, what)
    elif suffix in TEXT:
        values, names, genes, layout = _read_table(path, TEXT[suffix], what)
    else:
        raise InputError(f"{what}: cannot tell the format of {path} from its suffix {suffix or '(none)'!r}; "
                         f"give {FORMATS}")
    genes = [strip_version(g) for g in genes]
    bad = ~np.isfinite(values)
    if bad.any():
        raise InputError(f"{what}: {path} holds {int(bad.sum())} NaN or infinite values (the first at "
                         f"{_first(bad, genes, names)}); programs must be finite: drop those genes from the file")
    negative = values < 0
    if negative.any():
        raise InputError(f"{what}: {path} holds {int(negative.sum())} negative values (the first at "
                         f"{_first(negative, genes, names)}); programs must be non-negative. A z-score spectra file "
                         "(cNMF's gene_spectra_score) cannot be used: give the consensus spectra "
                         "(*.spectra.k_*.consensus.txt) or the TPM spectra with stage1_units=expression")
    for kind, labels, fix in (("gene ID", genes, "keep one row per gene (Ensembl versions are stripped: "
                                                 "ENSG...1.2 and ENSG...1.3 are one gene)"),
                              ("program name", names, "give each program its own name")):
        index = pd.Index(labels)
        if not index.is_unique:
            dup = list(index[index.duplicated()].unique()[:3])
            raise InputError(f"{what}: {path} names {int(index.duplicated().sum())} {kind}s more than once "
                             f"(e.g. {dup}); {fix}")
    empty = np.flatnonzero(values.sum(axis=0) <= 0)
    if len(empty):
        raise InputError(f"{what}: program {names[empty[0]]!r} of {path} has no positive weight; remove it from "
                         "the file")
    if units == "auto":
        units = "scaled" if layout == "programs x genes" else "expression"
    log.info("%s: %d programs x %d genes read from %s (%s, %s units)", what, values.shape[1], values.shape[0],
             path, layout, units)
    return ReferencePrograms(values, names, genes, units, layout, str(path))


def coverage(reference: ReferencePrograms, data_ids, min_coverage: float, what: str = "stage1_from",
             fix: str = "data.gene_id_column=<a .var column with the reference's convention>",
             setting: str = "stage1_min_coverage") -> dict:
    """How many of the reference's genes the data has (IDs compared with Ensembl versions
    stripped); below ``min_coverage`` (a share of the reference's genes), or with no gene in
    common, an error names both ID conventions. Returns the numbers, for metrics and ``.uns``."""
    data_ids = [strip_version(str(g)) for g in data_ids]
    shared = len(set(reference.genes) & set(data_ids))
    report = {"file": reference.source, "layout": reference.layout, "units": reference.units,
              "programs": reference.k, "reference_genes": len(reference.genes), "data_genes": len(data_ids),
              "shared_genes": shared, "coverage": shared / max(len(reference.genes), 1)}
    log.info("%s: %d of the reference's %d genes are in the data (%.1f%%)", what, shared, len(reference.genes),
             100 * report["coverage"])
    conventions = (f"The data's gene IDs are {id_convention(data_ids)}; the reference's are "
                   f"{id_convention(reference.genes)}.")
    if shared == 0:
        raise InputError(f"{what}: no gene of {reference.source} is in the data. {conventions} Use matching IDs: {fix}")
    if report["coverage"] < min_coverage:
        raise InputError(f"{what}: only {shared} of the {len(reference.genes)} genes of {reference.source} are in "
                         f"the data ({100 * report['coverage']:.1f}% < {setting}={min_coverage:g}). {conventions} Use "
                         f"matching IDs ({fix}), or accept the low coverage with a lower {setting}")
    return report


def in_run_units(reference: ReferencePrograms, gene_ids, gene_scale: np.ndarray) -> np.ndarray:
    """The reference on a run's genes (``gene_ids``, all in the reference) in the run's scaled
    units, each program summing to 1 as stage 1's do (genes x K, float32): expression
    programs are divided by ``gene_scale``; scaled ones are used as they are."""
    position = {g: i for i, g in enumerate(reference.genes)}
    rows = np.array([position[strip_version(str(g))] for g in gene_ids], dtype=np.int64)
    programs = reference.programs[rows]
    if reference.units == "expression":
        programs = programs / np.asarray(gene_scale, dtype=np.float64)[:, None]
    total = programs.sum(axis=0)
    empty = np.flatnonzero(total <= 0)
    if len(empty):
        raise InputError(f"program {reference.names[empty[0]]!r} of {reference.source} has no weight on the "
                         f"{len(rows)} genes kept; remove it from the file, or keep more genes (data.min_cells, "
                         "data.n_top_genes)")
    return (programs / total).astype(np.float32)
