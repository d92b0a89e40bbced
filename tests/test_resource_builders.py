"""Building similarity resources from released embedding files, and the build command line.

Every input is written here in the format its model is published in (a torch state dict,
vocab/args JSON and a gene-info CSV for scGPT; a keys/arrays HDF5 for TranscriptFormer;
matrix + gene list for anything else), and every result is checked against plain numpy.
"""
from __future__ import annotations

import json
import logging
import subprocess
import sys

import h5py
import numpy as np
import pytest
import scipy.sparse as sp
import torch

from deltanmf.errors import InputError
from deltanmf.resources import FileResource, similarity_from_embeddings, strip_version
from deltanmf.resources.__main__ import main
from deltanmf.resources.build import (
    DENSE_NAME,
    GENES_NAME,
    KNN_NAME,
    build,
    correlation_similarity,
    knn_similarity,
    write_resource,
)
from deltanmf.resources.loaders import (
    load_embedding_matrix,
    load_scgpt,
    load_transcriptformer,
    standardize_dimensions,
)

# ----------------------------------------------------------------------------- references


def layer_norm(x, weight, bias, eps):
    mean = x.mean(axis=1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * weight + bias


def laplacian_trace(s, w):
    """``1/2 sum_ij S_ij ||w_i - w_j||^2``, straight from the definition."""
    diff = w[:, None, :] - w[None, :, :]
    return 0.5 * float(np.sum(s[:, :, None] * diff**2))


def knn_reference(s, k):
    """Boolean pattern: each row's k largest positive entries, then OR-ed with its transpose."""
    keep = np.zeros(s.shape, dtype=bool)
    for i, row in enumerate(s):
        positive = np.flatnonzero(row > 0)
        top = positive[np.argsort(-row[positive])][:k]
        keep[i, top] = True
    return keep | keep.T


def assert_close_to_reference(actual, reference):
    np.testing.assert_allclose(actual, reference, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- scGPT files

# Token order in the JSON file is not index order, so "first in vocab-index order" is tested.
VOCAB = {"ALIAS": 6, "<pad>": 0, "<cls>": 1, "TP53": 2, "BRCA1": 3, "NOTMAPPED": 4, "EGFR": 5, "<eoc>": 7,
         "MYC": 8}
# Symbol -> expected (vocab row, version-less Ensembl ID). ALIAS maps to TP53's ID at a later index.
SCGPT_KEPT = {"TP53": (2, "ENSG00000141510"), "BRCA1": (3, "ENSG00000012048"),
              "EGFR": (5, "ENSG00000146648"), "MYC": (8, "ENSG00000136997")}
GENE_INFO = """soma_joinid,feature_id,feature_name,feature_length
0,ENSG00000141510.16,TP53,2579
1,ENSG00000012048,BRCA1,7088
2,ENSG00000146648.18,EGFR,9905
3,ENSG00000141510,ALIAS,2579
4,ENSG00000136997,MYC,2721
5,ENSG00000000003,NOTINVOCAB,4535
"""


def write_scgpt(directory, *, state=None, vocab=VOCAB, args=None, d=6, seed=0):
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    if state is None:
        state = {
            "encoder.embedding.weight": torch.tensor(rng.normal(size=(10, d)) * 3 + 1, dtype=torch.float32),
            "encoder.enc_norm.weight": torch.tensor(rng.uniform(0.5, 1.5, size=d), dtype=torch.float32),
            "encoder.enc_norm.bias": torch.tensor(rng.normal(size=d) * 0.1, dtype=torch.float32),
            "value_encoder.linear1.weight": torch.zeros(d, 1),
            "transformer_encoder.layers.0.self_attn.in_proj_weight": torch.zeros(3 * d, d),
            "decoder.fc.0.weight": torch.zeros(d, d),
        }
    torch.save(state, directory / "best_model.pt")
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "args.json").write_text(json.dumps(args or {"embsize": d, "nlayers": 12, "pad_token": "<pad>"}))
    return state


@pytest.fixture
def scgpt_files(tmp_path):
    model_dir = tmp_path / "scGPT_human"
    state = write_scgpt(model_dir)
    gene_info = tmp_path / "gene_info.csv"
    gene_info.write_text(GENE_INFO)
    return model_dir, gene_info, state


@pytest.mark.parametrize("args, eps", [(None, 1e-5), ({"embsize": 6, "layer_norm_eps": 0.5}, 0.5)])
def test_scgpt_embedding_is_the_layer_normed_gene_encoder(tmp_path, scgpt_files, args, eps, caplog):
    model_dir, gene_info, state = scgpt_files
    if args is not None:
        (model_dir / "args.json").write_text(json.dumps(args))
    with caplog.at_level(logging.INFO, logger="deltanmf.resources.loaders"):
        genes, embedding = load_scgpt(model_dir, gene_info)

    # Special tokens, the unmapped symbol and the later alias are gone; IDs are version-less.
    assert genes == [gene_id for _, gene_id in SCGPT_KEPT.values()]
    rows = [row for row, _ in SCGPT_KEPT.values()]
    table = state["encoder.embedding.weight"].double().numpy()
    expected = layer_norm(table[rows], state["encoder.enc_norm.weight"].double().numpy(),
                          state["encoder.enc_norm.bias"].double().numpy(), eps)
    assert embedding.dtype == np.float32 and embedding.shape == (4, 6)
    np.testing.assert_allclose(embedding, expected, rtol=1e-5, atol=1e-6)
    assert "9 vocabulary tokens" in caplog.text
    assert "3 special tokens dropped" in caplog.text
    assert "4 genes mapped" in caplog.text


def test_scgpt_errors_name_the_problem(tmp_path, scgpt_files):
    model_dir, gene_info, state = scgpt_files

    with pytest.raises(InputError, match="gene_info_missing.csv"):
        load_scgpt(model_dir, tmp_path / "gene_info_missing.csv")
    with pytest.raises(InputError, match="scGPT model directory not found"):
        load_scgpt(tmp_path / "nowhere", gene_info)

    bad_csv = tmp_path / "symbols.csv"
    bad_csv.write_text("gene_symbol,gene_id\nTP53,ENSG00000141510\n")
    with pytest.raises(InputError, match=r"symbols\.csv.*feature_name.*feature_id"):
        load_scgpt(model_dir, bad_csv)

    write_scgpt(tmp_path / "big_vocab", vocab={**VOCAB, "KRAS": 50})
    with pytest.raises(InputError, match=r"1 indices outside the embedding table of 10 rows.*'KRAS': 50"):
        load_scgpt(tmp_path / "big_vocab", gene_info)

    no_norm = {k: v for k, v in state.items() if not k.startswith("encoder.enc_norm")}
    write_scgpt(tmp_path / "no_norm", state=no_norm)
    with pytest.raises(InputError, match=r"lack \['encoder.enc_norm.weight', 'encoder.enc_norm.bias'\]; "
                                         r"keys starting with 'encoder' are \['encoder.embedding.weight'\]"):
        load_scgpt(tmp_path / "no_norm", gene_info)

    for name in ("best_model.pt", "vocab.json"):
        broken = tmp_path / f"without_{name}"
        write_scgpt(broken)
        (broken / name).unlink()
        with pytest.raises(InputError, match=f"not found: .*{name}"):
            load_scgpt(broken, gene_info)


# ----------------------------------------------------------------------------- TranscriptFormer


def write_transcriptformer(path, ids, vectors, *, as_bytes=True, drop=()):
    with h5py.File(path, "w") as fh:
        if "keys" not in drop:
            if as_bytes:
                fh.create_dataset("keys", data=np.array([i.encode() for i in ids]))
            else:
                fh.create_dataset("keys", data=ids, dtype=h5py.string_dtype())
        if "arrays" not in drop:
            group = fh.create_group("arrays")
            for gene_id, vector in zip(ids, vectors):
                if vector is not None:
                    group.create_dataset(gene_id, data=vector)


TF_IDS = ["ENSG00000141510.16", "ENSG00000012048", "ENSG00000146648.3", "ENSG00000136997", "ENSG00000000003.1"]


@pytest.mark.parametrize("as_bytes", [True, False])
def test_transcriptformer_ids_are_stripped_and_dimensions_standardised(tmp_path, as_bytes):
    rng = np.random.default_rng(1)
    vectors = rng.normal(size=(5, 4)) * [1.0, 10.0, 0.1, 1.0] + [0.0, 5.0, -3.0, 0.0]
    vectors[:, 3] = 2.5  # a constant dimension must become 0, not NaN
    path = tmp_path / "tf_sapiens_gene_embeddings.h5"
    write_transcriptformer(path, TF_IDS, vectors.astype(np.float32), as_bytes=as_bytes)

    genes, embedding = load_transcriptformer(path)
    assert genes == ["ENSG00000141510", "ENSG00000012048", "ENSG00000146648", "ENSG00000136997",
                     "ENSG00000000003"]
    raw = vectors.astype(np.float32).astype(np.float64)
    expected = (raw - raw.mean(axis=0)) / np.where(raw.std(axis=0) > 0, raw.std(axis=0), 1.0)
    expected[:, 3] = 0.0
    np.testing.assert_allclose(embedding, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(embedding[:, :3].mean(axis=0), 0.0, atol=1e-6)
    np.testing.assert_allclose(embedding[:, :3].std(axis=0), 1.0, rtol=1e-5)


def test_standardize_dimensions_constant_dimension_is_zero():
    e = np.array([[1.0, 3.0], [2.0, 3.0], [4.0, 3.0]])
    z = standardize_dimensions(e)
    assert np.all(np.isfinite(z))
    np.testing.assert_array_equal(z[:, 1], 0.0)
    np.testing.assert_allclose(z[:, 0], (e[:, 0] - e[:, 0].mean()) / e[:, 0].std(), rtol=1e-6)


def test_transcriptformer_errors_name_the_problem(tmp_path):
    vectors = [np.ones(3), np.arange(3.0), np.arange(3.0) ** 2]
    ids = TF_IDS[:3]
    cases = {
        "no_keys.h5": (dict(drop=("keys",)), "no 'keys' dataset"),
        "no_arrays.h5": (dict(drop=("arrays",)), "no 'arrays' group"),
    }
    for name, (kwargs, message) in cases.items():
        write_transcriptformer(tmp_path / name, ids, vectors, **kwargs)
        with pytest.raises(InputError, match=f"{name}.*{message}"):
            load_transcriptformer(tmp_path / name)

    write_transcriptformer(tmp_path / "hole.h5", ids, [vectors[0], None, vectors[2]])
    with pytest.raises(InputError, match="'ENSG00000012048' is listed in 'keys' but has no vector"):
        load_transcriptformer(tmp_path / "hole.h5")

    write_transcriptformer(tmp_path / "ragged.h5", ids, [vectors[0], np.arange(4.0), vectors[2]])
    with pytest.raises(InputError, match="different lengths.*has 3.*has 4"):
        load_transcriptformer(tmp_path / "ragged.h5")

    with pytest.raises(InputError, match="not found: .*absent.h5"):
        load_transcriptformer(tmp_path / "absent.h5")


def test_strip_version_only_touches_ensembl_ids():
    assert strip_version("ENSG00000141510.16") == "ENSG00000141510"
    assert strip_version("ENSMUSG00000000001.4") == "ENSMUSG00000000001"
    assert strip_version("ENSG00000002586.20_PAR_Y") == "ENSG00000002586.20_PAR_Y"
    assert strip_version("RP11-34P13.7") == "RP11-34P13.7"


# ----------------------------------------------------------------------------- similarity


def _embedding():
    rng = np.random.default_rng(2)
    e = rng.normal(size=(37, 9)) + rng.normal(size=(37, 1)) * 5  # gene offsets: centring matters
    e[4] = 0.1  # a constant gene, whose mean is not exactly representable
    return e


@pytest.fixture
def embedding():
    return _embedding()


@pytest.mark.parametrize("block_size", [1, 5, 16, 36, 37, 2048])
def test_correlation_similarity_matches_the_dense_reference(embedding, block_size):
    s = correlation_similarity(embedding, block_size=block_size)
    assert s.dtype == np.float32 and s.shape == (37, 37)
    reference = similarity_from_embeddings(embedding)
    reference[4] = reference[:, 4] = 0.0  # the dense helper may turn an ulp of noise into a direction
    assert_close_to_reference(s, reference)
    np.testing.assert_array_equal(s, s.T)
    np.testing.assert_array_equal(np.diag(s), 0.0)
    np.testing.assert_array_equal(s[4], 0.0)
    assert s.min() >= 0


class _UnevenProducts(np.ndarray):
    """Unit rows whose products are off by an ulp-sized amount that depends on the position in
    the product, as a BLAS whose kernels sum the two halves of a block in different orders
    gives: ``A @ B`` is then not the transpose of ``B @ A`` to the last bit."""

    def __matmul__(self, other):
        product = np.asarray(self) @ np.asarray(other)
        rows, cols = np.indices(product.shape)
        return product + 1e-7 * np.sin(3.0 * rows + 7.0 * cols).astype(product.dtype)


@pytest.mark.parametrize("block_size", [4, 5, 10, 36])
def test_correlation_similarity_is_exactly_symmetric_whatever_the_products_round(monkeypatch, embedding, block_size):
    """Symmetric by construction (each block pair computed once and mirrored, the diagonal
    blocks' upper triangles too), not by the luck of the machine's BLAS; 37 genes split
    unevenly by every block size here."""
    from deltanmf.resources import build as build_module

    unit_rows = build_module._unit_rows
    monkeypatch.setattr(build_module, "_unit_rows", lambda e, b: unit_rows(e, b).view(_UnevenProducts))
    s = correlation_similarity(embedding, block_size=block_size)
    assert type(s) is np.ndarray
    np.testing.assert_array_equal(s, s.T)
    np.testing.assert_array_equal(np.diag(s), 0.0)
    reference = similarity_from_embeddings(embedding)
    reference[4] = reference[:, 4] = 0.0
    assert_close_to_reference(s, reference)
    knn = knn_similarity(embedding, 5, block_size=block_size)  # symmetrised by the elementwise maximum
    assert abs(knn - knn.T).nnz == 0


@pytest.mark.parametrize("block_size", [3, 7, 64])
@pytest.mark.parametrize("k", [1, 5, 36, 100])
def test_knn_keeps_each_genes_k_strongest_positive_neighbours(embedding, k, block_size):
    dense = similarity_from_embeddings(embedding)
    dense[4] = dense[:, 4] = 0.0
    s = knn_similarity(embedding, k, block_size=block_size)

    assert isinstance(s, sp.csr_matrix) and s.dtype == np.float32 and s.shape == (37, 37)
    assert np.all(s.data > 0)  # no explicit zeros
    assert (abs(s - s.T)).nnz == 0
    assert np.all(s.diagonal() == 0)
    expected = knn_reference(dense, k)
    np.testing.assert_array_equal(s.toarray() > 0, expected)
    rows, cols = s.nonzero()
    assert_close_to_reference(np.asarray(s[rows, cols]).ravel(), dense[rows, cols])
    if k >= 36:  # every positive correlation survives
        np.testing.assert_array_equal(expected, dense > 0)


def test_similarity_rejects_bad_input():
    with pytest.raises(InputError, match="2-D"):
        correlation_similarity(np.ones(5))
    with pytest.raises(InputError, match="NaN or infinite.*row 1, column 0"):
        correlation_similarity(np.array([[1.0, 2.0], [np.nan, 1.0]]))
    with pytest.raises(InputError, match="k must be a positive integer"):
        knn_similarity(np.eye(3), 0)
    with pytest.raises(InputError, match="block_size"):
        correlation_similarity(np.eye(3), block_size=0)


# ----------------------------------------------------------------------------- other models


@pytest.fixture
def matrix_files(tmp_path, embedding):
    genes = [f"gene{i}" for i in range(len(embedding))]
    np.save(tmp_path / "E.npy", embedding)
    (tmp_path / "genes.json").write_text(json.dumps(genes))
    np.savetxt(tmp_path / "E.csv", embedding, delimiter=",", fmt="%.17g")
    (tmp_path / "genes.txt").write_text("\n".join(genes) + "\n\n")
    return tmp_path, genes


@pytest.mark.parametrize("matrix, gene_file", [("E.npy", "genes.json"), ("E.csv", "genes.txt")])
def test_load_embedding_matrix(matrix_files, embedding, matrix, gene_file):
    directory, expected_genes = matrix_files
    genes, e = load_embedding_matrix(directory / matrix, directory / gene_file)
    assert genes == expected_genes
    assert e.dtype == np.float32
    np.testing.assert_allclose(e, embedding, rtol=1e-6)


def test_load_embedding_matrix_errors_name_the_problem(matrix_files, embedding):
    directory, genes = matrix_files
    (directory / "short.json").write_text(json.dumps(genes[:-1]))
    with pytest.raises(InputError, match=r"E\.npy has 37 rows but gene list .*short\.json has 36 genes"):
        load_embedding_matrix(directory / "E.npy", directory / "short.json")

    (directory / "dup.txt").write_text("\n".join(genes[:-1] + ["gene3"]))
    with pytest.raises(InputError, match=r"dup\.txt lists 1 genes more than once \(e\.g\. \['gene3'\]\)"):
        load_embedding_matrix(directory / "E.npy", directory / "dup.txt")

    bad = embedding.copy()
    bad[2, 3] = np.inf
    np.save(directory / "inf.npy", bad)
    with pytest.raises(InputError, match=r"inf\.npy has NaN or infinite values \(first at row 2, column 3\)"):
        load_embedding_matrix(directory / "inf.npy", directory / "genes.json")

    with open(directory / "header.csv", "w") as fh:
        fh.write("d0,d1,d2,d3,d4,d5,d6,d7,d8\n")
        np.savetxt(fh, embedding, delimiter=",")
    with pytest.raises(InputError, match=r"header\.csv must be numbers only.*no header row"):
        load_embedding_matrix(directory / "header.csv", directory / "genes.json")

    with pytest.raises(InputError, match=r"embedding matrix not found: .*gone\.npy"):
        load_embedding_matrix(directory / "gone.npy", directory / "genes.json")
    with pytest.raises(InputError, match=r"unsupported file type '\.parquet'"):
        (directory / "E.parquet").write_bytes(b"")
        load_embedding_matrix(directory / "E.parquet", directory / "genes.json")


# ----------------------------------------------------------------------------- writing


def test_write_resource_replaces_files_atomically(tmp_path, monkeypatch):
    out = tmp_path / "deep" / "out"
    first = np.array([[0.0, 0.5], [0.5, 0.0]], dtype=np.float32)
    paths = write_resource(out, ["a", "b"], first)
    assert paths == [out / DENSE_NAME, out / GENES_NAME]

    def crash(fh, *args, **kwargs):
        fh.write(b"\x93NUMPY half a header")
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(np, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        write_resource(out, ["a", "b"], np.zeros((2, 2), dtype=np.float32))
    monkeypatch.undo()
    np.testing.assert_array_equal(np.load(out / DENSE_NAME), first)
    assert sorted(p.name for p in out.iterdir()) == [DENSE_NAME, GENES_NAME]

    paths = write_resource(out, ["a", "b"], sp.csr_matrix(first))
    assert paths == [out / KNN_NAME, out / GENES_NAME]
    np.testing.assert_array_equal(sp.load_npz(out / KNN_NAME).toarray(), first)
    with pytest.raises(InputError, match=r"similarity is \(2, 2\) but there are 3 genes"):
        write_resource(out, ["a", "b", "c"], first)


def test_build_checks_its_inputs(tmp_path):
    with pytest.raises(InputError, match="unknown embedding kind 'geneformer'"):
        build("geneformer", tmp_path)
    with pytest.raises(InputError, match=r"missing \['gene_info'\]"):
        build("scgpt", tmp_path, model_dir=tmp_path)


# ----------------------------------------------------------------------------- command line


def graph_trace_matches(matrix, genes_file, genes, dense):
    """Load the written resource on a shuffled gene subset; compare its Laplacian trace to numpy."""
    rng = np.random.default_rng(3)
    pick = rng.permutation(len(genes))[: len(genes) - 5]
    graph = FileResource(str(matrix), str(genes_file)).graph([genes[i] for i in pick])
    w = rng.uniform(size=(len(pick), 3))
    got = float(graph.trace(torch.tensor(w, dtype=torch.float32)))
    np.testing.assert_allclose(got, laplacian_trace(dense[np.ix_(pick, pick)], w), rtol=1e-4)


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory):
    """Both subprocess runs of the command line, started together.

    Each run pays the package's import time, so running them side by side keeps this
    module fast; the tests below only inspect the results.
    """
    directory = tmp_path_factory.mktemp("cli")
    e = _embedding()
    genes = [f"gene{i}" for i in range(len(e))]
    np.savetxt(directory / "E.csv", e, delimiter=",", fmt="%.17g")
    (directory / "genes.txt").write_text("\n".join(genes) + "\n")
    (directory / "genes.json").write_text(json.dumps(genes))
    commands = {
        "dense": ["embeddings", "--matrix", str(directory / "E.csv"), "--genes", str(directory / "genes.txt"),
                  "--out", str(directory / "resource"), "--block-size", "8"],
        "missing": ["embeddings", "--matrix", str(directory / "missing.npy"), "--genes",
                    str(directory / "genes.json"), "--out", str(directory / "not_written")],
    }
    running = {name: subprocess.Popen([sys.executable, "-m", "deltanmf.resources", *args], stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True) for name, args in commands.items()}
    results = {}
    for name, process in running.items():
        stdout, stderr = process.communicate(timeout=180)
        results[name] = (process.returncode, stdout, stderr)
    return directory, genes, e, results


def test_cli_writes_a_dense_resource_that_file_resource_loads(cli_runs):
    directory, genes, embedding, results = cli_runs
    returncode, stdout, stderr = results["dense"]
    out = directory / "resource"
    assert returncode == 0, stderr
    assert "37 genes" in stdout and str(out / DENSE_NAME) in stdout and str(out / GENES_NAME) in stdout
    assert json.loads((out / GENES_NAME).read_text()) == genes
    dense = similarity_from_embeddings(embedding)
    dense[4] = dense[:, 4] = 0.0
    assert_close_to_reference(np.load(out / DENSE_NAME), dense)
    graph_trace_matches(out / DENSE_NAME, out / GENES_NAME, genes, dense)


def test_cli_missing_file_exits_2_with_one_line_and_no_traceback(cli_runs):
    directory, _, _, results = cli_runs
    returncode, stdout, stderr = results["missing"]
    assert returncode == 2
    assert "Traceback" not in stderr and stdout == ""
    lines = stderr.strip().splitlines()
    assert lines == [f"deltanmf.resources: error: embedding matrix not found: {directory / 'missing.npy'}"]
    assert not (directory / "not_written").exists()


@pytest.mark.filterwarnings("ignore:Sparse")  # torch's notes on its beta sparse support, raised by FileResource
def test_cli_knn_and_model_subcommands(tmp_path, scgpt_files, matrix_files, embedding, capsys):
    directory, genes = matrix_files
    out = tmp_path / "knn"
    assert main(["embeddings", "--matrix", str(directory / "E.npy"), "--genes", str(directory / "genes.json"),
                 "--out", str(out), "--knn", "4", "-q"]) == 0
    printed = capsys.readouterr().out
    dense = similarity_from_embeddings(embedding)
    dense[4] = dense[:, 4] = 0.0
    expected = np.where(knn_reference(dense, 4), dense, 0.0)
    assert "k=4): 37 genes" in printed and f"{np.count_nonzero(expected)} non-zeros" in printed
    assert str(out / KNN_NAME) in printed
    graph_trace_matches(out / KNN_NAME, out / GENES_NAME, genes, expected)

    model_dir, gene_info, _ = scgpt_files
    assert main(["scgpt", "--model-dir", str(model_dir), "--gene-info", str(gene_info), "--out",
                 str(tmp_path / "scgpt"), "-q"]) == 0
    assert json.loads((tmp_path / "scgpt" / GENES_NAME).read_text()) == [g for _, g in SCGPT_KEPT.values()]
    assert np.load(tmp_path / "scgpt" / DENSE_NAME).shape == (4, 4)

    h5 = tmp_path / "tf.h5"
    write_transcriptformer(h5, TF_IDS, np.random.default_rng(4).normal(size=(5, 3)))
    assert main(["transcriptformer", "--h5", str(h5), "--out", str(tmp_path / "tf"), "--knn", "2", "-q"]) == 0
    assert sp.load_npz(tmp_path / "tf" / KNN_NAME).shape == (5, 5)

    assert main(["transcriptformer", "--h5", str(tmp_path / "none.h5"), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("deltanmf.resources: error: ") and "none.h5" in err[0]


def test_cli_help_lists_the_subcommands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for word in ("scgpt", "transcriptformer", "embeddings", "max(0, corr(E))"):
        assert word in text
    with pytest.raises(SystemExit):
        main(["scgpt", "--help"])
    text = capsys.readouterr().out
    for option in ("--model-dir", "--gene-info", "--out", "--knn", "--block-size"):
        assert option in text
