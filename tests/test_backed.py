"""Streaming from an h5ad on disk (``data.backed=true``): the row source and the streamed
preparation against the in-memory ``prepare``, the block-shuffled batches, a fit through the
pipeline against the in-memory fit, and the large-file generator."""
from __future__ import annotations

import importlib.util
import shutil

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from conftest import ROOT
from deltanmf.data import (
    H5adRows,
    load_input,
    open_h5ad,
    prepare,
    read_h5ad,
    simulate_case_control,
    simulation_truth,
)
from deltanmf.errors import InputError
from deltanmf.workflow.config import default_settings
from helpers import consensus, data, datamodule, run


def _sim(seed: int = 1, shuffle: bool = True) -> ad.AnnData:
    """500 cells (controls and cases interleaved when ``shuffle``) x 300 genes, with a raw-count layer."""
    a = simulate_case_control(n_genes=300, n_programs=5, n_case_programs=2, n_control=250, n_case=250,
                              markers_per_program=30, seed=seed)
    if shuffle:
        a = a[np.random.default_rng(seed).permutation(a.n_obs)].copy()
    a.layers["counts"] = a.X.copy()
    return a


@pytest.fixture(scope="module")
def sim_file(tmp_path_factory):
    a = _sim()
    path = tmp_path_factory.mktemp("backed") / "sim.h5ad"
    a.write_h5ad(path)
    return a, path


def _dense(x) -> np.ndarray:
    return x.toarray() if sp.issparse(x) else np.asarray(x)


SETTINGS = [
    dict(normalize="none"),
    dict(normalize="total", target_sum=5000.0),
    dict(normalize="median", use_case=False),
    dict(normalize="total", scale_genes=False, min_cells=60, layer="counts"),
    dict(normalize="none", remove_genes=["ENSG00000000003", "ENSG00000000010"], case="case"),
]


@pytest.mark.smoke
@pytest.mark.parametrize("settings", SETTINGS)
def test_streamed_preparation_equals_prepare(sim_file, settings):
    adata, path = sim_file
    changes = dict(settings)
    use_case = changes.pop("use_case", True)
    ref = prepare(adata, data("condition", "control", **changes), use_case=use_case)
    got = prepare(open_h5ad(path), data("condition", "control", **changes), use_case=use_case, pass_cells=64)
    assert isinstance(got.X, H5adRows)
    assert got.X.shape == ref.X.shape
    pd.testing.assert_index_equal(got.obs.index, ref.obs.index)
    pd.testing.assert_index_equal(got.var.index, ref.var.index)
    np.testing.assert_array_equal(got.is_control, ref.is_control)
    assert got.gene_counts == ref.gene_counts
    np.testing.assert_array_equal(got.gene_ids, ref.gene_ids)
    # totals and variances: float64 streamed vs float32 in memory
    np.testing.assert_allclose(got.cell_scale, ref.cell_scale, rtol=1e-6)
    np.testing.assert_allclose(got.gene_scale, ref.gene_scale, rtol=1e-6)
    index = np.sort(np.random.default_rng(0).choice(ref.X.shape[0], 97, replace=False))
    np.testing.assert_allclose(_dense(got.X.read_rows(index)), _dense(ref.X[index]), rtol=2e-6, atol=0)
    # the subset views the pipeline takes
    np.testing.assert_allclose(_dense(got.control.to_memory()), _dense(ref.control), rtol=2e-6)
    if use_case:
        np.testing.assert_allclose(_dense(got.case.to_memory()), _dense(ref.case), rtol=2e-6)
    assert got.source.n_obs == ref.source.n_obs and "sim_usage" in got.source.obsm


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_raw_and_float16_on_disk_stream_as_in_memory(tmp_path, dtype):
    """data.use_raw=true reads .raw (its own genes) from the file; float16 values, which scipy
    cannot hold, are read as float32: the same prepared matrix as in memory."""
    a = _sim(shuffle=False)
    a.raw = a.copy()
    a = a[:, 50:].copy()  # .X without the first 50 genes; .raw keeps them
    if dtype == np.float16:
        a.raw = ad.AnnData(X=np.asarray(_dense(a.raw.X), dtype=np.float16), obs=a.obs, var=a.raw.var)
    path = tmp_path / "raw.h5ad"
    a.write_h5ad(path)
    settings = data("condition", "control", use_raw=True)
    streamed = prepare(open_h5ad(path), settings, use_case=True)
    in_memory = prepare(ad.read_h5ad(path), settings, use_case=True)
    assert streamed.n_genes == in_memory.n_genes > a.n_vars
    assert list(streamed.var.index) == list(in_memory.var.index)
    np.testing.assert_array_equal(_dense(streamed.X.read_rows(np.arange(len(streamed.obs)))), _dense(in_memory.X))


