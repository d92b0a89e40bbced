"""Tests for the pure-math layer ``deltanmf.core``.

Every check compares against an independent reference written in plain numpy / scipy /
scikit-learn (or, for the optimiser, against torch's own Adam / SparseAdam).
Orientation throughout: ``x`` is cells x genes, programs W are genes x K, usage is
cells x K (H transposed).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from scipy.optimize import nnls as scipy_nnls

from helpers import DEFAULTS, consensus

from deltanmf.core.activation import Activation
from deltanmf.core.consensus import (
    ConsensusResult,
    consensus_init,
    density_filter,
    kmeans,
    multiplicative_nmf,
    multiplicative_nmf_replicates,
    refit_usage,
    silhouette,
)
from deltanmf.core.losses import (
    GeneGraph,
    adaptive_strength,
    fit_error,
    laplacian_penalty,
    reconstruction_loss,
    squared_error,
)
from deltanmf.core.matrix import CellMatrix
from deltanmf.core.metrics import (
    cosine_matrix,
    matched_cosine,
    matching,
    normalize_programs,
)
from deltanmf.core.model import NeuralNMF
from deltanmf.core.nnls import nnls_gram, nnls_programs, nnls_usage
from deltanmf.core.optim import LazyAdam
from deltanmf.errors import InputError

# the defaults of conf/model/neural_nmf.yaml that the functions below now take explicitly
RESTARTS = DEFAULTS.model.consensus.kmeans_restarts
NNLS_ITER = DEFAULTS.model.consensus.nnls_iterations


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------
@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """The problems here are tiny: one intra-op thread is fastest and avoids thread
    oversubscription when the machine is busy. Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _np_softplus(raw: np.ndarray, beta: float) -> np.ndarray:
    """Stable float64 reference: log(1 + exp(beta x)) / beta."""
    return np.logaddexp(0.0, beta * raw) / beta


def _np_laplacian(s: np.ndarray) -> np.ndarray:
    return np.diag(s.sum(axis=1)) - s


