"""Reference programs in (stage1_from a programs file): read, aligned by gene ID, put in the
run's units, frozen while stage 2 learns the case programs; bad files refused before any work."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

import deltanmf
from deltanmf.data import prepare
from deltanmf.data.reference import in_run_units, read_programs
from deltanmf.errors import InputError
from helpers import data

ROOT = Path(__file__).resolve().parents[1]
FAST = ["trainer.enable_progress_bar=false", "trainer.accelerator=cpu", "model.consensus.replicates=3",
        "model.consensus.iterations=100", "trainer.max_steps=600", "logger=none"]


@pytest.fixture(scope="module")
def sim():
    return deltanmf.simulate_case_control(n_genes=300, n_programs=5, n_case_programs=2, n_control=300, n_case=300,
                                          n_groups=2, markers_per_program=30, seed=1)


def _genes_by_programs(sim, path: Path, versioned: bool = True) -> Path:
    """The planted baseline programs (expression units) as a genes x programs CSV, gene IDs with
    an Ensembl version suffix the data does not have."""
    genes = [f"{g}.7" for g in sim.var_names] if versioned else list(sim.var_names)
    pd.DataFrame(sim.varm["sim_programs"], index=genes, columns=[f"T{i}" for i in range(1, 6)]).to_csv(path)
    return path


def test_a_reference_of_the_planted_programs_recovers_the_case_programs(sim, tmp_path):
    reference = _genes_by_programs(sim, tmp_path / "reference.csv")
    result = deltanmf.fit_twostage(sim.copy(), K_case=2, stage1_from=reference, out_dir=tmp_path / "run",
                                   overrides=FAST)
    names = list(result.results.uns["deltanmf"]["program_names"])
    assert names == ["T1", "T2", "T3", "T4", "T5", "case_1", "case_2"]
    found = result.metrics["recovery"]
    assert found["case_min"] >= 0.95 and found["baseline_min"] > 0.999, found  # the baseline is the reference
    assert found["shifts_called_correctly"] == found["shifts_planted"] and found["shifts_false"] == 0
    coverage = result.metrics["reference"]
    assert coverage["coverage"] == 1.0 and coverage["shared_genes"] == 300 and coverage["units"] == "expression"
    assert result.results.uns["deltanmf"]["reference"]["genes_used"] == result.results.n_vars
    assert result.metrics["stage1"]["from"] == str(reference)
    # frozen: the baseline columns are the reference on the kept genes, in expression units
    kept = sim.var_names.get_indexer(result.results.var_names)
    truth = sim.varm["sim_programs"][kept]
    fitted = result.programs.to_numpy()[:, :5]
    np.testing.assert_allclose(fitted / fitted.sum(axis=0), truth / truth.sum(axis=0), rtol=1e-4)


def test_every_layout_and_unit_gives_the_same_programs_in_run_units(sim, tmp_path):
    """A genes x programs CSV in expression units, a cNMF/starCAT spectra file (programs x genes,
    each gene in units of its standard deviation) and an .h5ad's .varm give the same frozen
    programs once put in the run's units."""
    prepared = prepare(sim, data(), use_case=True)
    truth = sim.varm["sim_programs"]
    expression = read_programs(_genes_by_programs(sim, tmp_path / "genes.csv"))
    assert expression.layout == "genes x programs" and expression.units == "expression"
    sd = pd.Series(prepared.gene_scale, index=prepared.var.index)
    scaled = pd.DataFrame(truth, index=sim.var_names).loc[sd.index].div(sd, axis=0) * 7.0  # any per-program scale
    scaled.T.set_axis([f"T{i}" for i in range(1, 6)]).to_csv(tmp_path / "ref.spectra.txt", sep="\t")
    spectra = read_programs(tmp_path / "ref.spectra.txt")
    assert spectra.layout == "programs x genes" and spectra.units == "scaled" and spectra.names[0] == "T1"
    holder = ad.AnnData(var=pd.DataFrame(index=sim.var_names))
    holder.varm["spectra"] = truth
    holder.write_h5ad(tmp_path / "ref.h5ad")
    varm = read_programs(tmp_path / "ref.h5ad", varm_key="spectra")
    assert varm.names == ["spectra_1", "spectra_2", "spectra_3", "spectra_4", "spectra_5"]
    ids = prepared.gene_ids
    want = in_run_units(expression, ids, prepared.gene_scale)
    np.testing.assert_allclose(want.sum(axis=0), 1, rtol=1e-5)
    np.testing.assert_allclose(in_run_units(spectra, ids, prepared.gene_scale), want, rtol=1e-5)
    np.testing.assert_allclose(in_run_units(varm, ids, prepared.gene_scale), want, rtol=1e-5)
    # units said outright win over the layout
    assert read_programs(tmp_path / "ref.spectra.txt", units="expression").units == "expression"


