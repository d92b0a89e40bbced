"""Building a gene-similarity resource from a foundation model's gene embeddings.

A resource is ``S = max(0, corr(E))`` with a zero diagonal, where ``E`` is a genes x dims
embedding and ``corr`` is the Pearson correlation between genes' embedding vectors. It is
written next to its ordered gene list in the format :class:`~.similarity.FileResource`
reads: a dense ``S_E_relu.npy`` (float32) or, with ``knn``, a sparse ``S_E_knn.npz``, plus
``genes_order.json``.

The embeddings come from :mod:`.loaders` (scGPT, TranscriptFormer, any matrix file).

Similarities are filled row block by row block, so a 20k-gene resource needs the output
plus ``O(block_size x genes)`` of memory, never several dense genes x genes copies.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from ..errors import InputError, whole_number
from ..files import atomic_write
from .loaders import check_embedding, load_embedding_matrix, load_scgpt, load_transcriptformer

log = logging.getLogger(__name__)

DENSE_NAME = "S_E_relu.npy"
KNN_NAME = "S_E_knn.npz"
GENES_NAME = "genes_order.json"

KINDS = ("scgpt", "transcriptformer", "embeddings")


def _check_block_size(block_size) -> int:
    if not whole_number(block_size) or block_size < 1:
        raise InputError(f"block_size must be a positive integer, got {block_size!r}")
    return int(block_size)


def _unit_rows(embedding: np.ndarray, block_size: int) -> np.ndarray:
    """Each gene's embedding centred over its dims and L2-normalised, as float32.

    Centring happens in float64 one block at a time, so that large offsets do not cost
    float32 precision while only one float32 genes x dims copy is kept. Genes whose vector
    is constant get a zero row, so all their correlations come out 0 rather than NaN.
    """
    n = embedding.shape[0]
    unit = np.empty(embedding.shape, dtype=np.float32)
    for start in range(0, n, block_size):
        rows = np.asarray(embedding[start:start + block_size], dtype=np.float64)
        # Test constancy on the raw values: a mean such as that of [0.1] * 7 is off by an ulp,
        # and normalising that rounding residue would give the gene a meaningless direction.
        constant = rows.max(axis=1) == rows.min(axis=1)
        rows = rows - rows.mean(axis=1, keepdims=True)
        norm = np.linalg.norm(rows, axis=1, keepdims=True)
        np.divide(rows, norm, out=rows, where=norm > 0)
        rows[constant | (norm[:, 0] == 0)] = 0.0
        unit[start:start + block_size] = rows
    return unit


def correlation_similarity(embedding, block_size: int = 2048) -> np.ndarray:
    """Dense ``S = max(0, corr(E))`` with a zero diagonal, filled in row blocks.

    Parameters
    ----------
    embedding : array_like, shape (genes, dims)
        Gene embedding matrix; must be finite.
    block_size : int, default 2048
        Rows of ``S`` computed per step. Peak memory is ``S`` itself plus about
        ``block_size x genes`` float32 values.

    Returns
    -------
    numpy.ndarray, shape (genes, genes), float32
        Symmetric, non-negative, zero diagonal. A gene with a constant embedding has an
        all-zero row and column.

    Raises
    ------
    InputError
        When ``embedding`` is not a finite 2-D matrix or ``block_size`` is not positive.

    Notes
    -----
    Agrees with :func:`~.similarity.similarity_from_embeddings` to float32 precision. Only
    the blocks on and above the diagonal are multiplied and then mirrored, which halves
    the work; within a diagonal block the upper triangle is mirrored onto the lower one too
    (a BLAS product of a block with itself need not be symmetric to the last bit: its kernels
    may sum the two halves in different orders), so ``S`` is exactly symmetric by construction.
    """
    e = check_embedding(embedding)
    block_size = _check_block_size(block_size)
    unit = _unit_rows(e, block_size)
    n = unit.shape[0]
    out = np.empty((n, n), dtype=np.float32)
    for start in range(0, n, block_size):
        stop = min(start + block_size, n)
        block = unit[start:stop] @ unit[start:].T
        np.maximum(block, 0.0, out=block)
        size = stop - start
        upper = np.triu(block[:, :size], 1)
        block[:, :size] = upper + upper.T  # the diagonal block: its upper triangle mirrored, a zero diagonal
        out[start:stop, start:] = block
        out[stop:, start:stop] = block[:, size:].T
    return out


def knn_similarity(embedding, k: int, block_size: int = 2048) -> sp.csr_matrix:
    """Sparse k-nearest-neighbour version of ``S = max(0, corr(E))``.

    Each gene keeps its ``k`` largest positive correlations with other genes; the result
    is symmetrised with the elementwise maximum of ``S`` and ``S^T``, so a pair is kept
    when either gene has the other among its ``k`` nearest.

    Parameters
    ----------
    embedding : array_like, shape (genes, dims)
        Gene embedding matrix; must be finite.
    k : int
        Neighbours kept per gene before symmetrisation (at least 1). With ``k >= genes - 1``
        every positive correlation is kept.
    block_size : int, default 2048
        Rows of correlations computed per step; the dense genes x genes matrix is never
        held, only ``block_size x genes`` values at a time.

    Returns
    -------
    scipy.sparse.csr_matrix, shape (genes, genes), float32
        Symmetric, non-negative, zero diagonal, with no explicitly stored zeros. A row may
        hold more than ``k`` entries after symmetrisation, and fewer when the gene has fewer
        than ``k`` positive correlations.

    Raises
    ------
    InputError
        When ``embedding`` is not a finite 2-D matrix or ``k`` / ``block_size`` is not a
        positive integer.
    """
    if not whole_number(k) or k < 1:
        raise InputError(f"knn: k must be a positive integer, got {k!r}")
    e = check_embedding(embedding)
    block_size = _check_block_size(block_size)
    unit = _unit_rows(e, block_size)
    n = unit.shape[0]
    keep = min(int(k), n - 1)
    rows, cols, vals = [], [], []
    for start in range(0, n if keep > 0 else 0, block_size):
        stop = min(start + block_size, n)
        local = np.arange(stop - start)
        block = unit[start:stop] @ unit.T
        # A gene is not its own neighbour; -inf also keeps it out of the top k.
        block[local, local + start] = -np.inf
        if keep < n - 1:
            top = np.argpartition(block, n - keep, axis=1)[:, n - keep:]
        else:
            top = np.broadcast_to(np.arange(n), block.shape)
        top_vals = np.take_along_axis(block, top, axis=1)
        positive = top_vals > 0
        rows.append(np.broadcast_to(local[:, None] + start, top.shape)[positive])
        cols.append(top[positive])
        vals.append(top_vals[positive])
    if rows:
        coo = sp.coo_matrix((np.concatenate(vals).astype(np.float32),
                             (np.concatenate(rows), np.concatenate(cols))), shape=(n, n))
    else:
        coo = sp.coo_matrix((n, n), dtype=np.float32)
    s = coo.tocsr()
    s = s.maximum(s.T).tocsr().astype(np.float32)
    s.eliminate_zeros()
    s.sort_indices()
    return s


# ----------------------------------------------------------------------------- writing


def write_resource(out_dir, genes: Sequence[str], similarity) -> list[Path]:
    """Write a similarity resource in the format :class:`~.similarity.FileResource` reads.

    Parameters
    ----------
    out_dir : str or path-like
        Output directory, created if needed.
    genes : sequence of str
        The matrix's genes in row order; must be unique.
    similarity : numpy.ndarray or scipy.sparse matrix, shape (genes, genes)
        A dense array is written as ``S_E_relu.npy`` (float32); a sparse matrix as
        ``S_E_knn.npz`` (CSR, float32, via ``scipy.sparse.save_npz``).

    Returns
    -------
    list of pathlib.Path
        The matrix file and ``genes_order.json``.

    Raises
    ------
    InputError
        When the shape and gene count disagree, genes are repeated or not strings, or
        ``out_dir`` cannot be written.

    Notes
    -----
    Each file is written under a temporary name and renamed into place, so a crash never
    leaves a half-written resource file behind.
    """
    out_dir = Path(out_dir).expanduser()
    genes = list(genes)
    if not all(isinstance(g, str) for g in genes):
        raise InputError("write_resource: gene IDs must be strings")
    if len(set(genes)) != len(genes):
        raise InputError("write_resource: gene IDs must be unique")
    n = len(genes)
    if similarity.ndim != 2 or similarity.shape != (n, n):
        raise InputError(f"write_resource: similarity is {similarity.shape} but there are {n} genes")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        if sp.issparse(similarity):
            matrix_path = out_dir / KNN_NAME
            csr = sp.csr_matrix(similarity, dtype=np.float32)
            atomic_write(matrix_path, lambda fh: sp.save_npz(fh, csr, compressed=True), handle=True)
        else:
            matrix_path = out_dir / DENSE_NAME
            dense = np.asarray(similarity, dtype=np.float32)
            atomic_write(matrix_path, lambda fh: np.save(fh, dense, allow_pickle=False), handle=True)
        genes_path = out_dir / GENES_NAME
        payload = json.dumps(genes).encode()
        atomic_write(genes_path, lambda fh: fh.write(payload), handle=True)
    except OSError as exc:
        raise InputError(f"cannot write the resource to {out_dir} ({exc.strerror or exc}); choose a writable "
                         "output directory") from None
    return [matrix_path, genes_path]


# ----------------------------------------------------------------------------- one call


@dataclass
class BuiltResource:
    """What :func:`build` wrote.

    Attributes
    ----------
    kind : str
        The embedding source (``scgpt``, ``transcriptformer`` or ``embeddings``).
    n_genes, n_dims : int
        Size of the embedding the resource was built from.
    paths : list of pathlib.Path
        The matrix file and the gene list.
    knn : int or None
        Neighbours per gene for a sparse resource, None for a dense one.
    nnz : int
        Stored (non-zero) similarities.
    """

    kind: str
    n_genes: int
    n_dims: int
    paths: list[Path] = field(default_factory=list)
    knn: int | None = None
    nnz: int = 0

    @property
    def density(self) -> float:
        """Fraction of the genes x genes entries that are non-zero."""
        return self.nnz / float(self.n_genes) ** 2 if self.n_genes else 0.0


_INPUTS = {"scgpt": ("model_dir", "gene_info"), "transcriptformer": ("h5",), "embeddings": ("matrix", "genes")}


def build(kind: str, out_dir, *, knn: int | None = None, block_size: int = 2048, **inputs) -> BuiltResource:
    """Load an embedding, compute its similarity and write the resource.

    Parameters
    ----------
    kind : {'scgpt', 'transcriptformer', 'embeddings'}
        Which loader reads ``inputs``.
    out_dir : str or path-like
        Where the resource files go.
    knn : int, optional
        Keep only each gene's ``knn`` strongest positive similarities (sparse ``.npz``);
        by default the full dense matrix is written.
    block_size : int, default 2048
        Rows of similarities computed per step (trades speed for memory).
    **inputs
        The loader's arguments: ``model_dir`` and ``gene_info`` for ``scgpt``
        (:func:`load_scgpt`), ``h5`` for ``transcriptformer`` (:func:`load_transcriptformer`),
        ``matrix`` and ``genes`` for ``embeddings`` (:func:`load_embedding_matrix`).

    Returns
    -------
    BuiltResource

    Raises
    ------
    InputError
        For an unknown ``kind``, missing or unexpected inputs, and anything the loader,
        the similarity or the writer rejects.
    """
    if kind not in _INPUTS:
        raise InputError(f"unknown embedding kind {kind!r}; choose one of {list(_INPUTS)}")
    expected = _INPUTS[kind]
    missing = [name for name in expected if inputs.get(name) is None]
    extra = [name for name in inputs if name not in expected]
    if missing or extra:
        raise InputError(f"build({kind!r}) needs inputs {list(expected)}; missing {missing}, unexpected {extra}")
    if knn is not None and (isinstance(knn, bool) or not isinstance(knn, (int, np.integer)) or knn < 1):
        raise InputError(f"knn must be a positive integer, got {knn!r}")
    block_size = _check_block_size(block_size)

    if kind == "scgpt":
        genes, embedding = load_scgpt(inputs["model_dir"], inputs["gene_info"])
    elif kind == "transcriptformer":
        genes, embedding = load_transcriptformer(inputs["h5"])
    else:
        genes, embedding = load_embedding_matrix(inputs["matrix"], inputs["genes"])

    if knn is None:
        similarity = correlation_similarity(embedding, block_size=block_size)
        nnz = int(np.count_nonzero(similarity))
    else:
        similarity = knn_similarity(embedding, knn, block_size=block_size)
        nnz = int(similarity.nnz)
    paths = write_resource(out_dir, genes, similarity)
    return BuiltResource(kind=kind, n_genes=len(genes), n_dims=int(embedding.shape[1]), paths=paths,
                         knn=None if knn is None else int(knn), nnz=nnz)
