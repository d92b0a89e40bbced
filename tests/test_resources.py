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


def test_the_prior_makes_the_programs_smoother_through_the_pipeline(tmp_path, data, similarity_files):
    s = similarity_from_embeddings(data.varm["sim_embedding"])
    matrix, genes = similarity_files(tmp_path, data.var_names, s)
    smooth = {}
    for alpha in (0.0, 0.3):
        res = deltanmf.fit_onestage(data.copy(), K=4, overrides=[
            *FAST, "resource=custom", f"resource.matrix={matrix}", f"resource.genes={genes}",
            f"model.stage1.rel_alpha={alpha}"])
        kept = data.var_names.get_indexer(res.programs.index)
        graph = GeneGraph(torch.from_numpy(s[np.ix_(kept, kept)]))
        fitted = np.asarray(res.results.varm["deltanmf_programs_scaled"])  # the units the prior acted in
        smooth[alpha] = float(graph.rayleigh(torch.as_tensor(fitted)).mean())
        assert res.metrics["stage1"]["loss"]["laplacian"] == pytest.approx(smooth[alpha], rel=1e-5)
    assert smooth[0.3] < smooth[0.0] - 0.01, smooth


def test_demo_resource_runs_and_records_coverage(make_cfg):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg, run_dir = make_cfg("stage=onestage", "resource=demo", "model.stage1.laplacian_steps=30",
                            "model.stage1.prior_from=converged")
    result = run(cfg, run_dir)
    stage1 = result.metrics["stage1"]
    assert result.metrics["resource"]["coverage"] == 1.0
    assert result.results.uns["deltanmf"]["resource"]["name"] == "demo"
    assert stage1["laplacian_alpha"] > 0 and stage1["converged"]
    assert stage1["laplacian_start_step"] > 0 and stage1["stop_reason"] in ("converged", "prior_steps")
    acc = EventAccumulator(str(run_dir / "tensorboard" / "stage1"))
    acc.Reload()
    assert {"train/loss", "train/recon", "train/laplacian", "train/alpha"} <= set(acc.Tags()["scalars"])
    curves = {name: acc.Scalars(f"train/{name}") for name in ("loss", "recon", "laplacian", "alpha")}
    # the curve starts at step 0 (Lightning writes every log_every_n_steps steps only), where the prior is off
    assert all(points[0].step == 0 for points in curves.values())
    assert curves["alpha"][0].value == 0 and curves["loss"][0].value == pytest.approx(curves["recon"][0].value)
    assert curves["alpha"][-1].value == pytest.approx(stage1["laplacian_alpha"], rel=1e-6)
    # the last step in TensorBoard and metrics.json: the same terms in the same units (metrics.json's
    # after the last update, over all cells in float64)
    for name in ("recon", "laplacian"):
        assert curves[name][-1].value == pytest.approx(stage1["loss"][name], rel=2e-3), name
    assert curves["loss"][-1].value == pytest.approx(stage1["loss"]["total"], rel=2e-3)


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
def test_built_from_a_published_format_the_prior_makes_the_programs_smoother(tmp_path, data, knn):
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
    smooth = {}
    for alpha in (0.0, 0.3):
        res = deltanmf.fit_onestage(data.copy(), K=4, overrides=[
            *FAST, "resource=custom", f"resource.matrix={matrix}", f"resource.genes={genes}",
            f"model.stage1.rel_alpha={alpha}"])
        assert res.metrics["resource"]["coverage"] == 1.0  # versions stripped on the resource side
        smooth[alpha] = res.metrics["stage1"]["loss"]["laplacian"]  # the normalised Rayleigh quotient
    assert smooth[0.3] < smooth[0.0] - 0.01, smooth


def _bad_similarity(problem: str, n: int = 30) -> np.ndarray:
    rng = np.random.default_rng(4)
    s = rng.random((n, n)) * (rng.random((n, n)) < 0.3)
    s = np.triu(s, 1)
    s = (s + s.T).astype(np.float32)
    if problem == "nan":
        s[3, 7] = s[7, 3] = np.nan
    elif problem == "negative":
        s[2, 5] = s[5, 2] = -0.4
    elif problem == "asymmetric":
        s[6, 1] = s[1, 6] + 0.25
    elif problem == "rounding":  # float32 rounding of a product: tolerated
        s[6, 1] = np.nextafter(s[1, 6], np.float32(2))
    return s


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
@pytest.mark.parametrize("problem, message", [
    ("nan", r"has 2 NaN or infinite entries among the data's genes"),
    ("negative", r"has 2 negative entries among the data's genes \(smallest -0\.4\)"),
    ("asymmetric", r"is not symmetric: S\[g(1, g6|6, g1)\] and S\[g(6, g1|1, g6)\] differ by 0\.25"),
])
def test_a_similarity_with_nan_negative_or_asymmetric_entries_is_refused(tmp_path, similarity_files, sparse,
                                                                         problem, message):
    genes = [f"g{i}" for i in range(30)]
    matrix, genes_file = similarity_files(tmp_path, genes, _bad_similarity(problem), sparse)
    resource = FileResource(str(matrix), str(genes_file), name="mine", build_command="python -m deltanmf.resources")
    with pytest.raises(InputError, match=message) as err:
        resource.graph(genes)
    text = str(err.value)
    assert f"resource 'mine': the similarity {matrix}" in text  # the file named
    assert "rebuild it (python -m deltanmf.resources)" in text and "S = (S + S.T) / 2" in text  # and the fix
    resource.graph(genes[8:])  # genes whose similarities are sound: only what enters the fit is checked


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_a_similarity_symmetric_up_to_rounding_is_accepted(tmp_path, similarity_files, sparse):
    genes = [f"g{i}" for i in range(30)]
    s = _bad_similarity("rounding")
    assert s[6, 1] != s[1, 6]
    matrix, genes_file = similarity_files(tmp_path, genes, s, sparse)
    graph = FileResource(str(matrix), str(genes_file)).graph(genes)
    np.testing.assert_allclose(graph.degree.numpy(), s.sum(axis=1), rtol=1e-6)


def test_replicates_with_the_prior_record_where_it_began(make_cfg):
    cfg, run_dir = make_cfg("stage=onestage", "resource=demo", "model.replicates=2", "logger=none")
    stage1 = run(cfg, run_dir).metrics["stage1"]
    starts = stage1["laplacian_start_step"]
    assert starts == [0, 0]  # prior_from=start: on from the first step in every replicate
    assert stage1["laplacian_alpha"] > 0 and "laplacian" in stage1["loss"]


def test_prior_from_start_acts_from_the_first_step(make_cfg):
    """prior_from=start: the prior is on from step 0 (alpha set against step 0's loss), the fit has
    one phase that ends on convergence, and laplacian_steps does not cut it short."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg, run_dir = make_cfg("stage=onestage", "resource=demo", "model.stage1.prior_from=start",
                            "model.stage1.laplacian_steps=5")
    stage1 = run(cfg, run_dir).metrics["stage1"]
    assert stage1["laplacian_start_step"] == 0 and stage1["laplacian_alpha"] > 0
    assert stage1["stop_reason"] == "converged" and stage1["steps"] > 5
    acc = EventAccumulator(str(run_dir / "tensorboard" / "stage1"))
    acc.Reload()
    alpha = acc.Scalars("train/alpha")
    assert alpha[0].step == 0 and alpha[0].value == pytest.approx(stage1["laplacian_alpha"], rel=1e-6)
