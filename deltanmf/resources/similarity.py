"""Loading a gene-gene similarity resource and aligning it to a dataset's genes.

A resource is a similarity matrix ``S`` (dense ``.npy`` or sparse scipy ``.npz``) plus
a JSON list of its genes in row order. The dense matrix is memory-mapped and only the
dataset's genes are read, so a 20k x 20k resource never has to fit in memory twice.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

from ..data.errors import InputError
from ..nmf import GeneGraph

log = logging.getLogger(__name__)


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
    with open(path) as fh:
        genes = json.load(fh)
    if isinstance(genes, dict):
        genes = genes.get("genes")
    if not isinstance(genes, list) or not all(isinstance(g, str) for g in genes):
        raise InputError(f"resource.genes: {path} must hold a JSON list of gene IDs (strings)")
    return genes


class FileResource:
    """A similarity matrix on disk with its gene list.

    Parameters
    ----------
    matrix
        ``.npy`` (dense, genes x genes) or ``.npz`` (scipy sparse) file.
    genes
        JSON file listing the matrix's genes in row order.
    name
        Label used in logs and outputs.
    """

    def __init__(self, matrix: str, genes: str, name: str = "custom"):
        self.matrix_path = Path(matrix).expanduser()
        self.genes_path = Path(genes).expanduser()
        self.name = name
        if not self.matrix_path.exists():
            raise InputError(f"resource.matrix: similarity matrix not found: {self.matrix_path}")
        self._genes: list[str] | None = None

    def gene_list(self) -> list[str]:
        if self._genes is None:
            self._genes = read_gene_list(self.genes_path)
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
            full = sp.load_npz(self.matrix_path)
            self._check_shape(full.shape, n)
            sub = sp.csr_matrix(full)[rows][:, rows].tocoo()
            sub.setdiag(0)
            sub.eliminate_zeros()
            self._check_values(sub.data)
            tensor = torch.sparse_coo_tensor(np.vstack([sub.row, sub.col]), sub.data.astype(np.float32),
                                             size=sub.shape).coalesce().to_sparse_csr()
        else:
            full = np.load(self.matrix_path, mmap_mode="r")
            self._check_shape(full.shape, n)
            order = np.argsort(rows)  # read the memory map in increasing order, then restore ours
            sub = np.asarray(full[rows[order]][:, rows[order]], dtype=np.float32)
            inverse = np.empty_like(order)
            inverse[order] = np.arange(len(order))
            sub = sub[inverse][:, inverse]
            np.fill_diagonal(sub, 0.0)
            self._check_values(sub)
            tensor = torch.from_numpy(np.ascontiguousarray(sub))
        log.info("similarity resource %s: %d of its %d genes used", self.name, len(rows), n)
        return GeneGraph(tensor)

    def _check_shape(self, shape, n):
        if shape != (n, n):
            raise InputError(f"resource {self.name!r}: matrix {self.matrix_path} is {shape} but its gene list "
                             f"{self.genes_path} has {n} genes")

    def _check_values(self, values):
        values = np.asarray(values)
        if values.size and (not np.all(np.isfinite(values)) or values.min() < 0):
            raise InputError(f"resource {self.name!r}: similarities must be finite and non-negative "
                             f"({self.matrix_path}); build S as max(0, corr(E))")