def _write(frame: pd.DataFrame, path: Path, **kwargs) -> Path:
    frame.to_csv(path, **kwargs)
    return path


BAD = {
    "negative": (lambda p, g: p.assign(T1=-p["T1"]), "negative values (the first at gene", "z-score spectra"),
    "nan": (lambda p, g: p.assign(T2=np.where(np.arange(len(p)) == 4, np.nan, p["T2"])), "1 NaN or infinite values",
            "drop those genes"),
    "duplicate": (lambda p, g: p.set_axis([g[0] + ".1", g[0] + ".2", *p.index[2:]]), "names 1 gene IDs more than once",
                  "Ensembl versions are stripped"),
    "no overlap": (lambda p, g: p.set_axis([f"GENE{i}" for i in range(len(p))]), "no gene of",
                   "Ensembl IDs (e.g. ENSG"),
    "low coverage": (lambda p, g: p.set_axis([*p.index[:90], *[f"GENE{i}" for i in range(len(p) - 90)]]),
                     "only 90 of the 300 genes", "stage1_min_coverage"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_programs_files_are_refused_before_any_work(sim, tmp_path, case):
    change, message, fix = BAD[case]
    programs = pd.DataFrame(sim.varm["sim_programs"], index=sim.var_names, columns=[f"T{i}" for i in range(1, 6)])
    path = _write(change(programs, list(sim.var_names)), tmp_path / "bad.csv")
    with pytest.raises(InputError) as err:
        deltanmf.fit_twostage(sim.copy(), K_case=2, stage1_from=path, out_dir=tmp_path / "run", overrides=FAST)
    assert message in str(err.value) and fix in str(err.value) and str(path) in str(err.value), str(err.value)
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())  # nothing written


def test_unreadable_files_and_a_disagreeing_k_are_refused(sim, tmp_path):
    good = _genes_by_programs(sim, tmp_path / "good.csv")
    cases = [
        (dict(stage1_from=good, K=4), "K=4 was given, but stage1_from="),
        (dict(stage1_from=_write(pd.DataFrame({"a": [1]}), tmp_path / "x.xlsx")), "cannot tell the format"),
        (dict(stage1_from=_write(pd.DataFrame({"T1": ["high", "low"]}, index=["g1", "g2"]), tmp_path / "t.tsv",
                                 sep="\t")), "columns that are not numbers"),
        (dict(stage1_from=tmp_path / "missing.tsv"), "file not found"),
    ]
    holder = ad.AnnData(var=pd.DataFrame(index=sim.var_names))
    holder.varm["spectra"] = sim.varm["sim_programs"]
    holder.write_h5ad(tmp_path / "ref.h5ad")
    cases += [(dict(stage1_from=tmp_path / "ref.h5ad"), "is not a DeltaNMF result"),
              (dict(stage1_from=tmp_path / "ref.h5ad", overrides=["stage1_varm_key=usage"]),
               "has no .varm['usage']; its .varm keys: ['spectra']")]
    for kwargs, message in cases:
        overrides = FAST + kwargs.pop("overrides", [])
        with pytest.raises(InputError, match="stage1_from") as err:
            deltanmf.fit_twostage(sim.copy(), K_case=2, overrides=overrides, **kwargs)
        assert message in str(err.value), (message, str(err.value))
        assert str(kwargs["stage1_from"]) in str(err.value)
    # K given and equal is fine, as is K left out (a test above)
    deltanmf.fit_twostage(sim.copy(), K=5, K_case=1, stage1_from=good, overrides=[*FAST, "trainer.max_steps=20"])


def test_the_command_line_exits_2_naming_the_file(sim, tmp_path):
    data_path = tmp_path / "screen.h5ad"
    sim.write_h5ad(data_path)
    programs = pd.DataFrame(-sim.varm["sim_programs"], index=sim.var_names)
    bad = _write(programs, tmp_path / "bad.csv")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "data=h5ad", f"data.path={data_path}",
                           f"stage1_from={bad}", "trainer.accelerator=cpu", f"hydra.run.dir={out}"],
                          cwd=ROOT, env=dict(os.environ), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"deltanmf: error: stage1_from: {bad} holds" in proc.stderr and "Traceback" not in proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["train.log"]
