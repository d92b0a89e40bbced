"""Gene selection: highly variable genes on counts (data.n_top_genes) and a boolean .var
column (data.gene_mask_key), the same in memory and streamed."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from deltanmf.data import open_h5ad, prepare, simulate_case_control
from deltanmf.data.genes import ClippedVariance, expected_sd, gene_mask
from deltanmf.errors import InputError
from helpers import data


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    adata = simulate_case_control(n_genes=300, n_programs=5, n_case_programs=2, n_control=250, n_case=250,
                                  markers_per_program=20, seed=3)
    path = tmp_path_factory.mktemp("genes") / "sim.h5ad"
    adata.write_h5ad(path)
    return adata, path


def _seurat_v3(counts: np.ndarray, n_top: int) -> np.ndarray:
    """The recipe of deltanmf.data.genes on a dense matrix, written plainly (the expected SD
    from the module, whose local fit is checked on its own)."""
    mean, var = counts.mean(axis=0), counts.var(axis=0, ddof=1)
    sd = expected_sd(mean, var)
    z = (np.minimum(counts, mean + sd * np.sqrt(len(counts))) - mean) / sd
    score = (z**2).sum(axis=0) / (len(counts) - 1)  # centred at the unclipped mean, as Seurat does
    return np.sort(np.argsort(-score, kind="stable")[:n_top])


def test_expected_sd_follows_a_mean_variance_law():
    """LOWESS is local linear: on an exact power law log var = a + b log mean it returns the
    law itself; genes without variance get 1 (their standardised variance is 0 anyway)."""
    mean = np.geomspace(0.01, 100, 400)
    var = 2.0 * mean**1.5
    np.testing.assert_allclose(expected_sd(mean, var), np.sqrt(var), rtol=1e-6)
    with_constant = expected_sd(np.r_[mean, 5.0], np.r_[var, 0.0])
    assert with_constant[-1] == 1.0


@pytest.mark.parametrize("sparse", [True, False])
def test_clipped_variance_adds_up_blocks(sparse):
    rng = np.random.default_rng(0)
    counts = rng.poisson(rng.gamma(0.5, 2.0, size=(200, 30))).astype(np.float32)
    genes = np.array([3, 7, 8, 20, 29])
    mean, clip = counts[:, genes].mean(axis=0), np.full(5, 4.0)
    acc = ClippedVariance(genes, 30, mean, clip)
    for start in range(0, 200, 64):
        block = counts[start:start + 64]
        acc.add(sp.csr_matrix(block) if sparse else block)
    expected = ((np.minimum(counts[:, genes], clip) - mean) ** 2).sum(axis=0)
    np.testing.assert_allclose(acc.total(), expected, rtol=1e-10)


def test_highly_variable_genes_are_the_recipes_and_the_planted_markers(sim):
    """The genes kept are those of the plain recipe, over controls and cases pooled; on the
    simulator, where markers vary with usage and the rest only with library size, they are
    nearly all planted markers."""
    adata, _ = sim
    got = prepare(adata, data("condition", "control", n_top_genes=80, min_cells=0), use_case=True)
    assert got.n_genes == 80 and got.gene_counts["n_top_genes"] == 80
    expected = _seurat_v3(adata.X.toarray(), 80)
    assert list(got.var.index) == list(adata.var_names[expected])
    assert "deltanmf_variances_norm" in got.var and (got.var["deltanmf_variances_norm"] > 1).all()
    truth = np.hstack([adata.varm["sim_programs"], adata.varm["sim_case_programs"]])
    marker = (truth > np.median(truth, axis=1, keepdims=True) * (1 + 1e-9)).any(axis=1)
    assert marker[expected].mean() >= 0.9, marker[expected].mean()
    assert marker.mean() < 0.5  # far from what a random choice would give


@pytest.mark.parametrize("changes", [dict(n_top_genes=60), dict(n_top_genes=60, normalize="total", min_cells=30)])
def test_highly_variable_genes_streamed_equal_in_memory(sim, changes):
    adata, path = sim
    ref = prepare(adata, data("condition", "control", **changes), use_case=True)
    got = prepare(open_h5ad(path), data("condition", "control", **changes), use_case=True, pass_cells=64)
    assert list(got.var.index) == list(ref.var.index)
    np.testing.assert_allclose(got.var["deltanmf_variances_norm"], ref.var["deltanmf_variances_norm"], rtol=1e-9)
    np.testing.assert_array_equal(got.X.to_memory().toarray(), ref.X.toarray())


def test_more_top_genes_than_left_is_refused_with_the_numbers(sim):
    adata, _ = sim
    with pytest.raises(InputError, match=r"data.n_top_genes=5000 is more than the (\d+) genes left after filtering"):
        prepare(adata, data("condition", "control", n_top_genes=5000), use_case=True)


def test_gene_mask_keeps_its_genes_and_refuses_non_booleans(sim):
    adata, _ = sim
    adata = adata.copy()
    keep = np.zeros(adata.n_vars, dtype=bool)
    keep[::3] = True
    adata.var["keep"] = keep
    got = prepare(adata, data("condition", "control", gene_mask_key="keep", min_cells=0), use_case=True)
    assert list(got.var.index) == list(adata.var_names[keep]) and got.gene_counts["gene_mask"] == keep.sum()
    # then the most variable among them
    top = prepare(adata, data("condition", "control", gene_mask_key="keep", n_top_genes=20, min_cells=0),
                  use_case=True)
    assert set(top.var.index) <= set(adata.var_names[keep]) and top.n_genes == 20
    adata.var["score"] = keep.astype(int)
    with pytest.raises(InputError, match=r"must be a boolean column.*adata.var\['keep'\] = adata.var\['score'\] > 0"):
        gene_mask(adata.var, "score")
    with pytest.raises(InputError, match=r"data.gene_mask_key='highly_variable' is not a column of .var"):
        prepare(adata, data("condition", "control", gene_mask_key="highly_variable"), use_case=True)
