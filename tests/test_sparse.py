"""Sparse input stays sparse end to end, and gives the same answers as dense input.

References are the dense computations in float64 (the loss and its gradients), the
dense code path on the same data (consensus, NNLS, fit error, residual, whole fits),
and the planted programs of a simulation (the subsampled initialisation).
"""
from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from helpers import DEFAULTS, consensus, datamodule, model, module_args, plan
from helpers import data as data_settings

from deltanmf.core import CellMatrix, GeneGraph, consensus_init, matched_cosine, refit_usage, stage2_init
from deltanmf.core.consensus import multiplicative_nmf, sample_cells
from deltanmf.core.losses import fit_error, reconstruction_loss, squared_error
from deltanmf.core.matrix import (_scipy_view, _t_matmul_torch, csr_from_parts, csr_tensor, reconstruction_at_nonzeros,
                                  row_block, t_matmul)
from deltanmf.core.nnls import nnls_usage
from deltanmf.core.stage2 import ResidualMatrix, sparse_residual
from deltanmf.data import prepare, simulate_case_control, simulation_truth
from deltanmf.errors import InputError
from deltanmf.tl.fit import fit_stage1
from deltanmf.train import Stage1Module, Stage2Module

NNLS_ITER = DEFAULTS.model.consensus.nnls_iterations
STAGE2 = DEFAULTS.model.stage2
# conftest's SMALL configuration, which these fits used to run under
SMALL_CONSENSUS = {"replicates": 3, "iterations": 100}
SMALL_TRAINER = {"max_steps": 400}


def _fit_stage1(x, run_dir, *, k=4, seed=0, consensus_changes=None, **plan_changes):
    """fit_stage1 at conftest's SMALL settings (``K=4``, CPU, no logger) with ``consensus_changes``."""
    settings = model(consensus={**SMALL_CONSENSUS, **(consensus_changes or {})})
    return fit_stage1(x, k, settings, plan(run_dir, trainer=SMALL_TRAINER, **plan_changes), seed=seed)


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _sparse_data(n_cells=30, n_genes=20, density=0.2, seed=0, dtype=np.float64) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.gamma(2.0, 1.0, (n_cells, n_genes)) * (rng.random((n_cells, n_genes)) < density)
    x[3] = 0.0  # an empty cell
    return x.astype(dtype)


def _layout(x: np.ndarray, layout: str, dtype=torch.float64) -> torch.Tensor:
    if layout == "csr":
        return csr_tensor(sp.csr_matrix(x), dtype)
    return torch.tensor(x, dtype=dtype).to_sparse_coo()


class RowSource:
    """The row-source duck type: ``.shape`` and ``read_rows(sorted int64 index) -> csr``; records reads."""

    def __init__(self, x):
        self.x = sp.csr_matrix(x, dtype=np.float32)
        self.shape = self.x.shape
        self.reads = []

    def read_rows(self, index):
        assert index.dtype == np.int64 and np.all(np.diff(index) > 0), "rows must be asked for sorted"
        self.reads.append(len(index))
        return self.x[index]


# --------------------------------------------------------------------------------------
# the loss
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["csr", "coo"])
def test_sparse_loss_and_gradients_equal_dense(layout):
    x = _sparse_data()
    rng = np.random.default_rng(1)
    w0, u0 = rng.random((20, 4)), rng.random((30, 4))
    results = {}
    for kind in ("dense", "sparse"):
        xt = torch.tensor(x) if kind == "dense" else _layout(x, layout)
        w = torch.tensor(w0, requires_grad=True)
        u = torch.tensor(u0, requires_grad=True)
        sse = squared_error(xt, w, u)
        mse = reconstruction_loss(xt, w, u)
        (sse + 3 * mse).backward()
        results[kind] = (sse.detach(), mse.detach(), w.grad, u.grad)
    ref = np.sum((x - u0 @ w0.T) ** 2)
    assert results["sparse"][0].item() == pytest.approx(ref, rel=1e-12)
    assert results["sparse"][1].item() == pytest.approx(ref / x.size, rel=1e-12)
    for dense, sparse in zip(results["dense"], results["sparse"]):
        torch.testing.assert_close(sparse, dense, rtol=1e-10, atol=1e-12)
    # the gradient in closed form: d/dW = -2 (X - U W^T)^T U (times 1 + 3 / size)
    factor = 1 + 3 / x.size
    np.testing.assert_allclose(results["sparse"][2].numpy(), -2 * factor * (x - u0 @ w0.T).T @ u0, rtol=1e-10)


