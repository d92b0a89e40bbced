"""Reading programs: the specificity score, and the top genes it ranks (planted markers first,
ubiquitous genes not)."""
from __future__ import annotations

import importlib

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import deltanmf
from deltanmf.core import matching
from deltanmf.data import open_h5ad, prepare
from deltanmf.tl.programs import specificity, top_genes_table
from helpers import data, run

FAST = ["trainer.enable_progress_bar=false", "trainer.accelerator=cpu", "model.consensus.replicates=3",
        "model.consensus.iterations=100", "trainer.max_steps=600", "logger=none"]


def _markers(programs: np.ndarray) -> np.ndarray:
    """Genes x programs: a planted program's markers, the genes it weighs above the shared
    background (deltanmf.data.generative.make_programs: every other program has the background)."""
    return programs > np.median(programs, axis=1, keepdims=True) * (1 + 1e-9)


def _ols(x: np.ndarray, usage: np.ndarray) -> np.ndarray:
    """The score written plainly: z-scores regressed on usage shares by numpy's least squares."""
    shares = usage / usage.sum(axis=1, keepdims=True)
    z = (x - x.mean(axis=0)) / x.std(axis=0, ddof=1)
    return np.linalg.lstsq(shares, z, rcond=None)[0].T


@pytest.mark.parametrize("pass_stored", [None, 53])  # 53: the sparse matrix passed over in pieces of rows
def test_specificity_is_the_regression_of_z_scores_on_usage_shares(tmp_path, monkeypatch, pass_stored):
    if pass_stored is not None:
        monkeypatch.setattr(importlib.import_module("deltanmf.core.matrix"), "PASS_STORED", pass_stored)
    rng = np.random.default_rng(0)
    usage = rng.gamma(0.5, 1.0, size=(300, 4))
    programs = rng.gamma(0.3, 1.0, size=(40, 4))
    x = rng.poisson(usage @ programs.T * 3).astype(np.float32)
    x[:, 5] = 2.0  # a constant gene scores 0
    expected = _ols(np.delete(x, 5, axis=1).astype(np.float64), usage)
    for matrix in (x, sp.csr_matrix(x)):
        got = specificity(matrix, usage)
        np.testing.assert_allclose(np.delete(got, 5, axis=0), expected, rtol=1e-8, atol=1e-10)
        assert np.all(got[5] == 0)
    # streamed rows, and a cell with no usage left out
    adata = ad.AnnData(sp.csr_matrix(x), obs=pd.DataFrame({"condition": ["control"] * 300},
                                                         index=[f"c{i}" for i in range(300)]))
    adata.var_names = [f"g{i}" for i in range(40)]
    adata.write_h5ad(tmp_path / "x.h5ad")
    rows = prepare(open_h5ad(tmp_path / "x.h5ad"), data(min_cells=0, scale_genes=False), use_case=False).X
    zero = usage.copy()
    zero[7] = 0
    kept = np.arange(300) != 7
    np.testing.assert_allclose(np.delete(specificity(rows, zero), 5, axis=0),
                               _ols(np.delete(x[kept], 5, axis=1).astype(np.float64), usage[kept]), rtol=1e-8)


def _with_housekeeping(n_genes: int = 15, seed: int = 0):
    """Simulated counts with little library-size variation, plus genes every cell expresses
    highly at a steady share of its counts (the ribosomal genes of real data)."""
    sim = deltanmf.simulate_case_control(n_genes=300, n_programs=5, n_case_programs=1, n_control=400, n_case=50,
                                         markers_per_program=30, library_sigma=0.1, seed=2)
    rng = np.random.default_rng(seed)
    library = np.asarray(sim.X.sum(axis=1)).ravel()
    counts = rng.poisson(library[:, None] * rng.uniform(0.02, 0.05, size=n_genes)[None, :]).astype(np.float32)
    var = pd.DataFrame(index=[*sim.var_names, *[f"RPS{i}" for i in range(n_genes)]])
    adata = ad.AnnData(sp.hstack([sim.X, sp.csr_matrix(counts)], format="csr"), obs=sim.obs.copy(), var=var)
    return sim, adata


