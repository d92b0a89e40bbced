"""Programs onto new cells: deltanmf.project and ``python -m deltanmf.project``."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

import deltanmf
from deltanmf.errors import InputError

ROOT = Path(__file__).resolve().parents[1]
FAST = ["trainer.enable_progress_bar=false", "trainer.accelerator=cpu", "model.consensus.replicates=3",
        "model.consensus.iterations=100", "trainer.max_steps=600", "logger=none"]


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    sim = deltanmf.simulate_case_control(n_genes=300, n_programs=5, n_case_programs=2, n_control=300, n_case=300,
                                         n_groups=2, markers_per_program=30, seed=1)
    out = tmp_path_factory.mktemp("project") / "run"
    result = deltanmf.fit_twostage(sim.copy(), K=5, K_case=2, out_dir=out,
                                   overrides=[*FAST, "data.normalize=median", "data.min_cells=5"])
    return sim, result.results, out


def test_a_run_projected_onto_its_own_cells_gives_its_usage(fitted):
    """The same genes, normalisation target and gene scale, the same NNLS: the usage the
    case-control statistics use (X_deltanmf_refit), and near the trained usage."""
    sim, result, out = fitted
    adata = sim.copy()
    usage = deltanmf.project(adata, out)
    assert list(usage.columns) == list(result.uns["deltanmf"]["program_names"])
    assert list(usage.index) == list(adata.obs_names) and adata.obsm["X_deltanmf"].shape == (600, 7)
    mine = usage.loc[result.obs_names].to_numpy()
    np.testing.assert_allclose(mine, result.obsm["X_deltanmf_refit"], rtol=1e-5, atol=1e-5)
    trained = result.obsm["X_deltanmf"]
    case = (result.obs["condition"] != "control").to_numpy()
    for j in range(7):
        assert np.corrcoef(mine[case, j], trained[case, j])[0, 1] > 0.95
    info = adata.uns["deltanmf"]
    assert list(info["program_kind"]) == ["baseline"] * 5 + ["case"] * 2
    assert info["projection"]["coverage"] == 1.0 and info["projection"]["genes_used"] == result.n_vars
    # its results.h5ad is the same source
    again = deltanmf.project(sim.copy(), out / "results" / "results.h5ad")
    np.testing.assert_array_equal(again.to_numpy(), usage.to_numpy())


def test_the_spectra_file_of_a_run_projects_as_the_run(fitted):
    """programs.spectra.tsv (scaled units, starCAT's layout) onto the cells the run fitted,
    normalised as the run did, with the gene scale computed on them (as starCAT does): the
    run's usage."""
    sim, result, out = fitted
    cells = result.obs_names
    from_run = deltanmf.project(sim.copy(), out).loc[cells]
    from_file = deltanmf.project(sim[cells].copy(), out / "results" / "programs.spectra.tsv", normalize="median")
    assert list(from_file.columns) == list(from_run.columns)
    np.testing.assert_allclose(from_file.to_numpy(), from_run.to_numpy(), rtol=2e-3, atol=1e-3 * from_run.values.max())


def test_new_data_with_other_id_versions_and_missing_genes(fitted):
    sim, result, out = fitted
    keep = np.arange(sim.n_vars) % 5 != 0  # a fifth of the genes missing
    new = sim[:200, keep].copy()
    new.var_names = [f"{g}.3" for g in new.var_names]
    usage = deltanmf.project(new, out, key_added="X_from_run")
    info = new.uns["from_run"]["projection"]
    assert 0.75 < info["coverage"] < 0.85 and info["genes_used"] == info["shared_genes"]
    reference = deltanmf.project(sim[:200].copy(), out)
    for j in range(5):
        assert np.corrcoef(usage.iloc[:, j], reference.iloc[:, j])[0, 1] > 0.95
    with pytest.raises(InputError, match=r"source: only \d+ of the \d+ genes .* < min_coverage=0.9"):
        deltanmf.project(new, out, min_coverage=0.9)


def test_a_run_fitted_on_raw_projects_from_raw(fitted, tmp_path):
    """A run that read .raw.X: new cells are read from their .raw too (by default), not from a
    log-normalised .X, and give the run's usage; two matrices named at once are refused."""
    sim = fitted[0][:, :120].copy()

    def with_raw(a):
        a = a.copy()
        a.raw = a  # counts in .raw, log-normalised values in .X, as after scanpy's usual steps
        a.X = np.log1p(np.asarray(a.X.todense() if hasattr(a.X, "todense") else a.X))
        return a

    out = tmp_path / "raw_run"
    result = deltanmf.fit_twostage(with_raw(sim), K=3, K_case=1, use_raw=True, out_dir=out,
                                   overrides=[*FAST, "data.normalize=median", "data.min_cells=5"]).results
    new = with_raw(sim)
    usage = deltanmf.project(new, out)
    np.testing.assert_allclose(usage.loc[result.obs_names].to_numpy(), result.obsm["X_deltanmf_refit"],
                               rtol=1e-5, atol=1e-5)
    from_x = deltanmf.project(new, out, use_raw=False)  # what the run would have given before
    assert not np.allclose(from_x.to_numpy(), usage.to_numpy(), rtol=0.1)
    new.layers["counts"] = new.raw.X.copy()
    with pytest.raises(InputError, match="layer='counts' and use_raw=True name two matrices"):
        deltanmf.project(new, out, layer="counts", use_raw=True)
    with pytest.raises(InputError, match="use_raw=True but adata has no .raw"):
        deltanmf.project(sim.copy(), out, use_raw=True)


def test_gene_ids_equal_once_versions_are_stripped_are_refused(fitted):
    sim, _, out = fitted
    new = sim[:50].copy()
    new.var_names = [f"{g}.{i % 2}" if i < 2 else g for i, g in enumerate(sim.var_names[:1].tolist() * 2
                                                                           + sim.var_names[2:].tolist())]
    with pytest.raises(InputError, match=r"gene ID \(from \.var, versions stripped\) names occur more than once"):
        deltanmf.project(new, out)


def test_deltanmf_project_is_the_function_also_once_the_module_is_imported(fitted):
    sim, _, out = fitted
    from deltanmf.tl.project import project

    if "deltanmf.project" not in sys.modules:  # nothing imported the command line's module yet
        assert deltanmf.project is project
    import deltanmf.project as command_line  # binds deltanmf.project to the module: it stays callable

    assert callable(deltanmf.project) and hasattr(command_line, "main")
    np.testing.assert_array_equal(deltanmf.project(sim.copy(), out).to_numpy(), project(sim.copy(), out).to_numpy())


def test_command_line(fitted, tmp_path, capsys):
    sim, _, out = fitted
    data = tmp_path / "cells.h5ad"
    sim.write_h5ad(data)
    proc = subprocess.run([sys.executable, "-m", "deltanmf.project", str(out), str(data), str(tmp_path / "out.h5ad"),
                           "--device", "cpu"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    written = ad.read_h5ad(tmp_path / "out.h5ad")
    expected = deltanmf.project(sim.copy(), out)
    np.testing.assert_array_equal(written.obsm["X_deltanmf"], expected.to_numpy())
    table = pd.read_csv(tmp_path / "out.usage.csv", index_col=0)
    np.testing.assert_allclose(table.to_numpy(), expected.to_numpy(), rtol=1e-6)
    from deltanmf.project import main

    assert main([str(tmp_path / "nothing.tsv"), str(data), str(tmp_path / "x.h5ad")]) == 2
    assert "deltanmf: error: source: file not found" in capsys.readouterr().err
    assert not (tmp_path / "x.h5ad").exists()


def test_project_refuses_a_missing_input_matrix_and_warns_on_values_that_are_not_counts(fitted, tmp_path, caplog):
    """A run fitted on a counts layer: new data without that layer is refused, naming the layer
    and the argument; a run fitted on counts projected onto log-normalised values warns."""
    import logging

    sim = fitted[0][:, :120].copy()
    counted = sim.copy()
    counted.layers["counts"] = counted.X.copy()
    out = tmp_path / "layer_run"
    deltanmf.fit_twostage(counted, K=3, K_case=1, layer="counts", out_dir=out,
                          overrides=[*FAST, "data.normalize=median", "data.min_cells=5"])
    with pytest.raises(InputError, match=r"fitted on the layer 'counts', which adata lacks.*layer=.*use_raw=False for .X"):
        deltanmf.project(sim.copy(), out)
    logged = sim.copy()
    logged.X = np.log1p(np.asarray(logged.X.todense() if hasattr(logged.X, "todense") else logged.X))
    with caplog.at_level(logging.WARNING):
        deltanmf.project(logged, out, use_raw=False)  # .X, asked for
    assert any("fitted on counts" in r.getMessage() and "not whole numbers" in r.getMessage()
               for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        deltanmf.project(counted, out)  # the run's own layer: no warning
    assert not any("fitted on counts" in r.getMessage() for r in caplog.records)