def test_sparse_loss_float32_matches_float64_reference():
    x = _sparse_data(n_cells=200, n_genes=50, density=0.1, seed=2)
    rng = np.random.default_rng(3)
    w0, u0 = rng.random((50, 5)), rng.random((200, 5)) * 0.3
    w = torch.tensor(w0, dtype=torch.float32, requires_grad=True)
    u = torch.tensor(u0, dtype=torch.float32, requires_grad=True)
    loss = reconstruction_loss(csr_tensor(sp.csr_matrix(x)), w, u)
    loss.backward()
    assert loss.dtype == torch.float32
    resid = x - u0 @ w0.T
    assert loss.item() == pytest.approx(np.mean(resid**2), rel=1e-5)
    np.testing.assert_allclose(u.grad.numpy(), -2 * resid @ w0 / x.size, rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("noise, rel", [(0.5, 1e-6), (0.05, 1e-4), (0.005, 1e-2)])
def test_sparse_loss_float32_stays_accurate_when_the_fit_is_good(noise, rel):
    """The three terms of the sparse expansion nearly cancel for a good fit (relative error
    ~noise): reduced in float32 over 10^6 values they put the loss off by more than the
    stopping tolerance, and below zero for the best fit. Reduced in float64, what is left is
    the float32 rounding of the product X W itself (1e-8 to 1e-6 of ||X||^2)."""
    rng = np.random.default_rng(0)
    n, g, k = 8000, 200, 5
    w0 = rng.gamma(0.3, 1.0, (g, k)) * (rng.random((g, k)) < 0.4)
    u0 = rng.gamma(1.0, 1.0, (n, k))
    m = u0 @ w0.T
    x = (np.maximum(m * (1 + noise * rng.standard_normal(m.shape)), 0) * (m > 0)).astype(np.float32)
    w = torch.tensor(w0, dtype=torch.float32)
    u = torch.tensor(u0, dtype=torch.float32)
    exact = float(np.sum((x.astype(np.float64) - w.double().numpy().dot(u.double().numpy().T).T) ** 2))
    got = float(squared_error(csr_tensor(sp.csr_matrix(x)), w, u))
    assert got > 0 and got == pytest.approx(exact, rel=rel)


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_sparse_transposed_product_paths_agree(index_dtype):
    x = _sparse_data(seed=4)
    g = torch.tensor(np.random.default_rng(5).random((30, 3)))
    csr = csr_tensor(sp.csr_matrix(x), torch.float64)
    xt = csr_from_parts(csr.crow_indices().to(index_dtype), csr.col_indices().to(index_dtype), csr.values(), csr.shape)
    ref = x.T @ g.numpy()
    np.testing.assert_allclose(t_matmul(xt, g).numpy(), ref, rtol=1e-12)  # scipy kernel (CPU)
    np.testing.assert_allclose(_t_matmul_torch(xt, g).numpy(), ref, rtol=1e-12)  # torch's (other devices)
    # scipy reads the tensor's own arrays: int64 indices are not narrowed (a copy per call)
    view = _scipy_view(xt, transposed=True)
    assert view.shape == (x.shape[1], x.shape[0])
    for mine, theirs in ((view.indices, xt.col_indices()), (view.indptr, xt.crow_indices()), (view.data, xt.values())):
        assert np.shares_memory(mine, theirs.numpy())


def _module_pair(cls, x, index, **kwargs):
    out = {}
    for kind in ("dense", "sparse"):
        torch.manual_seed(0)
        module = cls(**kwargs)
        block = torch.tensor(x[index], dtype=torch.float32)
        if kind == "sparse":
            block = csr_tensor(sp.csr_matrix(x[index]))
        terms = module.loss_terms(block, torch.as_tensor(index))
        terms.total.backward()
        grads = {n: (p.grad.to_dense() if p.grad.is_sparse else p.grad) for n, p in module.named_parameters()}
        out[kind] = (dict(terms.items()), grads)
    return out


def _assert_pair_equal(out):
    (dense_terms, dense_grads), (sparse_terms, sparse_grads) = out["dense"], out["sparse"]
    assert dense_terms.keys() == sparse_terms.keys()
    for name in dense_terms:
        torch.testing.assert_close(sparse_terms[name], dense_terms[name], rtol=2e-5, atol=1e-9)
    for name in dense_grads:
        assert torch.count_nonzero(dense_grads[name]) > 0
        torch.testing.assert_close(sparse_grads[name], dense_grads[name], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("minibatch", [False, True])
def test_stage1_loss_terms_sparse_equal_dense(minibatch):
    x = _sparse_data(n_cells=40, n_genes=25, seed=6, dtype=np.float32)
    rng = np.random.default_rng(7)
    index = np.arange(40) if not minibatch else np.sort(rng.choice(40, 13, replace=False))
    graph = GeneGraph(torch.tensor(np.abs(np.random.default_rng(8).random((25, 25))) * (1 - np.eye(25)),
                                   dtype=torch.float32))
    out = _module_pair(Stage1Module, x, index, programs=torch.rand(25, 3), usage=torch.rand(40, 3),
                       **module_args(graph=graph, rel_alpha=0.5, minibatch=minibatch))
    _assert_pair_equal(out)


def test_stage2_loss_terms_sparse_equal_dense():
    x = _sparse_data(n_cells=40, n_genes=25, seed=9, dtype=np.float32)
    index = np.arange(5, 35)
    out = _module_pair(Stage2Module, x, index, baseline=torch.rand(25, 3), case_programs=torch.rand(25, 2),
                       usage=torch.rand(40, 5),
                       **module_args(rel_alpha=STAGE2.rel_alpha, laplacian_steps=STAGE2.laplacian_steps,
                                     rel_gamma=0.5, minibatch=True))
    _assert_pair_equal(out)
    assert "ortho" in out["sparse"][0]


# --------------------------------------------------------------------------------------
# CellMatrix and the CellDataModule keep sparse data sparse
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["scipy", "rows"])
@pytest.mark.parametrize("batch_size", [None, 7])
def test_cell_matrix_serves_sparse_blocks(kind, batch_size):
    x = _sparse_data(dtype=np.float32)
    data = sp.csr_matrix(x) if kind == "scipy" else RowSource(x)
    m = CellMatrix(data, batch_size=batch_size)
    assert m.sparse and (m.n_cells, m.n_genes) == x.shape
    seen = []
    for index, block in m.batches():
        assert block.layout == torch.sparse_csr and block.dtype == torch.float32
        np.testing.assert_array_equal(block.to_dense().numpy(), x[index])
        seen.append(index)
    np.testing.assert_array_equal(np.sort(np.concatenate(seen)), np.arange(30))
    full = m.full()
    assert full.layout == torch.sparse_csr and m.full() is full
    np.testing.assert_array_equal(full.to_dense().numpy(), x)
    idx = np.array([4, 0, 17, 4])  # any order, repeats allowed
    np.testing.assert_array_equal(m.rows(idx).to_dense().numpy(), x[idx])
    assert m.squared_norm() == pytest.approx(float(np.sum(x.astype(np.float64) ** 2)), rel=1e-12)
    sub = m.subset(np.array([2, 5, 29]))
    assert sub.sparse and sub.n_cells == 3
    np.testing.assert_array_equal(sub.full().to_dense().numpy(), x[[2, 5, 29]])


def test_full_sparse_matrix_shares_the_input_memory():
    csr = sp.random(500, 80, density=0.05, format="csr", dtype=np.float32, random_state=0)
    full = CellMatrix(csr).full()
    assert full.values().data_ptr() == csr.data.ctypes.data  # no copy of the non-zeros on the CPU
    assert full.col_indices().data_ptr() == csr.indices.ctypes.data


@pytest.mark.parametrize("kind", ["dense", "scipy", "rows"])
@pytest.mark.parametrize("gpu", [False, True])
def test_datamodule_pins_minibatches_for_a_gpu(kind, gpu, monkeypatch):
    """With a GPU, minibatches (sparse ones too) come from pinned memory; the full batch,
    moved once, is not pinned; without a GPU nothing is."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    x = _sparse_data(dtype=np.float32)
    data = {"dense": x, "scipy": sp.csr_matrix(x), "rows": RowSource(x)}[kind]
    minibatch = datamodule(data, batch_size=8, seed=2)
    assert minibatch.pin_memory is gpu
    assert minibatch._minibatch_loader().pin_memory is gpu
    assert datamodule(data, batch_size=None).pin_memory is False


@pytest.mark.parametrize("kind", ["scipy", "rows"])
@pytest.mark.parametrize("batch_size", [None, 8])
def test_datamodule_serves_sparse_csr(kind, batch_size):
    x = _sparse_data(dtype=np.float32)
    data = sp.csr_matrix(x) if kind == "scipy" else RowSource(x)
    dm = datamodule(data, batch_size=batch_size, seed=2, steps_per_epoch=3)
    batches = list(dm.train_dataloader())
    assert len(batches) == (3 if batch_size is None else 4)
    for block, index in batches:
        assert block.layout == torch.sparse_csr and block.dtype == torch.float32
        np.testing.assert_array_equal(block.to_dense().numpy(), x[index.numpy()])
    if batch_size is None:
        moved = [dm.transfer_batch_to_device(b, torch.device("cpu"), 0) for b in batches]
        assert all(m is moved[0] for m in moved)  # the full batch moves once
    else:
        np.testing.assert_array_equal(np.sort(np.concatenate([i.numpy() for _, i in batches])), np.arange(30))
    if kind == "rows" and batch_size is not None:
        assert data.reads == [8, 8, 8, 6]  # rows read per batch, never all of them


# --------------------------------------------------------------------------------------
# consumers: NNLS, fit error, multiplicative updates, residual, consensus, whole fits
# --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def planted():
    adata = simulate_case_control(n_genes=200, n_programs=4, n_case_programs=2, n_control=400, n_case=200,
                                  markers_per_program=25, seed=5)
    prepared = prepare(adata, data_settings("condition", "control"), use_case=True)
    return prepared, simulation_truth(prepared.source)


def _recovery(programs, prepared, truth):
    return matched_cosine(np.asarray(programs) * prepared.gene_scale[:, None], truth.programs)


def test_nnls_and_fit_error_sparse_equal_dense():
    x = _sparse_data(n_cells=60, n_genes=30, seed=10)
    w = np.random.default_rng(11).random((30, 4))
    dense = nnls_usage(torch.tensor(x), torch.tensor(w), max_iter=500, tol=1e-12)
    sparse = nnls_usage(csr_tensor(sp.csr_matrix(x), torch.float64), torch.tensor(w), max_iter=500, tol=1e-12)
    torch.testing.assert_close(sparse, dense, rtol=1e-9, atol=1e-12)
    u = dense.numpy()
    for batch_size in (None, 7):
        ref = fit_error(CellMatrix(x, batch_size=batch_size, dtype=torch.float64), w, u)
        out = fit_error(CellMatrix(sp.csr_matrix(x), batch_size=batch_size, dtype=torch.float64), w, u)
        assert out["relative_error"] == pytest.approx(ref["relative_error"], rel=1e-10)
        assert out["recon"] == pytest.approx(np.mean((x - u @ w.T) ** 2), rel=1e-10)


def test_reconstruction_at_nonzeros_in_small_chunks():
    x = _sparse_data(n_cells=25, n_genes=15, seed=12)
    rng = np.random.default_rng(13)
    w, u = torch.tensor(rng.random((15, 3))), torch.tensor(rng.random((25, 3)))
    block = csr_tensor(sp.csr_matrix(x), torch.float64)
    got = torch.empty_like(block.values())
    parts = 0
    for part, recon in reconstruction_at_nonzeros(block, w, u, chunk_nnz=7):
        got[part] = recon
        parts += 1
    rows, cols = sp.csr_matrix(x).nonzero()
    np.testing.assert_allclose(got.numpy(), (u.numpy() @ w.numpy().T)[rows, cols], rtol=1e-12)
    assert parts > 1


def test_multiplicative_updates_and_consensus_sparse_equal_dense(planted):
    prepared, truth = planted
    x = prepared.control
    for batch_size in (None, 128):
        dense = multiplicative_nmf(CellMatrix(x.toarray(), batch_size=batch_size, dtype=torch.float64), 4, 20, 0)
        sparse = multiplicative_nmf(CellMatrix(x, batch_size=batch_size, dtype=torch.float64), 4, 20, 0)
        torch.testing.assert_close(sparse, dense, rtol=1e-8, atol=1e-12)
    settings = consensus(replicates=3, iterations=60)
    dense = consensus_init(CellMatrix(x.toarray()), 4, settings, seed=1)
    sparse = consensus_init(CellMatrix(x), 4, settings, seed=1)
    # float32: the sparse and dense products sum in different orders (loadings up to ~4)
    np.testing.assert_allclose(sparse.programs.numpy(), dense.programs.numpy(), rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(sparse.usage.numpy(), dense.usage.numpy(), rtol=1e-3, atol=1e-5)
    assert _recovery(sparse.programs, prepared, truth).min() >= 0.95


def test_residual_is_sparse_with_the_pattern_of_x():
    x = _sparse_data(n_cells=30, n_genes=20, seed=14)
    rng = np.random.default_rng(15)
    w, u = rng.random((20, 3)) * 0.3, rng.random((30, 3))
    ref = np.maximum(x - u @ w.T, 0)
    res = sparse_residual(csr_tensor(sp.csr_matrix(x), torch.float64), torch.tensor(w), torch.tensor(u))
    assert res.layout == torch.sparse_csr
    np.testing.assert_allclose(res.to_dense().numpy(), ref, rtol=1e-12, atol=1e-15)
    assert ref[x == 0].max() == 0  # why it may stay sparse: U W^T >= 0


def test_dense_residual_full_batch_is_served_in_bounded_blocks():
    x = _sparse_data(n_cells=50, n_genes=20, density=0.6, seed=16)
    rng = np.random.default_rng(17)
    w, u = torch.tensor(rng.random((20, 3)) * 0.2), torch.tensor(rng.random((50, 3)))
    blocked = ResidualMatrix(CellMatrix(x, dtype=torch.float64), w, u, block_cells=8)
    sizes = [len(i) for i, _ in blocked.batches()]
    assert max(sizes) <= 8 and sum(sizes) == 50
    whole = ResidualMatrix(CellMatrix(x, dtype=torch.float64), w, u, block_cells=1000)
    as_sparse = ResidualMatrix(CellMatrix(sp.csr_matrix(x), dtype=torch.float64), w, u)
    ref = multiplicative_nmf(whole, 2, 30, 0)
    # full-batch updates summed over blocks are the full-batch updates
    torch.testing.assert_close(multiplicative_nmf(blocked, 2, 30, 0), ref, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(multiplicative_nmf(as_sparse, 2, 30, 0), ref, rtol=1e-9, atol=1e-12)
    assert as_sparse.squared_norm() == pytest.approx(whole.squared_norm(), rel=1e-12)


def test_stage2_init_sparse_equals_dense(planted):
    prepared, truth = planted
    x = prepared.case
    baseline = torch.tensor(truth.programs / prepared.gene_scale[:, None], dtype=torch.float32)
    init = dict(consensus=consensus(replicates=2, iterations=40), refine_rounds=STAGE2.refine_rounds,
                refine_tol=STAGE2.refine_tol, seed=0)
    dense = stage2_init(CellMatrix(x.toarray()), baseline, 2, **init)
    sparse = stage2_init(CellMatrix(x), baseline, 2, **init)
    for d, s in zip(dense, sparse):
        # float32 and tens of NNLS rounds: agreement to ~1e-6 of the largest entry (usage reaches ~4e3)
        np.testing.assert_allclose(s.numpy(), d.numpy(), rtol=1e-3, atol=1e-6 * float(d.abs().max()))
    assert sparse[1].shape == (x.shape[0], 4 + 2) and (sparse[1] >= 0).all()


@pytest.mark.parametrize("batch_size", [None, 128])
def test_fit_stage1_sparse_equals_dense(tmp_path, planted, batch_size):
    prepared, truth = planted
    fits = {}
    for kind, x in (("dense", prepared.control.toarray()), ("sparse", prepared.control)):
        fits[kind] = _fit_stage1(x, tmp_path / kind, consensus_changes={"replicates": 2, "iterations": 60},
                                 batch_size=batch_size)
    d, s = fits["dense"], fits["sparse"]
    cos = matched_cosine(s.programs, d.programs)
    assert cos.min() >= 0.999, cos
    assert s.stats["relative_error"] == pytest.approx(d.stats["relative_error"], rel=1e-3)
    assert _recovery(s.programs, prepared, truth).min() >= 0.95


# --------------------------------------------------------------------------------------
# the initialisation on a subset of cells
# --------------------------------------------------------------------------------------
def test_sample_cells():
    assert sample_cells(100, None, 0) is None and sample_cells(100, 100, 0) is None
    a = sample_cells(100, 30, 4)
    assert len(a) == 30 and np.all(np.diff(a) > 0) and a.max() < 100
    np.testing.assert_array_equal(a, sample_cells(100, 30, 4))
    assert not np.array_equal(a, sample_cells(100, 30, 5))
    # the max_cells sample_cells is given comes from the settings, which refuse a bad one
    for bad in (0, -5, 2.5, "10", True):
        with pytest.raises(InputError, match=r"model\.consensus\.max_cells"):
            consensus(max_cells=bad)


@pytest.mark.parametrize("kind", ["dense", "scipy", "rows"])
def test_consensus_on_a_subset_recovers_planted_programs(planted, kind):
    prepared, truth = planted
    x = prepared.control
    data = {"dense": x.toarray(), "scipy": x, "rows": RowSource(x)}[kind]
    matrix = CellMatrix(data, batch_size=100)
    res = consensus_init(matrix, 4, consensus(replicates=3, iterations=60, max_cells=150), seed=0)
    assert _recovery(res.programs, prepared, truth).min() >= 0.95
    assert res.usage.shape == (x.shape[0], 4)  # usage of every cell, not only the subset
    torch.testing.assert_close(res.usage, refit_usage(matrix, res.programs, NNLS_ITER), rtol=1e-5, atol=1e-6)
    if kind == "rows":
        assert max(data.reads) <= 150  # never read whole


def test_stage2_init_on_a_subset_covers_every_cell(planted):
    prepared, truth = planted
    source = RowSource(prepared.case)
    baseline = torch.tensor(truth.programs / prepared.gene_scale[:, None], dtype=torch.float32)
    case, usage = stage2_init(CellMatrix(source), baseline, 2,
                              consensus=consensus(replicates=2, iterations=40, max_cells=80),
                              refine_rounds=STAGE2.refine_rounds, refine_tol=STAGE2.refine_tol, seed=0)
    assert source.reads[0] == 80  # the residual's consensus reads the subset only
    assert case.shape == (prepared.n_genes, 2) and (case >= 0).all()
    assert usage.shape == (prepared.case.shape[0], 4 + 2) and (usage >= 0).all()
    # the joint usage is the NNLS fit of every cell on [baseline, case]
    torch.testing.assert_close(usage, refit_usage(CellMatrix(prepared.case), torch.cat([baseline, case], 1), NNLS_ITER),
                               rtol=1e-4, atol=1e-6)


def test_fit_stage1_with_max_cells_recovers_and_covers_all_cells(tmp_path, planted):
    prepared, truth = planted
    fit = _fit_stage1(prepared.control, tmp_path, consensus_changes={"max_cells": 120}, max_cells=120)
    assert fit.usage.shape == (prepared.control.shape[0], 4)
    assert _recovery(fit.programs, prepared, truth).min() >= 0.95


# --------------------------------------------------------------------------------------
# the training hot loop reads nothing back from the device
# --------------------------------------------------------------------------------------
def test_training_step_hooks_never_read_a_tensor_on_the_host(monkeypatch):
    x = _sparse_data(n_cells=20, n_genes=12, seed=18, dtype=np.float32)
    graph = GeneGraph(torch.ones(12, 12) - torch.eye(12))
    module = Stage1Module(torch.rand(12, 2), torch.rand(20, 2), **module_args(graph=graph, rel_alpha=0.5,
                                                                             laplacian_steps=3))
    module.advance_phase()  # the prior switches on at the next step: the path with the most bookkeeping
    reads = []
    for name in ("item", "__int__", "__float__", "__bool__", "__index__", "tolist"):
        original = getattr(torch.Tensor, name)

        def spy(self, *args, _original=original, _name=name):
            reads.append(_name)
            return _original(self, *args)

        monkeypatch.setattr(torch.Tensor, name, spy)
    block, index = csr_tensor(sp.csr_matrix(x)), torch.arange(20)
    for _ in range(3):
        terms = module.loss_terms(block, index)
        terms.total.backward()
        module.on_train_batch_end(terms.total, (block, index), 0)
    monkeypatch.undo()
    assert reads == []
    assert module.prior_on and float(module.alpha) > 0


def test_prior_start_follows_a_loaded_state_dict():
    trained = Stage1Module(torch.rand(6, 2), torch.rand(5, 2), **module_args())
    trained.prior_start.fill_(42)
    fresh = Stage1Module(torch.rand(6, 2), torch.rand(5, 2), **module_args())
    assert not fresh.prior_on
    fresh.load_state_dict(trained.state_dict())
    assert fresh.prior_on and fresh._prior_start() == 42


def test_transpose_is_a_csr_copy_whose_products_equal_t_matmul():
    from deltanmf.core.matrix import matmul, transpose

    x = csr_tensor(sp.csr_matrix(_sparse_data(n_cells=40, n_genes=25, seed=21)), torch.float64)
    u = torch.rand(40, 3, dtype=torch.float64)
    xt = transpose(x)
    assert xt.layout == torch.sparse_csr and tuple(xt.shape) == (25, 40)
    torch.testing.assert_close(xt.to_dense(), x.to_dense().T)
    torch.testing.assert_close(matmul(xt, u), t_matmul(x, u), rtol=1e-12, atol=1e-12)
    # the route taken off the CPU gives the same matrix
    torch.testing.assert_close(x.t().to_sparse_csr().to_dense(), xt.to_dense())


# --------------------------------------------------------------------------------------
# a full batch reused every step: its squared norm and transposed copy are kept
# --------------------------------------------------------------------------------------
def test_a_reused_block_keeps_its_transposed_copy_and_norm_with_the_same_results():
    from deltanmf.core.matrix import holds_transposed_copy, reused

    x = sp.csr_matrix(_sparse_data(n_cells=40, n_genes=25, seed=22))
    g = torch.rand(40, 3, dtype=torch.float64)
    plain = csr_tensor(x, torch.float64)
    marked = reused(csr_tensor(x, torch.float64), transposed_copy=True)
    lean = reused(csr_tensor(x, torch.float64), transposed_copy=False)
    assert not holds_transposed_copy(marked)
    for block in (marked, lean):
        torch.testing.assert_close(t_matmul(block, g), t_matmul(plain, g), rtol=1e-12, atol=1e-12)
    assert holds_transposed_copy(marked) and not holds_transposed_copy(lean) and not holds_transposed_copy(plain)
    copy = getattr(marked, "_deltanmf_reused")["transposed"]
    t_matmul(marked, g)
    assert getattr(marked, "_deltanmf_reused")["transposed"] is copy  # built once
    assert reused(marked, transposed_copy=False) is marked and holds_transposed_copy(marked)  # keeps its mark
    # the loss and its gradients are those of the unmarked block, the norm computed once
    w = torch.rand(25, 3, dtype=torch.float64, requires_grad=True)
    u = torch.rand(40, 3, dtype=torch.float64, requires_grad=True)
    grads = []
    for block in (plain, marked, marked):
        w.grad = u.grad = None
        loss = squared_error(block, w, u)
        loss.backward()
        grads.append((loss.detach(), w.grad.clone(), u.grad.clone()))
    for other in grads[1:]:
        for a, b in zip(grads[0], other):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert "norm" in getattr(marked, "_deltanmf_reused") and not hasattr(plain, "_deltanmf_reused")


@pytest.mark.parametrize("keep", [True, False])
def test_transposed_copy_setting_reaches_the_consensus_and_the_training_batch(keep):
    from deltanmf.core.matrix import holds_transposed_copy

    x = sp.csr_matrix(_sparse_data(n_cells=60, n_genes=30, density=0.3, seed=23).astype(np.float32))
    matrix = CellMatrix(x, batch_size=None, transposed_copy=keep)
    programs = multiplicative_nmf(matrix, 3, 5, seed=0)
    assert holds_transposed_copy(matrix.full()) is keep
    lean = multiplicative_nmf(CellMatrix(x, batch_size=None, transposed_copy=not keep), 3, 5, seed=0)
    torch.testing.assert_close(programs, lean, rtol=1e-5, atol=1e-7)  # the same updates either way
    assert CellMatrix(x, batch_size=None, transposed_copy=keep).subset(np.arange(10)).transposed_copy is keep
    module = datamodule(x, batch_size=None, transposed_copy=keep)
    block, _ = next(iter(module.train_dataloader()))
    t_matmul(block, torch.rand(60, 3))
    assert holds_transposed_copy(block) is keep


def test_transposed_copies_policy_and_its_bad_values(make_cfg):
    from deltanmf.workflow.config import load_settings
    from deltanmf.workflow.run import training_plan

    def keeps_transposed_copy(cfg, run_dir, n_cells):  # as a run decides it, from the composed config
        return training_plan(load_settings(cfg), run_dir).keeps_transposed_copy(n_cells)

    cfg, run_dir = make_cfg("model.consensus.max_cells=100")
    assert keeps_transposed_copy(cfg, run_dir, 100) is True  # a small matrix: speed
    assert keeps_transposed_copy(cfg, run_dir, 101) is False  # a large one: memory
    for value, expected in (("true", True), ("false", False)):
        cfg, run_dir = make_cfg("model.consensus.max_cells=100", f"data.transposed_copy={value}")
        assert keeps_transposed_copy(cfg, run_dir, 10**6) is expected
    cfg, run_dir = make_cfg("model.consensus.max_cells=null")
    assert keeps_transposed_copy(cfg, run_dir, 10**6) is True
    for bad in ("yes", "1", "0.5"):  # refused with the usable values when the settings are loaded
        cfg, _ = make_cfg(f"data.transposed_copy={bad}")
        with pytest.raises(InputError, match=r"data\.transposed_copy=.* must be one of auto, true, false"):
            load_settings(cfg)


def _one_ulp_up(x: sp.csr_matrix, seed: int = 0) -> sp.csr_matrix:
    """``x`` with a random half of its stored float32 values moved up by one unit in the last place."""
    out = x.copy()
    half = np.random.default_rng(seed).random(out.data.shape) < 0.5
    out.data[half] = np.nextafter(out.data[half], np.float32(np.inf))
    return out


def test_fit_stage1_with_and_without_transposed_copies_agree(tmp_path, planted):
    """The transposed copy changes only how X^T U is summed (torch's CSR product on the copy,
    or scipy's CSC kernel on X's own arrays): the same fit up to float32 rounding.

    The programs are not compared entry by entry at rtol=1e-3: that asked for more than
    float32 gives. The two summation orders differ by rounding only (t_matmul's paths agree to
    ~1e-7, see test_transposed_copy_setting_reaches_the_consensus_and_the_training_batch), but
    the fit amplifies rounding: the consensus' multiplicative updates and NNLS, then Adam,
    whose normalised steps follow the sign of gradients that sit at rounding level in the
    loss's flat directions (NMF is not unique). Measured on this fit: with and without the copy
    the programs differ by 2.7e-4 (relative Frobenius norm; 54 of 796 entries outside
    rtol=1e-3, small loadings of ~2e-4 by up to 17%), and a one-ulp change of half of the
    input's values, without the copy, moves them by 2.8e-4 (68 entries outside rtol=1e-3). So
    the programs are compared with that noise floor, measured here by fitting the perturbed
    input; the loss, which those flat directions leave unchanged to first order, must agree
    closely (8e-8 measured), and training must stop at the same step."""
    prepared, truth = planted
    consensus_changes = {"replicates": 2, "iterations": 20}
    fits = {}
    for value in (True, False):
        fits[value] = _fit_stage1(prepared.control, tmp_path / str(value), transposed_copy=value,
                                  consensus_changes=consensus_changes)
    on, off = fits[True], fits[False]
    assert on.stats["steps"] == off.stats["steps"]
    assert on.stats["relative_error"] == pytest.approx(off.stats["relative_error"], rel=1e-5)
    # the noise floor: the same fit (no copy) of the input changed by float32 rounding alone
    nudged = _fit_stage1(_one_ulp_up(prepared.control), tmp_path / "nudged", transposed_copy=False,
                         consensus_changes=consensus_changes)

    def difference(a, b):
        a, b = a.programs.astype(np.float64), b.programs.astype(np.float64)
        return float(np.linalg.norm(a - b) / np.linalg.norm(b))

    floor = difference(nudged, off)
    assert 0 < floor < 1e-2  # a well-conditioned fit: rounding moves its programs very little ...
    assert difference(on, off) <= 3 * floor  # ... and the transposed copy no more than rounding does
    a, b = on.programs.astype(np.float64), off.programs.astype(np.float64)
    cosine = (a * b).sum(0) / (np.linalg.norm(a, axis=0) * np.linalg.norm(b, axis=0))
    assert cosine.min() > 1 - 1e-5  # the same programs, in the same order


@pytest.mark.parametrize("batch_size", [None, 25])
def test_multiplicative_updates_by_pieces_of_cells_equal_the_whole(monkeypatch, batch_size):
    import deltanmf.core.consensus as consensus_module

    x = sp.csr_matrix(_sparse_data(n_cells=60, n_genes=30, density=0.3, seed=24).astype(np.float32))
    whole = consensus_module.multiplicative_nmf_replicates(CellMatrix(x, batch_size=batch_size), 3, 8, [0, 1], 4)
    monkeypatch.setattr(consensus_module, "_UPDATE_CELLS", 7)  # pieces of 7 cells, the last one shorter
    rows = []  # X W too is formed piece by piece: no R*K-wide product of every cell of a block
    real = consensus_module.matmul
    monkeypatch.setattr(consensus_module, "matmul", lambda block, w: rows.append(block.shape[0]) or real(block, w))
    pieces = consensus_module.multiplicative_nmf_replicates(CellMatrix(x, batch_size=batch_size), 3, 8, [0, 1], 4)
    for a, b in zip(whole, pieces):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert max(rows) == 7 and sum(rows) == 8 * 60


@pytest.mark.parametrize("start, stop", [(0, 25), (3, 11), (24, 25), (7, 7)])
def test_row_block_of_a_csr_block_shares_its_arrays(start, stop):
    x = _sparse_data(n_cells=25, n_genes=15, seed=31).astype(np.float32)
    block = csr_tensor(sp.csr_matrix(x))
    rows = row_block(block, start, stop)
    assert rows.layout == torch.sparse_csr and tuple(rows.shape) == (stop - start, 15)
    np.testing.assert_array_equal(rows.to_dense().numpy(), x[start:stop])
    if rows.values().numel():  # a view of the block's values, not a copy
        assert rows.values().untyped_storage().data_ptr() == block.values().untyped_storage().data_ptr()
    dense = torch.tensor(x)
    assert torch.equal(row_block(dense, start, stop), dense[start:stop])