def test_rows_bit_for_bit_given_the_same_scales(sim_file):
    """With prepare's own scales the streamed rows are identical, in any order of cells and genes."""
    adata, path = sim_file
    ref = prepare(adata, data("condition", "control", normalize="total", scale_genes=True), use_case=True)
    file = open_h5ad(path)
    cells = adata.obs_names.get_indexer(ref.obs.index)
    genes = adata.var_names.get_indexer(ref.var.index)
    rows = H5adRows(file.matrix(), cells, genes, ref.cell_scale, ref.gene_scale)
    x = rows.read_rows(np.arange(rows.shape[0]))
    assert x.dtype == np.float32 and sp.isspmatrix_csr(x) and x.has_sorted_indices
    np.testing.assert_array_equal(x.toarray(), ref.X.toarray())
    # stage1_from: genes in a given (unsorted) order with a given scale
    order = np.random.default_rng(3).permutation(len(ref.var))
    again = prepare(file, data("condition", "control", normalize="total"), use_case=True,
                    genes=list(ref.var.index[order]), gene_scale=ref.gene_scale[order])
    np.testing.assert_allclose(again.X.to_memory().toarray(), ref.X.toarray()[:, order], rtol=2e-6)
    assert again.X.to_memory().has_sorted_indices


def test_repeated_entries_on_disk_are_summed_as_in_memory(tmp_path):
    """CSR from other writers may store a (cell, gene) entry more than once, and unsorted;
    scipy (the in-memory path) sums such entries, so streaming must too: the same gene
    filters, scales and rows."""
    adata = _sim(seed=4)
    x = adata.X.tocsr()
    # every stored value split in two entries of the same gene, the halves in reverse order
    counts = np.diff(x.indptr)
    indptr = np.concatenate([[0], np.cumsum(2 * counts)])
    indices = np.concatenate([np.concatenate([r, r[::-1]]) for r in np.split(x.indices, x.indptr[1:-1])])
    stored = np.concatenate([np.concatenate([v * 0.25, v[::-1] * 0.75]) for v in np.split(x.data, x.indptr[1:-1])])
    path = tmp_path / "repeated.h5ad"
    adata.write_h5ad(path)
    with h5py.File(path, "r+") as f:
        for name, values in (("indptr", indptr.astype(np.int64)), ("indices", indices.astype(np.int32)),
                             ("data", stored.astype(np.float32))):
            del f["X"][name]
            f["X"][name] = values
    on_disk = open_h5ad(path).matrix()
    assert on_disk.n_stored == 2 * x.nnz  # the file really holds the repeats
    settings = dict(normalize="total", min_cells=30)
    ref = prepare(adata, data("condition", "control", **settings), use_case=True)
    got = prepare(open_h5ad(path), data("condition", "control", **settings), use_case=True)
    assert got.gene_counts == ref.gene_counts
    np.testing.assert_allclose(got.cell_scale, ref.cell_scale, rtol=1e-6)
    np.testing.assert_allclose(got.gene_scale, ref.gene_scale, rtol=1e-5)
    rows = got.X.to_memory()
    assert rows.has_canonical_format and rows.nnz == ref.X.nnz
    np.testing.assert_allclose(rows.toarray(), ref.X.toarray(), rtol=1e-5)
    # a file found non-canonical is checked on every later read: the repeats are summed again
    matrix = open_h5ad(path).matrix()
    for start in range(0, matrix.shape[0], 64):
        matrix.block(start, min(start + 64, matrix.shape[0]))
    again = matrix.block(0, matrix.shape[0])
    assert again.nnz == x.nnz
    np.testing.assert_allclose(again.toarray(), x.toarray(), rtol=1e-6)


