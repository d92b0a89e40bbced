"""Loading a gene-gene similarity resource and aligning it to a dataset's genes.

A resource is a similarity matrix ``S`` (dense ``.npy`` or sparse scipy ``.npz``) plus
a JSON list of its genes in row order. The dense matrix is memory-mapped and only the
dataset's genes are read, so a 20k x 20k resource never has to fit in memory twice.
"""
from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

from ..errors import InputError
from ..core import GeneGraph

log = logging.getLogger(__name__)


_ENSEMBL = re.compile(r"^ENS[A-Z]*G\d{6,}(\.\d+)?$")
_VERSIONED_ENSEMBL = re.compile(r"^(ENS[A-Z]*\d+)\.\d+$")


def strip_version(gene_id: str) -> str:
    """An Ensembl ID without its version suffix (``ENSG00000141510.16`` -> ``ENSG00000141510``).

    Only Ensembl-looking IDs lose a ``.N`` suffix: symbols such as ``RP11-34P13.7`` keep
    their dot, and GENCODE's ``ENSG....N_PAR_Y`` stays distinct from the X-chromosome copy.
    """
    match = _VERSIONED_ENSEMBL.match(gene_id)
    return match.group(1) if match else gene_id


def id_convention(ids) -> str:
    """Describe a gene list's ID convention for error messages, with examples."""
    ids = [str(g) for g in ids]
    if not ids:
        return "no genes"
    share = sum(bool(_ENSEMBL.match(g)) for g in ids) / len(ids)
    kind = "Ensembl IDs" if share > 0.9 else "gene symbols" if share < 0.1 else "a mix of Ensembl IDs and symbols"
    return f"{kind} (e.g. {', '.join(ids[:3])})"


class Resource:
    """What the pipeline needs of a similarity resource.

    ``gene_list()`` gives the resource's genes (version-stripped Ensembl IDs or
    symbols); ``graph(genes)`` the similarity among the given genes, in that order;
    ``coverage(data_genes)`` how many of a dataset's genes it covers, failing below
    ``min_coverage`` with the ID conventions on both sides.
    """

    name = "resource"
    min_coverage = 0.0

    def gene_list(self) -> list[str]:
        raise NotImplementedError

    def graph(self, genes: Sequence[str]) -> GeneGraph:
        raise NotImplementedError

    def coverage(self, data_genes: Sequence[str]) -> dict:
        resource_genes = self.gene_list()
        shared = len(set(data_genes) & set(resource_genes))
        report = {"name": self.name, "data_genes": len(data_genes), "resource_genes": len(resource_genes),
                  "shared_genes": shared, "coverage": shared / max(len(data_genes), 1)}
        log.info("resource %s covers %d of the data's %d genes (%.1f%%); it has %d genes", self.name, shared,
                 len(data_genes), 100 * report["coverage"], len(resource_genes))
        if report["coverage"] < self.min_coverage:
            raise InputError(
                f"resource {self.name!r} covers only {shared} of the data's {len(data_genes)} genes "
                f"({100 * report['coverage']:.1f}% < resource.min_coverage={self.min_coverage:g}). "
                f"The data's gene IDs are {id_convention(data_genes)}; the resource's are "
                f"{id_convention(resource_genes)}. Use matching IDs: data.gene_id_column=<a .var column "
                "with the resource's convention>, or rebuild the resource, or lower resource.min_coverage.")
        return report


def similarity_from_embeddings(embedding: np.ndarray) -> np.ndarray:
    """``S = max(0, corr(E))`` with a zero diagonal, for E genes x dims."""
    e = np.asarray(embedding, dtype=np.float64)
    e = e - e.mean(axis=1, keepdims=True)
    norm = np.linalg.norm(e, axis=1, keepdims=True)
    e = np.divide(e, norm, out=np.zeros_like(e), where=norm > 0)
    s = np.clip(e @ e.T, 0.0, None)
    np.fill_diagonal(s, 0.0)
    return s.astype(np.float32)