def _np_rayleigh(s: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Normalised Rayleigh quotient of each column, from its definition: half the similarity-weighted
    squared differences over pairs of genes, over the degree-weighted spread around the degree-weighted mean."""
    d = s.sum(axis=1)
    out = []
    for col in w.T:
        rough = 0.5 * np.sum(s * (col[:, None] - col[None, :]) ** 2)
        mean = np.sum(d * col) / d.sum()
        out.append(rough / np.sum(d * (col - mean) ** 2))
    return np.array(out)


def _random_similarity(n: int, seed: int, density: float = 0.3) -> np.ndarray:
    """Symmetric, non-negative, zero-diagonal, sparse-ish gene-gene similarity."""
    rng = np.random.default_rng(seed)
    s = rng.random((n, n)) * (rng.random((n, n)) < density)
    s = np.triu(s, 1)
    return s + s.T


def _as_layout(s: np.ndarray, layout: str) -> torch.Tensor:
    dense = torch.tensor(s, dtype=torch.float64)
    if layout == "dense":
        return dense
    if layout == "coo":
        return dense.to_sparse_coo()
    if layout == "coo_uncoalesced":
        # every entry split into two halves at the same index: sum is S, not coalesced
        coo = dense.to_sparse_coo()
        idx = torch.cat([coo.indices(), coo.indices()], dim=1)
        val = torch.cat([coo.values() / 2, coo.values() / 2])
        out = torch.sparse_coo_tensor(idx, val, dense.shape)
        assert not out.is_coalesced()
        return out
    if layout == "csr":
        return dense.to_sparse_csr()
    raise AssertionError(layout)


def _nnls_problem(seed: int, n_genes: int = 40, k: int = 6, n_cells: int = 25):
    """Random W (genes x K) and x (cells x genes) whose NNLS solution has active bounds."""
    rng = np.random.default_rng(seed)
    w = rng.random((n_genes, k))
    u = rng.random((n_cells, k)) * (rng.random((n_cells, k)) < 0.6)
    x = u @ w.T + 0.3 * rng.normal(size=(n_cells, n_genes))
    return w, x


def _scipy_usage(w: np.ndarray, x: np.ndarray) -> np.ndarray:
    return np.stack([scipy_nnls(w, x[c])[0] for c in range(x.shape[0])])


def _rel(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def _same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """Two labelings describe the same partition (up to renaming the labels)."""
    a, b = np.asarray(a), np.asarray(b)
    pairs = set(zip(a.tolist(), b.tolist()))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


# --------------------------------------------------------------------------------------
# 1. Activation
# --------------------------------------------------------------------------------------
ROUNDTRIP_VALUES = np.concatenate([np.logspace(-5, 3, 161), [3.99, 4.0, 4.01, 19.99 / 5, 20.01 / 5]])
ACTIVATIONS = [("softplus", 0.1), ("softplus", 1.0), ("softplus", 5.0), ("softplus", 100.0),
               ("softplus", 1000.0), ("relu", 5.0)]


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-9), (torch.float32, 1e-5)])
@pytest.mark.parametrize("kind,beta", ACTIVATIONS)
def test_activation_roundtrip(kind, beta, dtype, rtol):
    act = Activation(kind, beta)
    v = torch.tensor(ROUNDTRIP_VALUES, dtype=dtype)
    raw = act.inverse(v)
    back = act(raw)
    assert torch.isfinite(raw).all()
    assert torch.isfinite(back).all()
    assert (back >= 0).all()
    np.testing.assert_allclose(back.double().numpy(), ROUNDTRIP_VALUES, rtol=rtol, atol=0)
    # covers large beta * v (far beyond softplus' identity threshold of 20)
    assert beta * ROUNDTRIP_VALUES.max() > 20


@pytest.mark.parametrize("kind,beta", ACTIVATIONS)
def test_activation_forward_matches_numpy(kind, beta):
    rng = np.random.default_rng(1)
    raw = np.concatenate([rng.normal(scale=30.0, size=500), [-1e4, -50.0, 0.0, 50.0, 1e4]])
    out = Activation(kind, beta)(torch.tensor(raw)).numpy()
    ref = np.maximum(raw, 0.0) if kind == "relu" else _np_softplus(raw, beta)
    assert np.isfinite(out).all()
    assert (out >= 0).all()
    # torch's softplus switches to the identity above beta*x > 20 (error < exp(-20)/beta)
    np.testing.assert_allclose(out, ref, rtol=1e-7, atol=1e-9 / beta)


def test_activation_inverse_matches_numpy():
    beta = 2.0
    v = np.logspace(-4, 1, 50)
    ref = np.log(np.expm1(beta * v)) / beta  # float64, no overflow in this range
    out = Activation("softplus", beta).inverse(torch.tensor(v)).numpy()
    np.testing.assert_allclose(out, ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", ["softplus", "relu"])
def test_activation_inverse_lifts_tiny_values_to_floor(kind):
    act = Activation(kind, 5.0)
    v = torch.tensor([0.0, 1e-12, 1e-7, 2e-6], dtype=torch.float64)
    back = act(act.inverse(v))
    assert torch.isfinite(back).all()
    np.testing.assert_allclose(back.numpy(), [1e-6, 1e-6, 1e-6, 2e-6], rtol=1e-8)


def test_activation_inverse_does_not_alias_input():
    v = torch.rand(5, dtype=torch.float64) + 0.1
    keep = v.clone()
    raw = Activation("relu", 5.0).inverse(v)
    raw += 1.0
    assert torch.equal(v, keep)


@pytest.mark.parametrize("kind,beta", [("tanh", 5.0), ("", 5.0), ("Softplus", 5.0), ("softplus", 0.0),
                                       ("softplus", -1.0), ("softplus", float("nan"))])
def test_activation_rejects_bad_arguments(kind, beta):
    with pytest.raises(ValueError):
        Activation(kind, beta)


def test_activation_infinite_beta_rejected_or_consistent():
    try:
        act = Activation("softplus", float("inf"))
    except ValueError:
        return
    v = torch.tensor([0.5, 2.0], dtype=torch.float64)
    assert torch.isfinite(act(act.inverse(v))).all()


def test_relu_ignores_beta():
    act = Activation("relu", beta=-3.0)
    x = torch.tensor([-2.0, 0.5])
    assert torch.equal(act(x), torch.tensor([0.0, 0.5]))


# --------------------------------------------------------------------------------------
# 2. Reconstruction loss
# --------------------------------------------------------------------------------------
@pytest.mark.smoke
def test_reconstruction_and_squared_error_match_numpy():
    rng = np.random.default_rng(2)
    x, w, u = rng.random((13, 17)), rng.random((17, 3)), rng.random((13, 3))
    resid = x - u @ w.T
    tx, tw, tu = (torch.tensor(a) for a in (x, w, u))
    np.testing.assert_allclose(float(reconstruction_loss(tx, tw, tu)), np.mean(resid**2), rtol=1e-12)
    np.testing.assert_allclose(float(squared_error(tx, tw, tu)), np.sum(resid**2), rtol=1e-12)
    # exact reconstruction gives zero loss
    assert float(reconstruction_loss(tu @ tw.T, tw, tu)) == pytest.approx(0.0, abs=1e-24)


# --------------------------------------------------------------------------------------
# 3. Gene graph / Laplacian
# --------------------------------------------------------------------------------------
LAYOUTS = ["dense", "coo", "coo_uncoalesced", "csr"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_gene_graph_trace_matches_numpy(layout):
    n, k = 30, 4
    s = _random_similarity(n, seed=3)
    w = np.random.default_rng(4).random((n, k))
    lap = _np_laplacian(s)
    ref_trace = np.trace(w.T @ lap @ w)
    diffs = w[:, None, :] - w[None, :, :]
    ref_pairs = 0.5 * np.sum(s * np.sum(diffs**2, axis=2))
    assert ref_trace == pytest.approx(ref_pairs, rel=1e-12)  # the two forms agree

    graph = GeneGraph(_as_layout(s, layout))
    np.testing.assert_allclose(graph.degree.numpy(), s.sum(axis=1), rtol=1e-12)
    tw = torch.tensor(w)
    assert float(graph.trace(tw)) == pytest.approx(ref_trace, rel=1e-10)
    np.testing.assert_allclose(graph.quadratic(tw).numpy(), np.diag(w.T @ lap @ w), rtol=1e-10)
    np.testing.assert_allclose(graph.rayleigh(tw).numpy(), _np_rayleigh(s, w), rtol=1e-10)
    assert float(laplacian_penalty(graph, tw)) == pytest.approx(_np_rayleigh(s, w).mean(), rel=1e-10)
    assert graph.n_genes == n


@pytest.mark.smoke
@pytest.mark.parametrize("layout", LAYOUTS)
def test_the_penalty_depends_on_the_programs_shape_not_their_scale(layout):
    """W -> W diag(c), H -> diag(1/c) H leaves W H and the penalty unchanged (any c > 0 per program),
    where tr(W^T L W) changes by c^2; raising a program by the same amount on every gene leaves it
    unchanged too (it cannot be met by flattening the programs)."""
    n, k, cells = 40, 3, 25
    rng = np.random.default_rng(11)
    s = _random_similarity(n, seed=12)
    w, h = rng.random((n, k)), rng.random((cells, k))
    c = np.array([0.01, 3.0, 250.0])
    graph = GeneGraph(_as_layout(s, layout))
    before = graph.rayleigh(torch.tensor(w)).numpy()
    after = graph.rayleigh(torch.tensor(w * c)).numpy()
    np.testing.assert_allclose((h / c) @ (w * c).T, h @ w.T, rtol=1e-12)  # the same reconstruction
    np.testing.assert_allclose(before, _np_rayleigh(s, w), rtol=1e-10)
    np.testing.assert_allclose(after, before, rtol=1e-10)
    np.testing.assert_allclose(_np_rayleigh(s, w * c), _np_rayleigh(s, w), rtol=1e-10)
    assert float(laplacian_penalty(graph, torch.tensor(w * c))) == pytest.approx(before.mean(), rel=1e-10)
    assert float(graph.trace(torch.tensor(w * 10))) == pytest.approx(100 * float(graph.trace(torch.tensor(w))))
    np.testing.assert_allclose(graph.rayleigh(torch.tensor(w + 5.0)).numpy(), before, rtol=1e-9)


def test_the_penalty_reads_against_a_graph_unrelated_programs():
    """In [0, 2]; about 1 for loadings unrelated to the graph; 0 for a program constant on the graph;
    low for a program that is high on one tight group of similar genes."""
    n = 300
    rng = np.random.default_rng(13)
    s = _random_similarity(n, seed=14, density=0.1)
    group = np.arange(30)
    s[np.ix_(group, group)] = 5.0 * (1 - np.eye(30))
    graph = GeneGraph(torch.tensor(s))
    unrelated = graph.rayleigh(torch.tensor(rng.random((n, 200)))).numpy()
    assert np.all((unrelated >= 0) & (unrelated <= 2))
    assert abs(unrelated.mean() - 1) < 0.02
    marker = np.full((n, 1), 0.1)
    marker[group] = 1.0
    assert float(graph.rayleigh(torch.tensor(marker))) < 0.3
    assert float(graph.rayleigh(torch.tensor(rng.permutation(marker)))) > 0.7
    np.testing.assert_array_equal(graph.rayleigh(torch.full((n, 2), 3.0, dtype=torch.float64)).numpy(), 0.0)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_gene_graph_gradient_is_2LW(layout):
    n, k = 25, 3
    s = _random_similarity(n, seed=5)
    w = np.random.default_rng(6).random((n, k))
    lap = _np_laplacian(s)
    graph = GeneGraph(_as_layout(s, layout))

    tw = torch.tensor(w, requires_grad=True)
    graph.trace(tw).backward()
    np.testing.assert_allclose(tw.grad.numpy(), 2 * lap @ w, rtol=1e-10, atol=1e-12)

    # d R / d w = 2 (L w - R D v) / (v^T D v), v = w minus its degree-weighted mean (d^T v = 0)
    d = s.sum(axis=1)
    v = w - (d @ w) / d.sum()
    spread = np.sum(d[:, None] * v**2, axis=0)
    quotient = _np_rayleigh(s, w)
    expected = 2 * (lap @ w - quotient * d[:, None] * v) / spread / k
    tw2 = torch.tensor(w, requires_grad=True)
    laplacian_penalty(graph, tw2).backward()
    np.testing.assert_allclose(tw2.grad.numpy(), expected, rtol=1e-9, atol=1e-13)


def test_gene_graph_constant_programs_have_zero_trace():
    s = _random_similarity(20, seed=7)
    graph = GeneGraph(torch.tensor(s))
    w = torch.ones(20, 3, dtype=torch.float64) * torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    assert float(graph.trace(w)) == pytest.approx(0.0, abs=1e-10)
    w.requires_grad_(True)
    penalty = laplacian_penalty(graph, w)
    penalty.backward()
    assert float(penalty.detach()) == 0.0 and torch.isfinite(w.grad).all()


def test_gene_graph_to_keeps_values():
    s = _random_similarity(12, seed=8)
    graph = GeneGraph(_as_layout(s, "coo")).to("cpu")
    w = torch.tensor(np.random.default_rng(9).random((12, 2)))
    assert float(graph.trace(w)) == pytest.approx(np.trace(w.numpy().T @ _np_laplacian(s) @ w.numpy()), rel=1e-10)


def test_gene_graph_shape_errors():
    graph = GeneGraph(torch.tensor(_random_similarity(10, seed=10)))
    with pytest.raises(ValueError):
        graph.trace(torch.rand(9, 3, dtype=torch.float64))
    with pytest.raises(ValueError):
        laplacian_penalty(graph, torch.rand(11, 3, dtype=torch.float64))
    with pytest.raises(ValueError):
        GeneGraph(torch.rand(4, 5))
    with pytest.raises(ValueError):
        GeneGraph(torch.rand(4))


# --------------------------------------------------------------------------------------
# 4. Adaptive strength
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("relative,reference,penalty", [(0.3, 2.5, 0.7), (1.0, 1e-4, 3e3), (0.05, 10.0, 1e-6)])
def test_adaptive_strength_balances_terms(relative, reference, penalty):
    ref = torch.tensor(reference, dtype=torch.float64, requires_grad=True)
    pen = torch.tensor(penalty, dtype=torch.float64, requires_grad=True)
    alpha = adaptive_strength(relative, ref * 1.0, pen * 1.0)
    assert not alpha.requires_grad  # a constant, not part of the graph
    assert float(alpha * penalty) == pytest.approx(relative * reference, rel=1e-12)


def test_adaptive_strength_zero_penalty_gives_zero():
    alpha = adaptive_strength(0.5, torch.tensor(3.0), torch.tensor(0.0))
    assert torch.isfinite(alpha)
    assert float(alpha) == 0.0


# --------------------------------------------------------------------------------------
# 5. NNLS
# --------------------------------------------------------------------------------------
@pytest.mark.smoke
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_nnls_usage_matches_scipy(seed):
    w, x = _nnls_problem(seed)
    ref = _scipy_usage(w, x)
    assert (ref == 0).any() and (ref > 0).any()  # the bounds are active somewhere
    out = nnls_usage(torch.tensor(x), torch.tensor(w)).numpy()
    assert out.shape == (x.shape[0], w.shape[1])
    assert (out >= 0).all()
    assert _rel(out, ref) < 1e-4
    np.testing.assert_allclose(out, ref, atol=1e-4 * np.abs(ref).max())


def test_nnls_usage_float32_matches_scipy():
    w, x = _nnls_problem(3)
    ref = _scipy_usage(w, x)
    out = nnls_usage(torch.tensor(x, dtype=torch.float32), torch.tensor(w, dtype=torch.float32))
    assert out.dtype == torch.float32
    assert (out >= 0).all()
    assert _rel(out.numpy(), ref) < 1e-3


def test_nnls_usage_satisfies_kkt():
    w, x = _nnls_problem(4)
    u = nnls_usage(torch.tensor(x), torch.tensor(w)).numpy()
    grad = (u @ w.T - x) @ w  # gradient of 1/2 ||x - u W^T||^2 w.r.t. u
    scale = np.abs(x @ w).max()
    assert (grad >= -1e-5 * scale).all()  # dual feasibility
    assert np.abs(u * grad).max() < 1e-5 * scale * np.abs(u).max()  # complementary slackness


def test_nnls_gram_direct_matches_scipy_and_init_is_irrelevant():
    w, x = _nnls_problem(5)
    ref = _scipy_usage(w, x).T  # K x cells
    gram, cross = torch.tensor(w.T @ w), torch.tensor(w.T @ x.T)
    out = nnls_gram(gram, cross)
    assert _rel(out.numpy(), ref) < 1e-4
    init = torch.rand(gram.shape[0], x.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 5
    init_copy = init.clone()
    out_init = nnls_gram(gram, cross, init=init, max_iter=5000)
    assert torch.equal(init, init_copy)  # init is not modified in place
    assert _rel(out_init.numpy(), ref) < 1e-4


def test_nnls_gram_all_negative_cross_gives_zero():
    gram = torch.eye(3, dtype=torch.float64) * 2 + 0.5
    cross = -torch.rand(3, 4, dtype=torch.float64) - 0.1
    out = nnls_gram(gram, cross)
    assert torch.equal(out, torch.zeros_like(out))


def test_nnls_gram_shape_errors():
    with pytest.raises(ValueError):
        nnls_gram(torch.eye(3), torch.rand(4, 5))
    with pytest.raises(ValueError):
        nnls_gram(torch.rand(3, 4), torch.rand(3, 5))


@pytest.mark.parametrize("seed", [0, 1])
def test_nnls_programs_matches_scipy_per_gene(seed):
    rng = np.random.default_rng(10 + seed)
    n_cells, n_genes, k = 25, 40, 6
    u = rng.random((n_cells, k))  # usage, cells x K (H^T)
    x = u @ rng.random((n_genes, k)).T + 0.3 * rng.normal(size=(n_cells, n_genes))
    # per gene g:  min_{w_g >= 0} || x[:, g] - U w_g ||
    ref = np.stack([scipy_nnls(u, x[:, g])[0] for g in range(n_genes)])
    assert (ref == 0).any()
    gram = torch.tensor(u.T @ u)  # H H^T
    cross = torch.tensor(x.T @ u)  # X H^T with X genes x cells
    out = nnls_programs(gram, cross).numpy()
    assert out.shape == (n_genes, k)
    assert (out >= 0).all()
    assert _rel(out, ref) < 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_nnls_zero_program_column_stays_finite(dtype):
    w, x = _nnls_problem(6)
    w[:, 2] = 0.0
    out = nnls_usage(torch.tensor(x, dtype=dtype), torch.tensor(w, dtype=dtype))
    assert torch.isfinite(out).all()
    assert (out >= 0).all()
    keep = [0, 1, 3, 4, 5]
    ref = _scipy_usage(w[:, keep], x)
    tol = 1e-4 if dtype == torch.float64 else 1e-3
    assert _rel(out.numpy()[:, keep], ref) < tol
    np.testing.assert_array_equal(out.numpy()[:, 2], 0.0)  # no information: stays at its start


def test_nnls_duplicate_program_columns_float32():
    w, x = _nnls_problem(7, k=5)
    w = np.concatenate([w, w[:, :1]], axis=1)  # program 5 duplicates program 0: W^T W singular
    out = nnls_usage(torch.tensor(x, dtype=torch.float32), torch.tensor(w, dtype=torch.float32))
    assert torch.isfinite(out).all() and (out >= 0).all()
    # the minimiser is not unique, but the optimal reconstruction is
    ref = _scipy_usage(w, x)
    np.testing.assert_allclose(out.double().numpy() @ w.T, ref @ w.T, rtol=1e-3, atol=1e-3)


def test_nnls_duplicate_program_columns_float64():
    # same problem in float64, where the ridge is representable: optimal reconstruction reached
    w, x = _nnls_problem(7, k=5)
    w = np.concatenate([w, w[:, :1]], axis=1)
    out = nnls_usage(torch.tensor(x), torch.tensor(w)).numpy()
    assert np.isfinite(out).all() and (out >= 0).all()
    ref = _scipy_usage(w, x)
    np.testing.assert_allclose(out @ w.T, ref @ w.T, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------
# 6. Metrics
# --------------------------------------------------------------------------------------
def test_cosine_matrix_matches_numpy():
    rng = np.random.default_rng(11)
    a, b = rng.normal(size=(30, 4)), rng.normal(size=(30, 6))
    ref = np.array([[a[:, i] @ b[:, j] / (np.linalg.norm(a[:, i]) * np.linalg.norm(b[:, j]))
                     for j in range(6)] for i in range(4)])
    np.testing.assert_allclose(cosine_matrix(a, b), ref, rtol=1e-12)
    b[:, 3] = 0.0
    out = cosine_matrix(a, b)
    assert np.isfinite(out).all() and (out[:, 3] == 0).all()
    with pytest.raises(ValueError):
        cosine_matrix(a, b[:-1])


def test_matched_cosine_recovers_permutation_and_scale():
    rng = np.random.default_rng(12)
    truth = rng.random((50, 5)) ** 4  # non-negative, fairly distinct columns
    perm = np.array([3, 0, 4, 1, 2])
    fitted = truth[:, perm] * np.array([0.1, 2.0, 7.0, 1.0, 1e3])
    np.testing.assert_allclose(matched_cosine(fitted, truth), 1.0, rtol=1e-12)
    m = matching(fitted, truth)
    np.testing.assert_array_equal(m, np.argsort(perm))
    np.testing.assert_array_equal(perm[m], np.arange(5))  # fitted[:, m[i]] is planted i


def test_matched_cosine_fewer_fitted_than_planted():
    rng = np.random.default_rng(13)
    truth = rng.random((40, 4)) ** 4
    fitted = truth[:, [2, 0]] * 3.0
    np.testing.assert_allclose(matched_cosine(fitted, truth), [1.0, 0.0, 1.0, 0.0], atol=1e-12)
    np.testing.assert_array_equal(matching(fitted, truth), [1, -1, 0, -1])


def test_matched_cosine_extra_fitted_programs_are_ignored():
    rng = np.random.default_rng(14)
    truth = rng.random((40, 3)) ** 4
    fitted = np.concatenate([rng.random((40, 2)), truth[:, ::-1]], axis=1)
    np.testing.assert_allclose(matched_cosine(fitted, truth), 1.0, rtol=1e-12)
    np.testing.assert_array_equal(matching(fitted, truth), [4, 3, 2])


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_normalize_programs(backend):
    rng = np.random.default_rng(15)
    w, u = rng.random((20, 4)), rng.random((9, 4))
    w[:, 1] = 0.0
    if backend == "torch":
        w_in, u_in = torch.tensor(w), torch.tensor(u)
    else:
        w_in, u_in = w, u
    w_out, u_out = normalize_programs(w_in, u_in)
    assert type(w_out) is type(w_in) and type(u_out) is type(u_in)
    w_out, u_out = np.asarray(w_out), np.asarray(u_out)
    assert np.isfinite(w_out).all() and np.isfinite(u_out).all()
    np.testing.assert_allclose(w_out.sum(0), [1.0, 0.0, 1.0, 1.0], rtol=1e-12)
    np.testing.assert_array_equal(w_out[:, 1], 0.0)
    np.testing.assert_allclose(u_out @ w_out.T, u @ w.T, rtol=1e-12)
    np.testing.assert_allclose(u_out[:, 1], u[:, 1])  # the zero program keeps scale 1
    np.testing.assert_allclose(u_out[:, 0], u[:, 0] * w[:, 0].sum(), rtol=1e-12)


# --------------------------------------------------------------------------------------
# 8. CellMatrix and fit_error
# --------------------------------------------------------------------------------------
def _expression(seed: int = 16, n_cells: int = 23, n_genes: int = 11) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.poisson(1.0, (n_cells, n_genes)) * (rng.random((n_cells, n_genes)) < 0.4)).astype(np.float64)


@pytest.mark.parametrize("batch_size", [None, 5, 23, 50])
def test_cell_matrix_dense_and_sparse_blocks_identical(batch_size):
    x = _expression()
    dense = CellMatrix(x, batch_size=batch_size)
    sparse = CellMatrix(sp.csr_matrix(x), batch_size=batch_size)
    csc = CellMatrix(sp.csc_matrix(x), batch_size=batch_size)  # converted to CSR
    assert (dense.n_cells, dense.n_genes) == (sparse.n_cells, sparse.n_genes) == x.shape
    idx = np.array([4, 0, 17, 4])
    for m in (sparse, csc):  # sparse input stays sparse: CSR blocks, the full matrix included
        assert m.rows(idx).layout == m.full().layout == torch.sparse_csr
        assert torch.equal(dense.rows(idx), m.rows(idx).to_dense())
        assert torch.equal(dense.full(), m.full().to_dense())
    assert dense.full().dtype == torch.float32 and dense.full().layout == torch.strided
    np.testing.assert_array_equal(dense.rows(idx).numpy(), x[idx].astype(np.float32))
    for (i_d, b_d), (i_s, b_s) in zip(dense.batches(), sparse.batches(), strict=True):
        np.testing.assert_array_equal(i_d, i_s)
        assert torch.equal(b_d, b_s.to_dense())


@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("batch_size", [1, 4, 7, 22])
def test_cell_matrix_batches_cover_every_cell_once(batch_size, sparse):
    x = _expression()
    m = CellMatrix(sp.csr_matrix(x) if sparse else x, batch_size=batch_size)
    assert not m.full_batch
    seen = []
    n_batches = 0
    for index, block in m.batches():
        n_batches += 1
        assert len(index) <= batch_size
        assert np.all(np.diff(index) > 0)  # sorted, no repeats
        assert (block.layout == torch.sparse_csr) == sparse
        np.testing.assert_array_equal(block.to_dense().numpy(), x[index].astype(np.float32))
        seen.append(index)
    assert n_batches == math.ceil(x.shape[0] / batch_size)
    allidx = np.concatenate(seen)
    np.testing.assert_array_equal(np.sort(allidx), np.arange(x.shape[0]))


def test_cell_matrix_batches_are_consecutive_cells_in_order():
    m = CellMatrix(_expression(n_cells=43), batch_size=10)
    assert [i.tolist() for i, _ in m.batches()] == [list(range(s, min(s + 10, 43))) for s in range(0, 43, 10)]


@pytest.mark.parametrize("batch_size", [None, 23, 100])
def test_cell_matrix_full_batch_yields_one_block(batch_size):
    x = _expression()
    m = CellMatrix(sp.csr_matrix(x), batch_size=batch_size)
    assert m.full_batch
    batches = list(m.batches())
    assert len(batches) == 1
    index, block = batches[0]
    np.testing.assert_array_equal(index, np.arange(x.shape[0]))
    assert block.layout == torch.sparse_csr  # never densified
    np.testing.assert_array_equal(block.to_dense().numpy(), x.astype(np.float32))
    assert m.full() is m.full()  # cached


@pytest.mark.parametrize("kind", ["dense", "csr", "coo"])
def test_cell_matrix_squared_norm(kind):
    x = _expression() * 1.5
    data = {"dense": x, "csr": sp.csr_matrix(x), "coo": sp.coo_matrix(x)}[kind]
    assert CellMatrix(data).squared_norm() == pytest.approx(np.sum(x**2), rel=1e-14)


@pytest.mark.parametrize("dtype,value", [(np.int16, 300), (np.int32, 50_000)])
def test_cell_matrix_squared_norm_integer_sparse(dtype, value):
    x = np.array([[value, 0, 1], [0, 2, 0]], dtype=dtype)
    ref = float(np.sum(x.astype(np.float64) ** 2))
    assert CellMatrix(x).squared_norm() == ref  # dense path is fine
    assert CellMatrix(sp.csr_matrix(x)).squared_norm() == ref


def test_cell_matrix_rejects_non_2d():
    with pytest.raises(ValueError):
        CellMatrix(np.zeros(5))
    with pytest.raises(ValueError):
        CellMatrix(np.zeros((2, 3, 4)))


@pytest.mark.parametrize("batch_size", [None, 4])
@pytest.mark.parametrize("sparse", [False, True])
def test_fit_error_matches_numpy(sparse, batch_size):
    rng = np.random.default_rng(17)
    x = _expression()
    w, u = rng.random((x.shape[1], 3)), rng.random((x.shape[0], 3))
    m = CellMatrix(sp.csr_matrix(x) if sparse else x, batch_size=batch_size, dtype=torch.float64)
    out = fit_error(m, w, u)
    resid = x - u @ w.T
    assert out["recon"] == pytest.approx(np.mean(resid**2), rel=1e-10)
    assert out["relative_error"] == pytest.approx(np.linalg.norm(resid) / np.linalg.norm(x), rel=1e-10)
    # torch inputs and float32 blocks give the same numbers (to float32 precision)
    m32 = CellMatrix(sp.csr_matrix(x) if sparse else x, batch_size=batch_size)
    out32 = fit_error(m32, torch.tensor(w), torch.tensor(u))
    assert out32["relative_error"] == pytest.approx(out["relative_error"], rel=1e-5)


def test_fit_error_of_exact_factorisation_is_zero_and_zero_matrix_is_nan():
    rng = np.random.default_rng(18)
    w, u = rng.random((8, 2)), rng.random((10, 2))
    out = fit_error(CellMatrix(u @ w.T, batch_size=3, dtype=torch.float64), w, u)
    assert out["recon"] == pytest.approx(0.0, abs=1e-24)
    assert out["relative_error"] == pytest.approx(0.0, abs=1e-10)
    out0 = fit_error(CellMatrix(np.zeros((10, 8))), w, u)
    assert math.isnan(out0["relative_error"])


# --------------------------------------------------------------------------------------
# 9. LazyAdam
# --------------------------------------------------------------------------------------
ADAM_KW = dict(lr=0.05, betas=(0.8, 0.99), eps=1e-6)


def _quadratic(p: torch.Tensor, a: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return torch.sum((a @ p - target) ** 2)


def test_lazy_adam_dense_matches_torch_adam():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    target = torch.randn(6, 3, generator=gen, dtype=torch.float64)
    start = torch.randn(5, 3, generator=gen, dtype=torch.float64)
    p1 = torch.nn.Parameter(start.clone())
    p2 = torch.nn.Parameter(start.clone())
    opt1 = LazyAdam([p1], **ADAM_KW)
    opt2 = torch.optim.Adam([p2], **ADAM_KW)
    for _ in range(20):
        for p, opt in ((p1, opt1), (p2, opt2)):
            opt.zero_grad()
            _quadratic(p, a, target).backward()
            opt.step()
        np.testing.assert_allclose(p1.detach().numpy(), p2.detach().numpy(), rtol=1e-10, atol=1e-12)
    assert not torch.equal(p1.detach(), start)  # it moved
    st1, st2 = opt1.state[p1], opt2.state[p2]
    np.testing.assert_allclose(st1["exp_avg"].numpy(), st2["exp_avg"].numpy(), rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(st1["exp_avg_sq"].numpy(), st2["exp_avg_sq"].numpy(), rtol=1e-10, atol=1e-14)
    assert float(st1["step"]) == 20


def test_lazy_adam_closure_returns_loss():
    p = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    opt = LazyAdam([p], lr=0.1)

    def closure():
        opt.zero_grad()
        loss = torch.sum(p**2)
        loss.backward()
        return loss

    assert float(opt.step(closure).detach()) == pytest.approx(3.0)
    np.testing.assert_allclose(p.detach().numpy(), 0.9, rtol=1e-6)  # first Adam step moves by ~lr


def _sparse_loss(weight: torch.Tensor, idx: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return torch.sum((F.embedding(idx, weight, sparse=True) - target) ** 2)


def test_lazy_adam_sparse_touches_only_batch_rows_and_matches_sparse_adam():
    gen = torch.Generator().manual_seed(1)
    start = torch.randn(10, 3, generator=gen, dtype=torch.float64)
    idx = torch.tensor([1, 4, 7, 4])  # a repeated row: its gradients add
    target = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    p1 = torch.nn.Parameter(start.clone())
    p2 = torch.nn.Parameter(start.clone())
    # SparseAdam adds eps before dividing by sqrt(1 - b2^t) (its eps is effectively
    # eps / sqrt(1 - b2^t)); with a negligible eps the two updates are the same formula
    kw = dict(ADAM_KW, eps=1e-12)
    opt1 = LazyAdam([p1], **kw)
    opt2 = torch.optim.SparseAdam([p2], **kw)
    touched = torch.zeros(10, dtype=torch.bool)
    touched[idx] = True
    for _ in range(20):
        for p, opt in ((p1, opt1), (p2, opt2)):
            opt.zero_grad()
            _sparse_loss(p, idx, target).backward()
            assert p.grad.is_sparse
            opt.step()
        np.testing.assert_allclose(p1.detach().numpy(), p2.detach().numpy(), rtol=1e-9, atol=1e-11)
    assert torch.equal(p1.detach()[~touched], start[~touched])  # bit-identical
    assert (p1.detach()[touched] != start[touched]).all()
    state = opt1.state[p1]
    assert torch.equal(state["exp_avg"][~touched], torch.zeros(7, 3, dtype=torch.float64))
    assert torch.equal(state["exp_avg_sq"][~touched], torch.zeros(7, 3, dtype=torch.float64))
    assert (state["exp_avg_sq"][touched] > 0).all()


def test_lazy_adam_sparse_rows_match_dense_adam_on_the_subproblem():
    # Touching the same rows every step, lazy Adam on those rows is plain Adam on those rows.
    gen = torch.Generator().manual_seed(2)
    start = torch.randn(8, 2, generator=gen, dtype=torch.float64)
    rows = torch.tensor([0, 3, 5])
    target = torch.randn(3, 2, generator=gen, dtype=torch.float64)
    p_sparse = torch.nn.Parameter(start.clone())
    p_dense = torch.nn.Parameter(start[rows].clone())
    opt_s = LazyAdam([p_sparse], **ADAM_KW)
    opt_d = torch.optim.Adam([p_dense], **ADAM_KW)
    for _ in range(20):
        opt_s.zero_grad()
        _sparse_loss(p_sparse, rows, target).backward()
        opt_s.step()
        opt_d.zero_grad()
        torch.sum((p_dense - target) ** 2).backward()
        opt_d.step()
    np.testing.assert_allclose(p_sparse.detach()[rows].numpy(), p_dense.detach().numpy(), rtol=1e-10, atol=1e-12)


def test_lazy_adam_varying_batches_never_move_untouched_rows():
    gen = torch.Generator().manual_seed(3)
    start = torch.randn(12, 2, generator=gen)
    p = torch.nn.Parameter(start.clone())
    opt = LazyAdam([p], lr=0.1)
    batches = [torch.tensor([0, 2]), torch.tensor([2, 5, 6]), torch.tensor([0, 9])]
    for step in range(9):
        opt.zero_grad()
        _sparse_loss(p, batches[step % 3], torch.zeros(len(batches[step % 3]), 2)).backward()
        opt.step()
    never = torch.tensor([1, 3, 4, 7, 8, 10, 11])
    assert torch.equal(p.detach()[never], start[never])
    assert torch.equal(opt.state[p]["exp_avg"][never], torch.zeros(len(never), 2))


def test_lazy_adam_rejects_bad_lr():
    p = torch.nn.Parameter(torch.zeros(2))
    for lr in (0.0, -1e-3):
        with pytest.raises(ValueError):
            LazyAdam([p], lr=lr)


# --------------------------------------------------------------------------------------
# 10. NeuralNMF
# --------------------------------------------------------------------------------------
def _model_inputs(seed: int = 19, n_genes: int = 15, n_cells: int = 12, k: int = 3):
    gen = torch.Generator().manual_seed(seed)
    w = torch.rand(n_genes, k, generator=gen) + 1e-3
    u = torch.rand(n_cells, k, generator=gen) * 3 + 1e-3
    x = torch.rand(n_cells, n_genes, generator=gen)
    return w, u, x


@pytest.mark.parametrize("sparse_grad", [False, True])
@pytest.mark.parametrize("kind", ["softplus", "relu"])
def test_neural_nmf_initial_values(kind, sparse_grad):
    w, u, _ = _model_inputs()
    model = NeuralNMF(w, u, Activation(kind, 5.0), sparse_usage_grad=sparse_grad)
    assert model.n_programs == 3
    assert model.programs_raw.dtype == torch.float32
    np.testing.assert_allclose(model.programs().detach().numpy(), w.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(model.usage().detach().numpy(), u.numpy(), rtol=1e-5, atol=1e-6)
    index = torch.tensor([7, 0, 3, 3])
    np.testing.assert_allclose(model.usage(index).detach().numpy(), u[index].numpy(), rtol=1e-5, atol=1e-6)


def test_neural_nmf_does_not_alias_inputs():
    w, u, _ = _model_inputs()
    keep = w.clone()
    model = NeuralNMF(w, u, Activation("relu", 5.0))
    with torch.no_grad():
        model.programs_raw.add_(1.0)
    assert torch.equal(w, keep)


def test_neural_nmf_recon_matches_numpy_and_sparse_grad():
    w, u, x = _model_inputs()
    index = torch.tensor([2, 5, 9])
    dense = NeuralNMF(w, u, Activation("softplus", 5.0), sparse_usage_grad=False)
    sparse = NeuralNMF(w, u, Activation("softplus", 5.0), sparse_usage_grad=True)
    xb = x[index]
    wn, un = dense.programs().detach().double().numpy(), dense.usage(index).detach().double().numpy()
    ref = np.mean((xb.double().numpy() - un @ wn.T) ** 2)
    loss_d = dense.recon(xb, index)
    loss_s = sparse.recon(xb, index)
    assert float(loss_d) == pytest.approx(ref, rel=1e-5)
    assert float(loss_s) == pytest.approx(float(loss_d), rel=1e-6)
    loss_d.backward()
    loss_s.backward()
    assert not dense.usage_raw.grad.is_sparse
    assert sparse.usage_raw.grad.is_sparse
    assert not sparse.programs_raw.grad.is_sparse
    g = sparse.usage_raw.grad.coalesce()
    assert set(g.indices()[0].tolist()) == {2, 5, 9}
    np.testing.assert_allclose(g.to_dense().numpy(), dense.usage_raw.grad.numpy(), rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(sparse.programs_raw.grad.numpy(), dense.programs_raw.grad.numpy(), rtol=1e-5, atol=1e-8)


def test_neural_nmf_laplacian_and_training_step_with_lazy_adam():
    w, u, x = _model_inputs()
    s = _random_similarity(w.shape[0], seed=20)
    graph = GeneGraph(torch.tensor(s, dtype=torch.float32))
    model = NeuralNMF(w, u, Activation("softplus", 5.0), sparse_usage_grad=True)
    wn = model.programs().detach().double().numpy()
    ref = _np_rayleigh(s, wn).mean()
    assert float(model.laplacian(graph)) == pytest.approx(ref, rel=1e-5)

    opt = LazyAdam(model.parameters(), lr=0.05)
    u0, w0 = model.usage_raw.detach().clone(), model.programs_raw.detach().clone()
    index = torch.tensor([1, 4])
    opt.zero_grad()
    (model.recon(x[index], index) + model.laplacian(graph)).backward()
    opt.step()
    rest = torch.tensor([i for i in range(u.shape[0]) if i not in (1, 4)])
    assert torch.equal(model.usage_raw.detach()[rest], u0[rest])
    assert not torch.equal(model.usage_raw.detach()[index], u0[index])
    assert not torch.equal(model.programs_raw.detach(), w0)


def test_neural_nmf_rejects_mismatched_k():
    with pytest.raises(ValueError):
        NeuralNMF(torch.rand(5, 3), torch.rand(4, 2), Activation("softplus", 5.0))


# --------------------------------------------------------------------------------------
# 11. Consensus
# --------------------------------------------------------------------------------------
def _blobs(seed: int = 21, per: int = 15, k: int = 3, dim: int = 5):
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=20.0, size=(k, dim))
    truth = np.repeat(np.arange(k), per)
    pts = centres[truth] + rng.normal(size=(k * per, dim))
    order = rng.permutation(k * per)
    return pts[order], truth[order]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kmeans_recovers_blobs(seed):
    pts, truth = _blobs(seed=30 + seed, k=4)
    labels = kmeans(torch.tensor(pts), 4, seed=seed, restarts=RESTARTS)
    assert labels.shape == (len(truth),) and labels.dtype == torch.long
    assert set(labels.tolist()) == {0, 1, 2, 3}
    assert _same_partition(labels.numpy(), truth)
    # deterministic in its seed
    assert torch.equal(labels, kmeans(torch.tensor(pts), 4, seed=seed, restarts=RESTARTS))


def test_kmeans_too_few_points():
    with pytest.raises(ValueError):
        kmeans(torch.rand(2, 3), 3, seed=0, restarts=RESTARTS)


def test_kmeans_does_not_modify_points_k2():
    pts = torch.tensor(_blobs(k=2)[0])
    keep = pts.clone()
    kmeans(pts, 2, seed=0, restarts=RESTARTS)
    assert torch.equal(pts, keep)


def test_kmeans_does_not_modify_points_k1():
    pts = torch.tensor(_blobs(k=2)[0])
    keep = pts.clone()
    labels = kmeans(pts, 1, seed=0, restarts=RESTARTS)
    assert torch.equal(labels, torch.zeros(len(pts), dtype=torch.long))
    assert torch.equal(pts, keep)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-9), (torch.float32, 1e-4)])
@pytest.mark.parametrize("seed", [0, 1])
def test_silhouette_matches_sklearn(seed, dtype, tol):
    from sklearn.metrics import silhouette_score

    rng = np.random.default_rng(40 + seed)
    pts = rng.normal(size=(40, 6))
    labels = rng.choice([2, 5, 9], size=40)  # non-contiguous labels
    labels[7] = 11  # a singleton cluster: its silhouette is 0 by convention
    ref = silhouette_score(pts, labels)
    assert silhouette(torch.tensor(pts, dtype=dtype), torch.tensor(labels)) == pytest.approx(ref, abs=tol)
    # separated blobs: close to 1, still equal to sklearn
    bp, bl = _blobs(seed=seed)
    assert silhouette(torch.tensor(bp, dtype=dtype), torch.tensor(bl)) == pytest.approx(
        silhouette_score(bp, bl), abs=tol)


def test_silhouette_degenerate_is_nan():
    assert math.isnan(silhouette(torch.rand(5, 2), torch.zeros(5, dtype=torch.long)))
    assert math.isnan(silhouette(torch.rand(3, 2), torch.tensor([0, 1, 2])))


def test_density_filter_drops_planted_outlier():
    rng = np.random.default_rng(50)
    pts = rng.normal(scale=0.05, size=(20, 8))
    pts[13] += 10.0
    keep = density_filter(torch.tensor(pts), n_neighbors=3, quantile=0.95)
    assert keep.dtype == torch.bool and keep.shape == (20,)
    expected = np.ones(20, dtype=bool)
    expected[13] = False
    np.testing.assert_array_equal(keep.numpy(), expected)


def test_density_filter_matches_numpy_reference():
    rng = np.random.default_rng(51)
    pts = rng.random((15, 4))
    n_neighbors, q = 4, 0.7
    d = np.linalg.norm(pts[:, None] - pts[None], axis=2)
    np.fill_diagonal(d, np.inf)
    local = np.sort(d, axis=1)[:, :n_neighbors].mean(1)
    ref = local <= np.quantile(local, q)
    np.testing.assert_array_equal(density_filter(torch.tensor(pts), n_neighbors, q).numpy(), ref)


@pytest.fixture(scope="module")
def planted():
    rng = np.random.default_rng(0)
    n_genes, k, n_cells = 300, 4, 400
    background = rng.lognormal(0.0, 1.0, n_genes)
    background /= background.sum()
    w_true = np.zeros((n_genes, k))
    for j in range(k):
        marker = np.zeros(n_genes)
        marker[30 * j:30 * (j + 1)] = rng.gamma(2.0, 1.0, 30)
        w_true[:, j] = 0.5 * background + 0.5 * marker / marker.sum()
    w_true /= w_true.sum(axis=0)
    usage = rng.dirichlet(np.full(k, 0.3), n_cells)
    counts = rng.poisson(2000 * usage @ w_true.T).astype(np.float32)
    return counts, w_true, usage


@pytest.mark.parametrize("batch_size", [None, 100])
def test_multiplicative_nmf_columns_are_distributions(planted, batch_size):
    counts, w_true, _ = planted
    m = CellMatrix(sp.csr_matrix(counts), batch_size=batch_size)
    w = multiplicative_nmf(m, 4, iterations=30, seed=3)
    assert w.shape == (counts.shape[1], 4)
    assert torch.isfinite(w).all() and (w >= 0).all()
    np.testing.assert_allclose(w.sum(0).numpy(), 1.0, rtol=1e-5)
    assert torch.equal(w, multiplicative_nmf(m, 4, iterations=30, seed=3))
    assert matched_cosine(w.numpy(), w_true).min() > 0.8  # already close after a short run


@pytest.mark.parametrize("inner", [1, 4])
@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("batch_size", [None, 100])
def test_replicates_run_side_by_side_follow_their_own_updates(planted, batch_size, sparse, inner):
    """R runs sharing each pass over the data give each run's own result: the joint Gram
    matrices are masked to their diagonal blocks, so no run sees another's programs."""
    counts, _, _ = planted
    data = sp.csr_matrix(counts.astype(np.float64)) if sparse else counts.astype(np.float64)
    m = CellMatrix(data, batch_size=batch_size, dtype=torch.float64)
    together = multiplicative_nmf_replicates(m, 4, 15, [3, 8, 11], inner_updates=inner)
    assert len(together) == 3 and all(w.shape == (counts.shape[1], 4) for w in together)
    for seed, w in zip([3, 8, 11], together):  # every run equals its run alone
        alone = multiplicative_nmf(m, 4, 15, seed, inner_updates=inner)
        torch.testing.assert_close(w, alone, rtol=1e-9, atol=1e-12)
    assert not torch.allclose(together[0], together[1])


@pytest.mark.parametrize("inner", [1, 4])
@pytest.mark.parametrize("sparse", [False, True])
def test_multiplicative_updates_do_not_depend_on_the_batches(planted, sparse, inner):
    """A pass updates the programs once, from statistics summed over every block: batches of
    any size, a last batch of one cell included, give the full-batch programs. (Updating them
    per batch zeroed every gene absent from a batch, and the last batch set the result.)"""
    counts, w_true, _ = planted
    data = sp.csr_matrix(counts.astype(np.float64)) if sparse else counts.astype(np.float64)
    full = multiplicative_nmf(CellMatrix(data, dtype=torch.float64), 4, 20, seed=2, inner_updates=inner)
    for batch_size in (133, 57):  # 400 cells: last batches of 1 and 1 cells
        m = CellMatrix(data, batch_size=batch_size, dtype=torch.float64)
        w = multiplicative_nmf(m, 4, 20, seed=2, inner_updates=inner)
        torch.testing.assert_close(w, full, rtol=1e-9, atol=1e-12)
        assert bool((w.sum(dim=1) > 0).all())
    assert matched_cosine(full.numpy(), w_true).min() > 0.8


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_accelerated_updates_get_further_per_pass(planted, seed):
    """Repeating each factor's update within a pass (accelerated MU) reaches, in 10 passes, a
    lower error than 30 plain passes, and recovers the planted programs that 10 plain
    passes do not yet."""
    counts, w_true, _ = planted
    m = CellMatrix(sp.csr_matrix(counts))

    def result(passes: int, inner: int) -> tuple[float, float]:
        w = multiplicative_nmf(m, 4, passes, seed, inner_updates=inner)
        error = fit_error(m, w.numpy(), refit_usage(m, w, NNLS_ITER).numpy())["relative_error"]
        return error, matched_cosine(w.numpy(), w_true).min()

    (fast, fast_cos), (slow, _), (short, short_cos) = result(10, 10), result(30, 1), result(10, 1)
    assert fast < slow < short
    assert fast_cos > 0.995 > short_cos  # plain 10 passes: 0.64-0.91; accelerated: 0.998-0.999


def _reference_passes(x: np.ndarray, k: int, seeds, inner: int, tol: float, cap: int) -> int:
    """Passes the replicate runs take under ``tol``, recomputed in plain float64 numpy: each
    run's squared error at its new usage and the pass's programs, ``||X - U W^T||^2``."""
    from deltanmf.core.consensus import _generator

    scale = math.sqrt(max(math.sqrt((x**2).sum() / x.size), 1e-10) / k)
    runs = []
    for seed in seeds:  # the same seeded starts as the function
        gen = _generator(seed)
        w = (torch.rand(x.shape[1], k, generator=gen, dtype=torch.float64) * scale).numpy()
        u = (torch.rand(x.shape[0], k, generator=gen, dtype=torch.float64) * scale).numpy()
        runs.append([w, u])
    previous = None
    for passes in range(1, cap + 1):
        errors = []
        for run in runs:
            w, u = run
            for _ in range(inner):
                u = u * (x @ w) / np.maximum(u @ (w.T @ w), 1e-10)
            errors.append(((x - u @ w.T) ** 2).sum())
            run[1] = u
        errors = np.array(errors)
        if previous is not None and np.all(previous - errors <= tol * np.abs(previous)):
            return passes
        previous = errors
        for run in runs:
            w, u = run
            for _ in range(inner):
                w = w * (x.T @ u) / np.maximum(w @ (u.T @ u), 1e-10)
            run[0] = w
    return cap


@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("batch_size", [None, 57])
def test_replicates_stop_once_no_run_improves_by_tol(planted, sparse, batch_size, monkeypatch):
    """With ``tol`` the runs stop at the first pass that lowers no run's squared error by more
    than tol (relative), as recomputed independently; the programs are then those of the
    passes before, exactly as a run capped there gives. ``tol=0`` runs every pass."""
    import deltanmf.core.consensus as consensus_module

    counts, _, _ = planted
    x = counts.astype(np.float64)
    m = CellMatrix(sp.csr_matrix(x) if sparse else x, batch_size=batch_size, dtype=torch.float64)
    products = []
    real = consensus_module.matmul
    monkeypatch.setattr(consensus_module, "matmul", lambda *a: products.append(1) or real(*a))
    seeds, cap, tol = [3, 8], 40, 1e-3
    expected = _reference_passes(x, 4, seeds, inner=4, tol=tol, cap=cap)
    assert 2 < expected < cap  # the rule, not the cap, ends these runs

    blocks = 1 if batch_size is None else -(-x.shape[0] // batch_size)
    stopped = multiplicative_nmf_replicates(m, 4, cap, seeds, inner_updates=4, tol=tol)
    assert len(products) == expected * blocks  # one X W product per block per pass
    capped = multiplicative_nmf_replicates(m, 4, expected - 1, seeds, inner_updates=4)
    for a, b in zip(stopped, capped):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)

    products.clear()
    multiplicative_nmf_replicates(m, 4, 12, seeds, inner_updates=4, tol=0)
    assert len(products) == 12 * blocks


@pytest.mark.parametrize("key", ["iterations", "replicates"])
@pytest.mark.parametrize("bad", [0, -2, 1.5, True, "15"])
def test_consensus_passes_and_runs_must_be_whole_numbers(key, bad):
    """iterations=0 had run no pass at all and reported a meaningless stability. The
    settings of consensus_init (``model.consensus``) refuse it when they are built."""
    with pytest.raises(InputError, match=rf"model\.consensus\.{key}=.* must be a whole number >= 1"):
        consensus(**{"replicates": 2, "iterations": 2, key: bad})


@pytest.mark.parametrize("bad", [-1e-4, 1, 2.0, True, "1e-4", None])
def test_consensus_tol_must_be_a_number_in_0_1(bad):
    with pytest.raises(InputError, match=r"model\.consensus\.tol=.*must be a number in \[0, 1\)"):
        consensus(replicates=2, iterations=2, tol=bad)


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "10"])
def test_inner_updates_must_be_a_whole_number(bad):
    with pytest.raises(InputError, match=r"model\.consensus\.inner_updates="):
        consensus(replicates=2, iterations=2, inner_updates=bad)