@pytest.mark.smoke
def test_ubiquitous_genes_lead_by_weight_but_markers_lead_by_specificity():
    """The failure the score fixes: steadily expressed genes fill the top of every program by
    weight (in the fitted units, the old ranking, and in expression units); by specificity the
    top genes are the planted markers and no ubiquitous gene."""
    sim, adata = _with_housekeeping()
    result = deltanmf.fit_onestage(adata, K=5, overrides=FAST).results
    ubiquitous = result.var_names.str.startswith("RPS")
    position = sim.var_names.get_indexer(result.var_names)
    planted = sim.varm["sim_programs"]
    marker = _markers(np.hstack([planted, sim.varm["sim_case_programs"]]))[:, :5]
    fitted = matching(result.varm["deltanmf_programs"][~ubiquitous], planted[position[~ubiquitous]])

    def top10(key, j):
        return np.argsort(-result.varm[key][:, j], kind="stable")[:10]

    for j in range(5):
        assert ubiquitous[top10("deltanmf_programs_scaled", j)].sum() >= 5
        assert ubiquitous[top10("deltanmf_programs", j)].sum() >= 3
    for planted_j, j in enumerate(fitted):
        top = top10("deltanmf_specificity", j)
        assert not ubiquitous[top].any()
        assert marker[position[top], planted_j].all()
    table = top_genes_table(result.varm["deltanmf_specificity"], result.varm["deltanmf_programs"],
                            list(result.uns["deltanmf"]["program_names"]), result.var_names, n=10)
    assert not table["gene"].str.startswith("RPS").any()


def test_demo_top_genes_are_the_planted_markers(make_cfg):
    """On the demo (two stages), top_genes.csv's first genes of each program, baseline and case,
    are markers of the planted program it matches; case_programs.csv lists the same genes."""
    cfg, run_dir = make_cfg("logger=none")
    run(cfg, run_dir)
    result = ad.read_h5ad(run_dir / "results" / "results.h5ad")
    top = pd.read_csv(run_dir / "results" / "top_genes.csv")
    truth = deltanmf.simulation_truth(_demo(cfg)[:, result.var_names])
    names = list(result.uns["deltanmf"]["program_names"])
    for fitted, planted, k in ((result.varm["deltanmf_programs"][:, :5], truth.programs, 0),
                               (result.varm["deltanmf_programs"][:, 5:], truth.case_programs, 5)):
        marker = _markers(np.hstack([truth.programs, truth.case_programs]))[:, k:k + planted.shape[1]]
        for p, j in enumerate(matching(fitted, planted)):
            genes = top[(top["program"] == names[k + j]) & (top["rank"] <= 10)]["gene"]
            assert marker[result.var_names.get_indexer(genes), p].all(), (names[k + j], list(genes))
    cases = pd.read_csv(run_dir / "results" / "case_programs.csv")
    for name, listed in zip(cases["program"], cases["top_genes"]):
        assert listed.split(";") == list(top[(top["program"] == name) & (top["rank"] <= 10)]["symbol"])


def _demo(cfg):
    from deltanmf.data import load_input
    from deltanmf.workflow.config import load_settings

    return load_input(load_settings(cfg).data)


def test_top_genes_table_ranks_by_score_and_reports_the_weight():
    scores = np.array([[0.1, 2.0], [3.0, -1.0], [0.5, 0.0], [0.5, 1.0]])
    weights = np.arange(8.0).reshape(4, 2)
    table = top_genes_table(scores, weights, ["a", "b"], ["g0", "g1", "g2", "g3"], ["S0", "S1", "S2", "S3"], n=3)
    assert list(table.columns) == ["program", "rank", "gene", "symbol", "specificity", "weight"]
    assert list(table["gene"][:3]) == ["g1", "g2", "g3"]  # ties in file order
    assert list(table["gene"][3:]) == ["g0", "g3", "g2"]
    assert list(table["weight"][:3]) == [2.0, 4.0, 6.0] and list(table["symbol"][3:]) == ["S0", "S3", "S2"]