def test_a_canonical_file_is_checked_once_then_trusted(tmp_path):
    """After one pass in order over a canonical file, blocks come flagged canonical without
    the O(nnz) check; a pass that skips rows proves nothing."""
    adata = _sim(seed=5)
    path = tmp_path / "canonical.h5ad"
    adata.write_h5ad(path)
    matrix = open_h5ad(path).matrix()
    n = matrix.shape[0]
    matrix.block(0, 50), matrix.block(100, n)  # rows 50-99 never seen
    assert matrix._canonical_upto == 50
    for start in range(0, n, 64):
        matrix.block(start, min(start + 64, n))
    assert matrix._canonical_upto == n
    block = matrix.block(10, 90)
    assert block._has_canonical_format  # set, not computed
    np.testing.assert_array_equal(block.toarray(), adata.X[10:90].toarray())


def test_dense_matrix_on_disk_is_streamed_and_csc_refused(tmp_path):
    adata = _sim(seed=2)
    ref = prepare(adata, data("condition", "control", normalize="total"), use_case=True)
    dense = adata.copy()
    dense.X = adata.X.toarray()
    dense.write_h5ad(tmp_path / "dense.h5ad")
    got = prepare(open_h5ad(tmp_path / "dense.h5ad"), data("condition", "control", normalize="total"), use_case=True,
                  pass_cells=50)
    np.testing.assert_allclose(got.X.to_memory().toarray(), ref.X.toarray(), rtol=2e-6)

    csc = adata.copy()
    csc.X = sp.csc_matrix(adata.X)
    csc.write_h5ad(tmp_path / "csc.h5ad")
    with pytest.raises(InputError, match=r"CSC.*data.backed=false.*csr_matrix\(adata.X\)"):
        prepare(open_h5ad(tmp_path / "csc.h5ad"), data("condition", "control"), use_case=True)
    # a CSC layer: the fix names the layer (converting .X would leave the layer as it was)
    csc = adata.copy()
    csc.layers["counts"] = sp.csc_matrix(adata.layers["counts"])
    csc.write_h5ad(tmp_path / "csc_layer.h5ad")
    message = _message(prepare, open_h5ad(tmp_path / "csc_layer.h5ad"), data("condition", "control", layer="counts"),
                       use_case=True)
    assert "layers/counts" in message and "CSC" in message and "data.backed=false" in message
    assert "adata.layers['counts'] = scipy.sparse.csr_matrix(adata.layers['counts'])" in message
    assert "adata.X" not in message


def test_dense_matrix_on_disk_is_read_in_bounded_pieces(tmp_path, monkeypatch):
    """A dense matrix on disk is densified as it is read: every read of it holds at most
    SCAN_VALUES values, in the preparation passes, the norm fit_error takes and a read of
    many consecutive cells (a fixed 65,536 rows would be 8 GB at 30,000 genes)."""
    import deltanmf.core.matrix as matrix_module
    from deltanmf.core import CellMatrix

    adata = _sim(seed=2)
    ref = prepare(adata, data("condition", "control", normalize="total"), use_case=True)
    dense = adata.copy()
    dense.X = adata.X.toarray()
    dense.write_h5ad(tmp_path / "dense.h5ad")
    monkeypatch.setattr(matrix_module, "SCAN_VALUES", 40 * adata.n_vars)  # 40 file rows per read
    file_reads = []  # rows of each read of the dense X from the file
    getitem = h5py.Dataset.__getitem__

    def spy(dataset, key):
        out = getitem(dataset, key)
        if dataset.name == "/X":
            file_reads.append(out.shape[0])
        return out

    monkeypatch.setattr(h5py.Dataset, "__getitem__", spy)
    got = prepare(open_h5ad(tmp_path / "dense.h5ad"), data("condition", "control", normalize="total"), use_case=True)
    assert file_reads and max(file_reads) <= 40, file_reads

    source_reads = []
    read_rows = got.X.read_rows
    got.X.read_rows = lambda index: source_reads.append(len(index)) or read_rows(index)
    streamed = CellMatrix(got.X, batch_size=1000)
    expected = float(np.sum(ref.X.data.astype(np.float64) ** 2))
    assert streamed.squared_norm() == pytest.approx(expected, rel=1e-6)
    assert max(source_reads) <= 40, source_reads  # sized by the file's width, not the kept genes
    # all cells in one call (as the initialisation reads them): still 40 rows per file read
    file_reads.clear()
    np.testing.assert_allclose(got.X.to_memory().toarray(), ref.X.toarray(), rtol=2e-6)
    assert len(file_reads) >= adata.n_obs // 40 and max(file_reads) <= 40