def read_gene_list(path: str | Path) -> list[str]:
    """Genes of a resource, from a JSON list (or a JSON object with a ``genes`` list)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise InputError(f"resource.genes: gene list not found: {path}")
    try:
        with open(path) as fh:
            genes = json.load(fh)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"resource.genes: cannot read {path} as a JSON list of gene IDs ({err}); rebuild the "
                         "resource (python -m deltanmf.resources ...) or point resource.genes at its "
                         "genes_order.json") from None
    if isinstance(genes, dict):
        genes = genes.get("genes")
    if not isinstance(genes, list) or not all(isinstance(g, str) for g in genes):
        raise InputError(f"resource.genes: {path} must hold a JSON list of gene IDs (strings)")
    return genes


class FileResource(Resource):
    """A similarity matrix on disk with its gene list.

    Parameters
    ----------
    matrix
        ``.npy`` (dense, genes x genes) or ``.npz`` (scipy sparse) file.
    genes
        JSON file listing the matrix's genes in row order.
    name
        Label used in logs and outputs.
    min_coverage
        Smallest share of the data's genes the resource must cover.
    build_command
        How to build the files, quoted in the error when they are missing.
    """

    def __init__(self, matrix: str, genes: str, name: str = "custom", min_coverage: float = 0.0,
                 build_command: str | None = None):
        self.matrix_path = Path(matrix).expanduser()
        self.genes_path = Path(genes).expanduser()
        self.name = name
        self.min_coverage = float(min_coverage)
        self.build_command = build_command
        hint = f" Build it with: {build_command}" if build_command else ""
        for key, path in (("resource.matrix", self.matrix_path), ("resource.genes", self.genes_path)):
            if not path.exists():
                raise InputError(f"{key}: resource {name!r} file not found: {path}.{hint}")
        self._genes: list[str] | None = None

    def gene_list(self) -> list[str]:
        if self._genes is None:
            self._genes = [strip_version(g) for g in read_gene_list(self.genes_path)]
        return self._genes

    def graph(self, genes: Sequence[str]) -> GeneGraph:
        """The similarity among ``genes`` (all must be in the resource), in that order."""
        position = {g: i for i, g in enumerate(self.gene_list())}
        missing = [g for g in genes if g not in position]
        if missing:
            raise InputError(f"{len(missing)} genes are not in resource {self.name!r} (e.g. {missing[:3]})")
        rows = np.array([position[g] for g in genes], dtype=np.int64)
        n = len(position)
        if self.matrix_path.suffix == ".npz":
            full = self._load(sp.load_npz)
            self._check_shape(full.shape, n)
            sub = sp.csr_matrix(full)[rows][:, rows].tocoo()
            sub.setdiag(0)
            sub.eliminate_zeros()
            self._check_values(sub.data)
            self._check_symmetric(sub.tocsr(), genes)
            tensor = torch.sparse_coo_tensor(np.vstack([sub.row, sub.col]), sub.data.astype(np.float32),
                                             size=sub.shape, check_invariants=True).coalesce().to_sparse_csr()
        else:
            full = self._load(lambda path: np.load(path, mmap_mode="r", allow_pickle=False))
            self._check_shape(full.shape, n)
            order = np.argsort(rows)  # read the memory map in increasing order, then restore ours
            sub = np.asarray(full[rows[order]][:, rows[order]], dtype=np.float32)
            inverse = np.empty_like(order)
            inverse[order] = np.arange(len(order))
            sub = sub[inverse][:, inverse]
            np.fill_diagonal(sub, 0.0)
            self._check_values(sub)
            self._check_symmetric(sub, genes)
            tensor = torch.from_numpy(np.ascontiguousarray(sub))
        log.info("similarity resource %s: %d of its %d genes used", self.name, len(rows), n)
        return GeneGraph(tensor)

    def _load(self, reader):
        """The matrix file read by ``reader``, or one clear error naming it."""
        try:
            return reader(self.matrix_path)
        except (OSError, ValueError, EOFError) as err:
            kind = "a scipy sparse .npz" if self.matrix_path.suffix == ".npz" else "a numpy .npy"
            raise InputError(f"resource.matrix: cannot read {self.matrix_path} as {kind} file ({err}); rebuild the "
                             "resource (python -m deltanmf.resources ...) or point resource.matrix at its "
                             "S_E_relu.npy or S_E_knn.npz") from None

    def _check_shape(self, shape, n):
        if shape != (n, n):
            raise InputError(f"resource {self.name!r}: matrix {self.matrix_path} is {shape} but its gene list "
                             f"{self.genes_path} has {n} genes")

    def _fix(self) -> str:
        build = f"rebuild it ({self.build_command}), which writes " if self.build_command else "build it as "
        return (f"{build}S = max(0, corr(E)) with a zero diagonal, or repair the file: in numpy, "
                "S = np.nan_to_num(S, nan=0.0).clip(0); S = (S + S.T) / 2")

    def _check_values(self, values):
        values = np.asarray(values)
        if not values.size:
            return
        missing = int(np.count_nonzero(~np.isfinite(values)))
        if missing:
            raise InputError(f"resource {self.name!r}: the similarity {self.matrix_path} has {missing} NaN or "
                             f"infinite entries among the data's genes; a gene graph needs finite similarities: "
                             f"{self._fix()}")
        negative = int(np.count_nonzero(values < 0))
        if negative:
            raise InputError(f"resource {self.name!r}: the similarity {self.matrix_path} has {negative} negative "
                             f"entries among the data's genes (smallest {values.min():.4g}); a gene graph's "
                             f"weights must be non-negative: {self._fix()}")

    def _check_symmetric(self, sub, genes: Sequence[str], block: int = 2048) -> None:
        """Refuse ``S_ij != S_ji`` beyond float32 rounding (relative to the largest similarity),
        by row blocks for a dense ``S`` (no second genes x genes copy) and on the stored entries
        for a sparse one (never densified)."""
        if sp.issparse(sub):
            diff = abs(sub - sub.T).tocoo()
            worst = int(np.argmax(diff.data)) if diff.nnz else -1
            gap = float(diff.data[worst]) if diff.nnz else 0.0
            pair = (int(diff.row[worst]), int(diff.col[worst])) if diff.nnz else (0, 0)
            largest = float(abs(sub).max()) if sub.nnz else 0.0
        else:
            gap, pair, largest = 0.0, (0, 0), float(np.abs(sub).max()) if sub.size else 0.0
            for start in range(0, sub.shape[0], block):
                diff = np.abs(sub[start:start + block] - sub[:, start:start + block].T)
                if diff.size and diff.max() > gap:
                    i, j = np.unravel_index(int(np.argmax(diff)), diff.shape)
                    gap, pair = float(diff[i, j]), (start + int(i), int(j))
        if gap > _SYMMETRY_TOL * largest:
            a, b = genes[pair[0]], genes[pair[1]]
            raise InputError(f"resource {self.name!r}: the similarity {self.matrix_path} is not symmetric: "
                             f"S[{a}, {b}] and S[{b}, {a}] differ by {gap:.4g} (largest similarity {largest:.4g}); "
                             f"a gene graph needs S_ij = S_ji: {self._fix()}")


# asymmetry tolerated, relative to the largest similarity: float32 rounding of a product (a few ulps)
_SYMMETRY_TOL = 1e-5


class EmbeddingResource(Resource):
    """Similarity from gene embeddings stored in the dataset itself (``.varm[key]``).

    ``S = max(0, corr(E))`` over the genes in use; ``resource=demo`` uses the demo's
    simulated embeddings this way. :meth:`bind` hands over the AnnData.
    """

    def __init__(self, key: str = "sim_embedding", name: str = "embedding", min_coverage: float = 0.0):
        self.key, self.name, self.min_coverage = key, name, float(min_coverage)
        self._embedding = None

    def bind(self, adata, gene_ids: Sequence[str]) -> None:
        if self.key not in adata.varm:
            raise InputError(f"resource {self.name!r}: the data has no .varm[{self.key!r}] of gene embeddings "
                             f"(.varm keys: {list(adata.varm)}); resource=demo needs data=demo")
        embedding = np.asarray(adata.varm[self.key], dtype=np.float64)
        if len(embedding) != len(gene_ids):
            raise InputError(f"resource {self.name!r}: .varm[{self.key!r}] has {len(embedding)} genes but the matrix in "
                             f"use has {len(gene_ids)} (data.use_raw=true?); use the matrix of .var's genes")
        bad = ~np.all(np.isfinite(embedding), axis=1)
        if bad.any():
            raise InputError(f"resource {self.name!r}: .varm[{self.key!r}] has NaN or infinite values for "
                             f"{int(bad.sum())} genes (e.g. {list(np.asarray(gene_ids)[bad][:3])}); replace them "
                             "(e.g. by 0) or drop those genes from the data")
        self._embedding = dict(zip(gene_ids, embedding))

    def gene_list(self) -> list[str]:
        if self._embedding is None:
            raise RuntimeError("EmbeddingResource.bind(adata, gene_ids) must be called first")
        return list(self._embedding)

    def graph(self, genes: Sequence[str]) -> GeneGraph:
        embedding = np.stack([self._embedding[g] for g in genes])
        return GeneGraph(torch.from_numpy(similarity_from_embeddings(embedding)))
