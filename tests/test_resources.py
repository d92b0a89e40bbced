"""Similarity resources in use: gene-ID harmonisation, coverage, configs, dense vs sparse."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import deltanmf
from deltanmf.core import GeneGraph
from deltanmf.errors import InputError
from deltanmf.resources import FileResource, id_convention, similarity_from_embeddings, strip_version
from helpers import run

ROOT = Path(__file__).resolve().parents[1]
FAST = ["trainer.enable_progress_bar=false", "trainer.accelerator=cpu", "model.consensus.replicates=2",
        "model.consensus.iterations=60", "trainer.max_steps=400"]


def test_strip_version_and_id_convention():
    ids = ["ENSG00000141510.16", "ENSMUSG00000059552.3", "TP53", "ENSG00000141510"]
    assert [strip_version(g) for g in ids] == ["ENSG00000141510", "ENSMUSG00000059552", "TP53", "ENSG00000141510"]
    assert id_convention(["ENSG00000141510", "ENSG00000012048"]).startswith("Ensembl IDs")
    assert id_convention(["TP53", "BRCA1"]).startswith("gene symbols (e.g. TP53, BRCA1)")


@pytest.fixture(scope="module")
def data():
    return deltanmf.simulate_case_control(n_genes=240, n_programs=4, n_case_programs=1, n_control=240, n_case=120,
                                          markers_per_program=40, embedding_noise=0.2, seed=2)


def test_coverage_error_names_both_id_conventions(tmp_path, data, similarity_files):
    s = similarity_from_embeddings(data.varm["sim_embedding"])
    matrix, genes = similarity_files(tmp_path, data.var_names, s)
    symbols = data.copy()
    symbols.var_names = symbols.var["gene_symbol"].astype(str)
    with pytest.raises(InputError) as err:
        deltanmf.fit_onestage(symbols, K=4, overrides=[*FAST, "resource=custom", f"resource.matrix={matrix}",
                                                       f"resource.genes={genes}", "resource.min_coverage=0.5"])
    msg = str(err.value)
    assert "covers only 0 of the data's 240 genes" in msg
    assert "gene symbols (e.g. GENE1" in msg and "Ensembl IDs (e.g. ENSG" in msg and "data.gene_id_column" in msg
    # the fix the message names: match by a .var column with the resource's convention
    symbols.var["ensembl"] = [f"{g}.7" for g in data.var_names]  # versioned IDs are stripped
    res = deltanmf.fit_onestage(symbols, K=4, overrides=[*FAST, "resource=custom", f"resource.matrix={matrix}",
                                                         f"resource.genes={genes}", "resource.min_coverage=0.5",
                                                         "data.gene_id_column=ensembl"])
    assert res.metrics["resource"]["coverage"] == 1.0
    assert res.metrics["stage1"]["laplacian_alpha"] > 0


def test_dense_and_sparse_resources_give_the_same_fit(tmp_path, data, similarity_files):
    s = similarity_from_embeddings(data.varm["sim_embedding"])
    s[s < 0.3] = 0  # a sparse graph, stored both ways
    fits = {}
    for sparse in (False, True):
        matrix, genes = similarity_files(tmp_path / ("sparse" if sparse else "dense"), data.var_names, s, sparse)
        fits[sparse] = deltanmf.fit_onestage(data.copy(), K=4, overrides=[
            *FAST, "resource=custom", f"resource.matrix={matrix}", f"resource.genes={genes}",
            "model.stage1.rel_alpha=1.0", "model.stage1.laplacian_steps=50"])
    dense, sparse = fits[False].metrics["stage1"]["loss"], fits[True].metrics["stage1"]["loss"]
    assert dense["laplacian"] > 0
    for term in ("recon", "laplacian", "total"):
        np.testing.assert_allclose(sparse[term], dense[term], rtol=1e-4)


def test_the_prior_lowers_the_laplacian_through_the_pipeline(tmp_path, data, similarity_files):
    s = similarity_from_embeddings(data.varm["sim_embedding"])
    matrix, genes = similarity_files(tmp_path, data.var_names, s)
    graph = GeneGraph(torch.from_numpy(s))
    trace = {}
    for alpha in (0.0, 3.0):
        res = deltanmf.fit_onestage(data.copy(), K=4, overrides=[
            *FAST, "resource=custom", f"resource.matrix={matrix}", f"resource.genes={genes}",
            f"model.stage1.rel_alpha={alpha}"])
        w = torch.zeros(data.n_vars, 4)
        kept = data.var_names.get_indexer(res.programs.index)
        w[kept] = torch.as_tensor(res.programs.to_numpy())
        trace[alpha] = float(graph.trace(w))
    assert trace[3.0] < 0.9 * trace[0.0], trace


def test_demo_resource_runs_and_records_coverage(make_cfg):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg, run_dir = make_cfg("stage=onestage", "resource=demo", "model.stage1.laplacian_steps=30")
    result = run(cfg, run_dir)
    assert result.metrics["resource"]["coverage"] == 1.0
    assert result.results.uns["deltanmf"]["resource"]["name"] == "demo"
    assert result.metrics["stage1"]["laplacian_alpha"] > 0 and result.metrics["stage1"]["converged"]
    acc = EventAccumulator(str(run_dir / "tensorboard" / "stage1"))
    acc.Reload()
    assert {"train/laplacian", "train/alpha"} <= set(acc.Tags()["scalars"])


def test_missing_resource_files_exit_with_the_build_command(tmp_path):
    env = dict(os.environ, DELTANMF_CACHE_DIR=str(tmp_path / "cache"))
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "stage=twostage", "resource=scgpt", "K=20",
                           f"hydra.run.dir={tmp_path / 'out'}"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2
    assert "resources/scgpt/S_E_relu.npy" in proc.stderr
    assert "python -m deltanmf.resources scgpt" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_file_resource_errors():
    with pytest.raises(InputError, match="resource.matrix: resource 'x' file not found: /no/S.npy. Build it with: cmd"):
        FileResource("/no/S.npy", "/no/genes.json", name="x", build_command="cmd")


@pytest.mark.parametrize("knn", [None, 30], ids=["dense", "knn"])
def test_built_from_a_published_format_the_prior_lowers_the_laplacian(tmp_path, data, knn):
    """TranscriptFormer HDF5 -> `deltanmf.resources` build -> resource=custom fit."""
    import h5py

    from deltanmf.resources.build import build

    h5 = tmp_path / "tf.h5"
    with h5py.File(h5, "w") as f:  # the released layout: keys + one vector per ID
        f.create_dataset("keys", data=np.array([f"{g}.3" for g in data.var_names], dtype="S"))
        arrays = f.create_group("arrays")
        for g, vector in zip(data.var_names, data.varm["sim_embedding"]):
            arrays.create_dataset(f"{g}.3", data=vector)
    built = build("transcriptformer", tmp_path / "res", knn=knn, h5=h5)
    matrix, genes = built.paths
    trace = {}
    for alpha in (0.0, 3.0):
        res = deltanmf.fit_onestage(data.copy(), K=4, overrides=[
            *FAST, "resource=custom", f"resource.matrix={matrix}", f"resource.genes={genes}",
            f"model.stage1.rel_alpha={alpha}"])
        assert res.metrics["resource"]["coverage"] == 1.0  # versions stripped on the resource side
        trace[alpha] = res.metrics["stage1"]["loss"]["laplacian"]
    assert trace[3.0] < 0.9 * trace[0.0], trace