def test_consensus_with_too_few_distinct_programs_is_named(planted):
    """Cells with no counts give runs with identical programs: a clear error, not a crash in
    the clustering."""
    counts, _, _ = planted
    empty = np.zeros_like(counts[:50])
    empty[:, 0] = 1.0  # one gene carries everything: every run finds the same program
    with pytest.raises(InputError, match="fewer than K=4 distinct programs"):
        consensus_init(CellMatrix(empty), 4, consensus(replicates=3, iterations=10), seed=0)


@pytest.fixture(scope="module")
def consensus_runs(planted):
    counts, _, _ = planted
    m = CellMatrix(counts)
    return {
        "a": consensus_init(m, 4, consensus(replicates=5), seed=0),
        "b": consensus_init(m, 4, consensus(replicates=5), seed=0),
        "c": consensus_init(m, 4, consensus(replicates=5), seed=1),
    }


def test_consensus_init_recovers_planted_programs(planted, consensus_runs):
    counts, w_true, usage_true = planted
    res = consensus_runs["a"]
    assert isinstance(res, ConsensusResult)
    assert res.programs.shape == (300, 4) and res.usage.shape == (400, 4)
    assert (res.programs >= 0).all() and (res.usage >= 0).all()
    assert torch.isfinite(res.programs).all() and torch.isfinite(res.usage).all()
    assert matched_cosine(res.programs.numpy(), w_true).min() >= 0.95
    # usage is the exact NNLS solution given the returned programs
    ref = _scipy_usage(res.programs.double().numpy(), counts[:40].astype(np.float64))
    assert _rel(res.usage[:40].numpy(), ref) < 1e-3
    # usage columns (in matched order) track the planted usage
    m = matching(res.programs.numpy(), w_true)
    for j in range(4):
        assert np.corrcoef(res.usage[:, m[j]].numpy(), usage_true[:, j])[0, 1] > 0.95