def test_scattered_rows_on_disk_are_read_in_bounded_pieces(tmp_path, monkeypatch):
    """Nearby rows share a read, but a read never spans more than SCAN_VALUES stored values,
    even when a random subset (the initialisation's max_cells) has small gaps everywhere."""
    import deltanmf.core.matrix as matrix_module

    adata = _sim(seed=3)
    adata.write_h5ad(tmp_path / "cells.h5ad")
    matrix = open_h5ad(tmp_path / "cells.h5ad").matrix()
    budget = 2000
    monkeypatch.setattr(matrix_module, "SCAN_VALUES", budget)
    spans = []
    block = type(matrix).block

    def spy(self, start, stop):
        spans.append(int(self.indptr[stop] - self.indptr[start]))
        return block(self, start, stop)

    monkeypatch.setattr(type(matrix), "block", spy)
    rows = np.sort(np.random.default_rng(0).choice(adata.n_obs, adata.n_obs // 3, replace=False))
    got = matrix.rows(rows)
    np.testing.assert_array_equal(got.toarray(), adata.X[rows].toarray())
    per_row = np.diff(matrix.indptr)
    assert len(spans) > 1 and max(spans) <= max(budget, per_row.max()), spans


def _message(fn, *args, **kwargs) -> str:
    with pytest.raises(InputError) as err:
        fn(*args, **kwargs)
    return str(err.value)


@pytest.mark.smoke
@pytest.mark.parametrize("bad", ["nan", "negative", "empty_cell", "layer", "condition"])
def test_errors_are_those_of_prepare(tmp_path, bad):
    adata = _sim(seed=4, shuffle=True)
    x = adata.X.tolil()
    args = dict(condition_key="condition", control="control")
    if bad == "nan":
        x[7, 3], x[2, 10], x[400, 0] = np.nan, np.inf, np.nan
    elif bad == "negative":
        x[100, 5], x[30, 6] = -1.0, -2.0
    elif bad == "empty_cell":
        x[11, :] = 0
    elif bad == "layer":
        args["layer"] = "spliced"
    else:
        args["control"] = "NTC"
    adata.X = sp.csr_matrix(x)
    adata.write_h5ad(tmp_path / "bad.h5ad")
    settings = data(**args)
    assert _message(prepare, open_h5ad(tmp_path / "bad.h5ad"), settings, use_case=True, pass_cells=64) \
        == _message(prepare, adata, settings, use_case=True)


def test_backed_needs_a_batch_size_and_an_existing_file(tmp_path, sim_file, monkeypatch):
    _, path = sim_file
    with pytest.raises(InputError, match="data.batch_size"):
        default_settings("logger=none", "data=h5ad", f"data.path={path}", "data.backed=true", "data.batch_size=null")
    with pytest.raises(InputError, match="file not found"):
        open_h5ad(tmp_path / "missing.h5ad")
    monkeypatch.chdir(tmp_path)  # a relative path: the message says where it was looked for
    for reader in (open_h5ad, read_h5ad):
        with pytest.raises(InputError, match=f"file not found: missing.h5ad \\(looked for {tmp_path}/missing.h5ad\\)"):
            reader("missing.h5ad")
    (tmp_path / "junk.h5ad").write_text("not hdf5")
    with pytest.raises(InputError, match="cannot read"):
        open_h5ad(tmp_path / "junk.h5ad")
    settings = default_settings("logger=none", "data=h5ad", f"data.path={path}", "data.backed=true",
                                "data.batch_size=64")
    opened = load_input(settings.data)
    assert opened.n_obs == 500 and list(opened.layers) == ["counts"]


def test_block_batches_cover_each_cell_once_from_few_runs(sim_file):
    _, path = sim_file
    rows = prepare(open_h5ad(path), data("condition", "control"), use_case=True).X
    rng = np.random.default_rng(0)
    epochs = [rows.batch_indices(64, rng, blocks_per_batch=4) for _ in range(3)]
    for batches in epochs:
        assert len(batches) == -(-rows.shape[0] // 64)
        flat = np.concatenate(batches)
        np.testing.assert_array_equal(np.sort(flat), np.arange(rows.shape[0]))
        for b in batches:
            assert np.all(np.diff(b) > 0) and len(b) <= 64
            # runs of consecutive cells: at most blocks_per_batch + 1 (a run cut at the batch's edge)
            assert np.count_nonzero(np.diff(b) > 1) + 1 <= 5
    assert not all(np.array_equal(a, b) for a, b in zip(epochs[0], epochs[1]))
    # batches are spread over the whole file, not taken in order
    firsts = [b[0] for b in epochs[0]]
    assert not np.all(np.diff(firsts) > 0)


def test_datamodule_serves_block_batches_from_disk(sim_file):
    adata, path = sim_file
    prepared = prepare(open_h5ad(path), data("condition", "control", normalize="total"), use_case=True)
    control = prepared.control
    reference = prepare(adata, data("condition", "control", normalize="total"), use_case=True).control.toarray()
    dm = datamodule(control, batch_size=40, seed=0)
    seen = []
    for block, index in dm.train_dataloader():
        x = block.to_dense() if block.layout != torch.strided else block
        np.testing.assert_allclose(x.numpy(), reference[index.numpy()], rtol=2e-6)
        seen.append(index.numpy())
    np.testing.assert_array_equal(np.sort(np.concatenate(seen)), np.arange(control.shape[0]))
    assert len(seen) == len(dm.train_dataloader())


@pytest.mark.parametrize("stage", ["onestage", pytest.param("twostage", marks=pytest.mark.slow)])
def test_backed_fit_matches_in_memory_fit(make_cfg, stage):
    """Same data, seed and batch size: streamed and in-memory fits recover the planted
    programs equally well and reach the same error (batch order differs, so not bit-equal)."""
    fits = {}
    for backed in (False, True):
        cfg, run_dir = make_cfg(f"stage={stage}", "data.batch_size=128", f"data.backed={str(backed).lower()}",
                                "logger=none", "model.consensus.replicates=2", "model.consensus.iterations=40")
        shutil.rmtree(run_dir, ignore_errors=True)
        fits[backed] = run(cfg, run_dir)
        result = ad.read_h5ad(run_dir / "results" / "results.h5ad")
        assert result.n_obs == (500 if stage == "twostage" else 250)
        assert np.isfinite(result.obsm["X_deltanmf"]).all()
    memory, streamed = (fits[b].metrics for b in (False, True))
    assert streamed["recovery"]["baseline_min"] > 0.95
    assert streamed["recovery"]["baseline_min"] > memory["recovery"]["baseline_min"] - 0.01
    last = "stage2" if stage == "twostage" else "stage1"
    assert streamed[last]["relative_error"] == pytest.approx(memory[last]["relative_error"], rel=0.01)
    np.testing.assert_allclose(np.sort(np.asarray(fits[True].results.var["deltanmf_gene_scale"])),
                               np.sort(np.asarray(fits[False].results.var["deltanmf_gene_scale"])), rtol=1e-6)
    if stage == "twostage":
        assert streamed["recovery"]["case_min"] > memory["recovery"]["case_min"] - 0.02
        assert streamed["recovery"]["shifts_called_correctly"] == memory["recovery"]["shifts_called_correctly"]


def _make_large():
    spec = importlib.util.spec_from_file_location("make_large", ROOT / "benchmarks" / "make_large.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generator_writes_a_readable_file_with_the_planted_model(tmp_path):
    path = tmp_path / "large.h5ad"
    summary = _make_large().write_large(path, n_control=3000, n_case=1000, n_genes=800, n_programs=6,
                                        n_case_programs=2, density=0.1, markers_per_program=40, chunk=700,
                                        seed=5, verbose=False)
    adata = ad.read_h5ad(path)
    assert adata.shape == (4000, 800) and sp.issparse(adata.X) and adata.X.dtype == np.float32
    assert adata.X.nnz == summary["nonzeros"]
    assert (adata.obs["condition"] == "control").sum() == 3000
    # controls and cases are interleaved, as in a real screen
    assert set(adata.obs["condition"][:400]) == {"control", "case"}
    assert abs(adata.X.nnz / (4000 * 800) - 0.1) < 0.01
    truth = simulation_truth(adata)
    assert truth.programs.shape == (800, 6) and truth.usage.shape == (4000, 8)
    np.testing.assert_allclose(truth.usage.sum(axis=1), 1.0, atol=1e-5)
    assert np.all(truth.usage[(adata.obs["condition"] == "control").to_numpy(), 6:] == 0)
    # counts follow the planted model: E[x] = library * usage @ programs^T, per gene
    expected = (adata.obs["library_size"].to_numpy()[:, None] * truth.usage) @ np.hstack(
        [truth.programs, truth.case_programs]).T
    observed = np.asarray(adata.X.sum(axis=0)).ravel()
    big = expected.sum(axis=0) > 200  # genes with enough counts for a tight check
    np.testing.assert_allclose(observed[big], expected.sum(axis=0)[big], rtol=0.2)
    assert np.corrcoef(observed, expected.sum(axis=0))[0, 1] > 0.99
    # the same file streamed reads the same rows
    with h5py.File(path) as f:
        assert f["X"].attrs["encoding-type"] == "csr_matrix"
    rows = prepare(open_h5ad(path), data("condition", "control", normalize="none", scale_genes=False, min_cells=0),
                   use_case=False).X
    np.testing.assert_array_equal(rows.to_memory().toarray(), adata.X[(adata.obs["condition"] == "control")
                                                                      .to_numpy()].toarray())


def test_initialisation_reads_its_cells_into_memory_once(sim_file):
    """The consensus makes tens of passes over its cells: from a file they are read once (all of
    them when there are at most max_cells), not on every pass; max_cells=None keeps streaming."""
    from deltanmf.core import CellMatrix, consensus_init
    from deltanmf.core.consensus import init_cells

    adata, path = sim_file
    ref = prepare(adata, data("condition", "control", normalize="total", scale_genes=True), use_case=True)
    file = open_h5ad(path)
    rows = H5adRows(file.matrix(), adata.obs_names.get_indexer(ref.obs.index),
                    adata.var_names.get_indexer(ref.var.index), ref.cell_scale, ref.gene_scale)
    reads = []
    read_rows = rows.read_rows
    rows.read_rows = lambda index: reads.append(len(index)) or read_rows(index)
    streamed = CellMatrix(rows, batch_size=64)
    cells = init_cells(streamed, max_cells=10_000, seed=0)
    assert sp.issparse(cells.data) and cells.batch_size == 64 and reads == [streamed.n_cells]
    np.testing.assert_array_equal(cells.data.toarray(), ref.X.toarray())
    reads.clear()
    consensus_init(streamed, 3, consensus(replicates=2, iterations=5, max_cells=10_000), seed=0)
    # one read of all cells for the fits, then one pass by batches for the final usage
    assert sum(reads) == 2 * streamed.n_cells, reads
    some = init_cells(streamed, max_cells=50, seed=0)
    assert sp.issparse(some.data) and some.n_cells == 50
    assert init_cells(streamed, max_cells=None, seed=0) is streamed  # no bound on memory: keep streaming
    in_memory = CellMatrix(ref.X, batch_size=64)
    assert init_cells(in_memory, max_cells=10_000, seed=0) is in_memory  # nothing to read
