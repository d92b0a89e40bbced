"""Reading a foundation model's gene embeddings as ``(genes, embedding)``.

* :func:`load_scgpt` -- an scGPT model directory (gene-encoder weights + vocabulary),
  with symbols mapped to Ensembl IDs through a gene-info CSV;
* :func:`load_transcriptformer` -- TranscriptFormer's per-gene embedding HDF5;
* :func:`load_embedding_matrix` -- any other model, as a matrix file plus a gene list.

Each reads the files as their models release them (no model package is needed) and refuses
what it cannot use with the file and the fix named.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from ..errors import InputError, real_number
from .similarity import strip_version

log = logging.getLogger(__name__)

# scGPT's GeneEncoder is nn.Embedding followed by nn.LayerNorm with torch's default eps.
_SCGPT_KEYS = ("encoder.embedding.weight", "encoder.enc_norm.weight", "encoder.enc_norm.bias")
_SCGPT_DEFAULT_EPS = 1e-5
_SCGPT_EPS_KEYS = ("layer_norm_eps", "layer_norm_epsilon", "layernorm_eps", "norm_eps", "ln_eps", "eps")


def check_embedding(embedding, name: str = "embedding") -> np.ndarray:
    """A genes x dims embedding of finite real numbers, or :class:`InputError`."""
    e = np.asarray(embedding)
    if e.ndim != 2:
        raise InputError(f"{name} must be a 2-D genes x dims matrix, got shape {e.shape}")
    if e.shape[0] == 0 or e.shape[1] == 0:
        raise InputError(f"{name} is empty (shape {e.shape}); it needs at least one gene and one dimension")
    if not np.issubdtype(e.dtype, np.number) or np.issubdtype(e.dtype, np.complexfloating):
        raise InputError(f"{name} must hold real numbers, got dtype {e.dtype}")
    if not np.all(np.isfinite(e)):
        bad = np.argwhere(~np.isfinite(e))[0]
        raise InputError(f"{name} has NaN or infinite values (first at row {bad[0]}, column {bad[1]}); "
                         "drop or impute those genes before building a resource")
    return e


def standardize_dimensions(embedding) -> np.ndarray:
    """Z-score every embedding dimension across genes, as TranscriptFormer's embeddings are used.

    Parameters
    ----------
    embedding : array_like, shape (genes, dims)

    Returns
    -------
    numpy.ndarray, shape (genes, dims), float32
        Each column with mean 0 and (population) standard deviation 1; a constant column
        becomes all zeros instead of NaN.
    """
    e = np.asarray(check_embedding(embedding), dtype=np.float64)
    mean = e.mean(axis=0, keepdims=True)
    std = e.std(axis=0, keepdims=True)
    z = np.zeros_like(e)
    np.divide(e - mean, std, out=z, where=std > 0)
    return z.astype(np.float32)


def _require_file(path: Path, what: str) -> Path:
    if not path.exists():
        raise InputError(f"{what} not found: {path}")
    if not path.is_file():
        raise InputError(f"{what} is not a file: {path}")
    return path


def _read_json(path: Path, what: str):
    try:
        with open(path) as fh:
            return json.load(fh)
    except json.JSONDecodeError as exc:
        raise InputError(f"{what} {path} is not valid JSON ({exc})") from None
    except UnicodeDecodeError:
        raise InputError(f"{what} {path} is not a UTF-8 text file") from None


def _scgpt_eps(args: dict, path: Path) -> float:
    for key in _SCGPT_EPS_KEYS:
        if key in args:
            value = args[key]
            if not real_number(value) or not value > 0:
                raise InputError(f"scGPT {path}: {key!r} must be a positive number, got {value!r}")
            return float(value)
    return _SCGPT_DEFAULT_EPS


def _read_gene_info(path: Path) -> dict[str, str]:
    """Symbol -> version-less Ensembl ID from a CELLxGENE-style gene-info CSV (first row wins)."""
    import pandas as pd

    _require_file(path, "gene-info CSV")
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise InputError(f"gene-info CSV {path} cannot be read as CSV ({exc})") from None
    missing = [c for c in ("feature_name", "feature_id") if c not in table.columns]
    if missing:
        raise InputError(f"gene-info CSV {path} lacks column(s) {missing}; it needs 'feature_name' (gene "
                         f"symbol) and 'feature_id' (Ensembl ID), found {list(table.columns)[:10]}")
    mapping: dict[str, str] = {}
    for symbol, gene_id in zip(table["feature_name"].str.strip(), table["feature_id"].str.strip()):
        if symbol and gene_id and symbol not in mapping:
            mapping[symbol] = strip_version(gene_id)
    return mapping


def load_scgpt(model_dir, gene_info) -> tuple[list[str], np.ndarray]:
    """Gene embeddings of a released scGPT model, keyed by Ensembl ID.

    The embedding of a gene is the output of scGPT's gene encoder for its token:
    ``LayerNorm(embedding row)`` with the model's learnt scale and shift.

    Parameters
    ----------
    model_dir : str or path-like
        A model directory as scGPT releases it: ``best_model.pt`` (state dict with
        ``encoder.embedding.weight``, ``encoder.enc_norm.weight`` and ``encoder.enc_norm.bias``),
        ``vocab.json`` (token -> row index) and, optionally, ``args.json`` (its layer-norm
        eps, if it records one, is used; otherwise torch's default 1e-5).
    gene_info : str or path-like
        CSV mapping symbols to Ensembl IDs with columns ``feature_name`` (symbol) and
        ``feature_id`` (Ensembl ID), such as the CELLxGENE gene-info table.

    Returns
    -------
    genes : list of str
        Version-less Ensembl IDs, in vocabulary-index order.
    embedding : numpy.ndarray, shape (genes, d), float32

    Raises
    ------
    InputError
        For a missing file, missing state-dict keys, a vocabulary index outside the
        embedding table, or a gene-info CSV without the two columns.

    Notes
    -----
    Special tokens (``<pad>``, ``<cls>``, ``<eoc>``, ...) and symbols without an Ensembl
    ID are dropped. When several symbols map to the same Ensembl ID, the one with the
    lowest vocabulary index is kept.
    """
    import torch

    model_dir = Path(model_dir).expanduser()
    if not model_dir.is_dir():
        raise InputError(f"scGPT model directory not found: {model_dir}")
    weights_path = _require_file(model_dir / "best_model.pt", "scGPT weights")
    vocab_path = _require_file(model_dir / "vocab.json", "scGPT vocabulary")
    args_path = model_dir / "args.json"
    gene_info = Path(gene_info).expanduser()
    # Read the small CSV before the large checkpoint so its mistakes surface at once.
    symbol_to_id = _read_gene_info(gene_info)

    eps = _SCGPT_DEFAULT_EPS
    if args_path.is_file():
        args = _read_json(args_path, "scGPT args")
        if not isinstance(args, dict):
            raise InputError(f"scGPT args {args_path} must hold a JSON object")
        eps = _scgpt_eps(args, args_path)
    else:
        log.warning("scGPT: no args.json in %s; using layer-norm eps %g", model_dir, eps)

    vocab = _read_json(vocab_path, "scGPT vocabulary")
    if not isinstance(vocab, dict) or not all(
            isinstance(i, int) and not isinstance(i, bool) for i in vocab.values()):
        raise InputError(f"scGPT vocabulary {vocab_path} must be a JSON object mapping each token to an "
                         "integer row index")

    try:
        state = torch.load(weights_path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types (pickle, zip, runtime) for an unusable file
        raise InputError(f"scGPT weights {weights_path} cannot be loaded as a state dict "
                         f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    if not isinstance(state, dict):
        raise InputError(f"scGPT weights {weights_path} must hold a state dict, got {type(state).__name__}")
    missing = [key for key in _SCGPT_KEYS if key not in state]
    if missing:
        encoder_keys = sorted(str(key) for key in state if str(key).startswith("encoder"))
        raise InputError(f"scGPT weights {weights_path} lack {missing}; keys starting with 'encoder' are "
                         f"{encoder_keys if encoder_keys else 'none'} ({len(state)} keys in all); is this an "
                         "scGPT whole-model checkpoint?")
    table = state["encoder.embedding.weight"]
    scale = state["encoder.enc_norm.weight"]
    shift = state["encoder.enc_norm.bias"]
    if not all(isinstance(t, torch.Tensor) for t in (table, scale, shift)):
        raise InputError(f"scGPT weights {weights_path}: the gene-encoder entries {list(_SCGPT_KEYS)} "
                         "must be tensors")
    if table.dim() != 2 or scale.shape != (table.shape[1],) or shift.shape != (table.shape[1],):
        raise InputError(f"scGPT weights {weights_path}: encoder.embedding.weight is {tuple(table.shape)} "
                         f"but enc_norm weight/bias are {tuple(scale.shape)}/{tuple(shift.shape)}; "
                         "they must be (vocab, d) and (d,)")

    n_rows = table.shape[0]
    out_of_range = {tok: i for tok, i in vocab.items() if not 0 <= i < n_rows}
    if out_of_range:
        example = dict(list(out_of_range.items())[:3])
        raise InputError(f"scGPT vocabulary {vocab_path} has {len(out_of_range)} indices outside the embedding "
                         f"table of {n_rows} rows in {weights_path} (e.g. {example}); the vocabulary and the "
                         "weights must come from the same model release")

    genes: list[str] = []
    rows: list[int] = []
    seen: set[str] = set()
    n_special = n_unmapped = n_duplicate = 0
    for token, index in sorted(vocab.items(), key=lambda item: item[1]):
        if token.startswith("<") and token.endswith(">"):
            n_special += 1
            continue
        gene_id = symbol_to_id.get(token)
        if gene_id is None:
            n_unmapped += 1
            continue
        if gene_id in seen:
            n_duplicate += 1
            continue
        seen.add(gene_id)
        genes.append(gene_id)
        rows.append(index)
    log.info("scGPT: %d vocabulary tokens, %d special tokens dropped, %d symbols without an Ensembl ID dropped, "
             "%d duplicate Ensembl IDs dropped, %d genes mapped", len(vocab), n_special, n_unmapped,
             n_duplicate, len(genes))
    if not genes:
        raise InputError(f"no scGPT vocabulary symbol in {vocab_path} has an Ensembl ID in {gene_info}; "
                         "check that 'feature_name' holds gene symbols of the same species")

    selected = table[torch.as_tensor(rows, dtype=torch.long)].detach().to(torch.float64).numpy()
    mean = selected.mean(axis=1, keepdims=True)
    var = selected.var(axis=1, keepdims=True)  # biased, as nn.LayerNorm uses
    normed = (selected - mean) / np.sqrt(var + eps)
    normed = normed * scale.detach().to(torch.float64).numpy() + shift.detach().to(torch.float64).numpy()
    return genes, np.ascontiguousarray(normed, dtype=np.float32)


def load_transcriptformer(h5) -> tuple[list[str], np.ndarray]:
    """TranscriptFormer's released per-gene embeddings, with every dimension standardised.

    Parameters
    ----------
    h5 : str or path-like
        HDF5 file with a ``keys`` dataset of Ensembl IDs (bytes or str) and an ``arrays``
        group holding one 1-D vector per ID, stored under the ID.

    Returns
    -------
    genes : list of str
        Version-less Ensembl IDs in the order of ``keys``; a later ID that becomes a
        duplicate once its version is stripped is dropped (and logged).
    embedding : numpy.ndarray, shape (genes, dims), float32
        Vectors z-scored per dimension across genes (:func:`standardize_dimensions`).

    Raises
    ------
    InputError
        For a missing file, no ``keys`` / ``arrays``, an ID without a vector, or vectors
        of different lengths.
    """
    import h5py

    path = _require_file(Path(h5).expanduser(), "TranscriptFormer embedding file")
    try:
        fh = h5py.File(path, "r")
    except OSError as exc:
        raise InputError(f"TranscriptFormer embedding file {path} is not a readable HDF5 file ({exc})") from None
    with fh:
        for name, kind in (("keys", h5py.Dataset), ("arrays", h5py.Group)):
            if name not in fh or not isinstance(fh[name], kind):
                raise InputError(f"TranscriptFormer embedding file {path} has no '{name}' "
                                 f"{'dataset' if kind is h5py.Dataset else 'group'} (top level holds "
                                 f"{sorted(fh.keys())[:10]}); expected 'keys' (gene IDs) and 'arrays' "
                                 "(one vector per ID)")
        keys = [k.decode() if isinstance(k, bytes) else str(k) for k in np.asarray(fh["keys"][()]).ravel()]
        arrays = fh["arrays"]
        genes: list[str] = []
        vectors: list[np.ndarray] = []
        seen: set[str] = set()
        n_duplicate = 0
        for key in keys:
            if key not in arrays or not isinstance(arrays[key], h5py.Dataset):
                raise InputError(f"TranscriptFormer embedding file {path}: gene {key!r} is listed in 'keys' but "
                                 "has no vector in 'arrays'")
            vector = np.asarray(arrays[key][()])
            if vector.ndim != 1:
                # A (1, d) row is still one vector; anything else is not a per-gene embedding.
                if vector.size and vector.squeeze().ndim == 1:
                    vector = vector.squeeze()
                else:
                    raise InputError(f"TranscriptFormer embedding file {path}: arrays/{key} has shape "
                                     f"{vector.shape}, expected a 1-D vector")
            if vectors and vector.shape != vectors[0].shape:
                raise InputError(f"TranscriptFormer embedding file {path}: vectors have different lengths "
                                 f"({genes[0]!r} has {vectors[0].shape[0]}, {key!r} has {vector.shape[0]})")
            gene = strip_version(key)
            if gene in seen:
                n_duplicate += 1
                continue
            seen.add(gene)
            genes.append(gene)
            vectors.append(vector)
    if not genes:
        raise InputError(f"TranscriptFormer embedding file {path} lists no genes in 'keys'")
    if n_duplicate:
        log.warning("TranscriptFormer: %d IDs duplicated another once their version was stripped; "
                    "the first of each was kept", n_duplicate)
    embedding = check_embedding(np.vstack(vectors), name=f"TranscriptFormer embedding {path}")
    log.info("TranscriptFormer: %d genes x %d dimensions", *embedding.shape)
    return genes, standardize_dimensions(embedding)


def _read_gene_file(path: Path) -> list[str]:
    _require_file(path, "gene list")
    if path.suffix.lower() == ".json":
        genes = _read_json(path, "gene list")
        if isinstance(genes, dict):
            genes = genes.get("genes")
        if not isinstance(genes, list) or not all(isinstance(g, str) for g in genes):
            raise InputError(f"gene list {path} must hold a JSON list of gene IDs (strings)")
        return genes
    try:
        with open(path) as fh:
            return [line.strip() for line in fh if line.strip()]
    except UnicodeDecodeError:
        raise InputError(f"gene list {path} is not a UTF-8 text file with one gene ID per line") from None


def _read_matrix_file(path: Path) -> np.ndarray:
    _require_file(path, "embedding matrix")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        try:
            return np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise InputError(f"embedding matrix {path} is not a numeric .npy array ({exc})") from None
    if suffix in (".csv", ".tsv", ".txt"):
        import pandas as pd

        sep = "," if suffix == ".csv" else "\t"
        try:
            table = pd.read_csv(path, sep=sep, header=None, dtype=np.float64)
        except (ValueError, pd.errors.EmptyDataError) as exc:
            raise InputError(f"embedding matrix {path} must be numbers only, {'comma' if sep == ',' else 'tab'}-"
                             "separated, with no header row and no gene-ID column (put the IDs in the gene "
                             f"list file) ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
        return table.to_numpy()
    raise InputError(f"embedding matrix {path}: unsupported file type {path.suffix!r}; use .npy, or .csv / "
                     ".tsv with numbers only")


def load_embedding_matrix(matrix, genes) -> tuple[list[str], np.ndarray]:
    """Any model's gene embeddings, from a matrix file and a gene list file.

    Parameters
    ----------
    matrix : str or path-like
        The genes x dims embedding: ``.npy``, or delimited text -- ``.csv`` (comma) or
        ``.tsv`` / ``.txt`` (tab) -- holding numbers only: no header row and no column of
        gene IDs, one row per gene.
    genes : str or path-like
        The matrix's genes in row order: a ``.json`` list of strings (or an object with a
        ``genes`` list), or any other file as plain text with one ID per line (blank lines
        are skipped). IDs are used as given, with no version stripping, so they must match
        the data's ``var_names``.

    Returns
    -------
    genes : list of str
    embedding : numpy.ndarray, shape (genes, dims), float32

    Raises
    ------
    InputError
        When a file is missing or unreadable, the matrix is not 2-D, its row count differs
        from the number of genes, a gene is listed twice, or a value is not finite.
    """
    matrix = Path(matrix).expanduser()
    genes_path = Path(genes).expanduser()
    names = _read_gene_file(genes_path)
    values = _read_matrix_file(matrix)
    if values.ndim != 2:
        raise InputError(f"embedding matrix {matrix} must be 2-D (genes x dims), got shape {values.shape}")
    if values.shape[0] != len(names):
        raise InputError(f"embedding matrix {matrix} has {values.shape[0]} rows but gene list {genes_path} has "
                         f"{len(names)} genes; there must be one row per gene, in the same order")
    counts: dict[str, int] = {}
    for name in names:
        counts[name] = counts.get(name, 0) + 1
    duplicates = [name for name, count in counts.items() if count > 1]
    if duplicates:
        raise InputError(f"gene list {genes_path} lists {len(duplicates)} genes more than once (e.g. "
                         f"{duplicates[:3]}); keep one row per gene")
    values = check_embedding(values, name=f"embedding matrix {matrix}")
    log.info("embeddings: %d genes x %d dimensions", *values.shape)
    return names, np.ascontiguousarray(values, dtype=np.float32)