def test_consensus_init_bookkeeping(consensus_runs):
    res = consensus_runs["a"]
    assert res.replicate_programs.shape == (5 * 4, 300)
    np.testing.assert_allclose(res.replicate_programs.norm(dim=1).numpy(), 1.0, rtol=1e-5)
    assert res.kept.dtype == torch.bool and res.kept.shape == (5 * 4,)
    assert int(res.kept.sum()) >= 4
    assert res.labels.shape == (int(res.kept.sum()),)
    assert set(res.labels.tolist()) == {0, 1, 2, 3}
    from sklearn.metrics import silhouette_score
    pool = res.replicate_programs[res.kept].double().numpy()
    assert res.stability == pytest.approx(silhouette_score(pool, res.labels.numpy()), abs=1e-4)
    assert res.stability > 0.8  # a clean planted problem is stable


def test_consensus_init_seeding(consensus_runs):
    a, b, c = consensus_runs["a"], consensus_runs["b"], consensus_runs["c"]
    assert torch.equal(a.programs, b.programs)
    assert torch.equal(a.usage, b.usage)
    assert torch.equal(a.replicate_programs, b.replicate_programs)
    assert not torch.equal(a.replicate_programs, c.replicate_programs)
    # replicate r of seed s is replicate r-1 of seed s+1 (seed + r per replicate)
    torch.testing.assert_close(a.replicate_programs[4:], c.replicate_programs[:-4])


def test_consensus_init_minibatch_recovers_planted(planted):
    counts, w_true, _ = planted
    m = CellMatrix(sp.csr_matrix(counts), batch_size=128)
    res = consensus_init(m, 4, consensus(replicates=3, iterations=60), seed=2)
    assert (res.programs >= 0).all() and (res.usage >= 0).all()
    assert res.kept.shape == (3 * 4,)
    assert matched_cosine(res.programs.numpy(), w_true).min() >= 0.95
    res2 = consensus_init(m, 4, consensus(replicates=3, iterations=60), seed=2)
    assert torch.equal(res.programs, res2.programs)


def test_consensus_init_rejects_zero_replicates():
    # consensus_init takes its settings as ConsensusSettings, which refuse R=0 when built
    with pytest.raises(ValueError, match=r"model\.consensus\.replicates=0"):
        consensus(replicates=0)
