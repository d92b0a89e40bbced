"""data.sample_key at the workflow's edge: a sample-aware run end to end, the tables in
results.h5ad, the cell-level warning, and bad designs refused before any training."""
from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

import deltanmf
from deltanmf.data.prepare import PreparedData
from deltanmf.errors import InputError
from deltanmf.tl.tables import CELL_WARNING, case_control_tables
from helpers import DEFAULTS, run

ROOT = Path(__file__).resolve().parents[1]
FAST = ["trainer.enable_progress_bar=false", "trainer.accelerator=cpu", "model.consensus.replicates=2",
        "model.consensus.iterations=50", "trainer.max_steps=100"]


def test_donor_demo_run_tests_across_samples_and_stores_the_tables(make_cfg, caplog):
    cfg, run_dir = make_cfg("experiment=donors", "data.simulation.n_groups=2")
    with caplog.at_level(logging.INFO):
        result = run(cfg, run_dir)
    shift = pd.read_csv(run_dir / "results" / "usage_shift.csv")
    assert (shift["test_unit"] == "sample").all() and (shift["test"] == "moderated_welch_t").all()
    assert not shift["underpowered"].any()  # 8 donors a side
    assert set(json.loads((run_dir / "results" / "metrics.json").read_text())["moderation"]["usage_shift"]) == \
        {"case", "control"}
    assert (shift["n_control_samples"] == 8).all() and (shift["n_case_samples"] == 8).all()
    assert (shift["ci_low"] <= shift["log2_fold_change"]).all() and (shift["log2_fold_change"] <= shift["ci_high"]).all()
    groups = pd.read_csv(run_dir / "results" / "group_usage.csv")
    assert set(groups["test_unit"]) == {"sample"} and (groups["n_control_samples"] == 8).all()
    assert (groups["n_case_samples"] <= 8).all() and groups["permutation_p_value"].isna().all()
    cases = pd.read_csv(run_dir / "results" / "case_programs.csv")
    assert (cases["test_unit"] == "sample").all()
    # the same tables in results.h5ad, read back
    stored = ad.read_h5ad(run_dir / "results" / "results.h5ad").uns["deltanmf"]
    for name, table in (("usage_shift", shift), ("case_programs", cases), ("group_usage", groups)):
        back = stored[name].reset_index(drop=True)
        assert list(back.columns) == list(table.columns), name
        pd.testing.assert_frame_equal(back, table, check_dtype=False, check_exact=False, rtol=1e-12)
        pd.testing.assert_frame_equal(back, result.tables[name].reset_index(drop=True), check_dtype=False)
    assert "data.sample_key" not in " ".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    assert any("8 samples (data.sample_key='sample')" in r.getMessage() for r in caplog.records)


def _prepared(n_per_sample=(12, 12, 12, 3), seed=0):
    """A tiny PreparedData with 4 control and 4 case samples (the last of each with few cells)."""
    rng = np.random.default_rng(seed)
    sizes = list(n_per_sample) * 2
    labels = np.concatenate([[f"{'c' if i < 4 else 'x'}{i % 4}"] * n for i, n in enumerate(sizes)])
    is_control = np.char.startswith(labels.astype(str), "c")
    x = rng.gamma(1.0, 1.0, (len(labels), 30)).astype(np.float32)
    obs = pd.DataFrame({"donor": labels, "condition": np.where(is_control, "control", "case")},
                       index=[f"cell{i}" for i in range(len(labels))])
    var = pd.DataFrame(index=[f"g{i}" for i in range(30)])
    return PreparedData(X=x, obs=obs, var=var, is_control=is_control, gene_scale=np.ones(30),
                        cell_scale=np.ones(len(labels)))


def test_cell_level_tables_warn_once_naming_sample_key(caplog):
    prepared = _prepared()
    programs = np.random.default_rng(1).gamma(1.0, 1.0, (30, 4)).astype(np.float32)
    names = ["baseline_1", "baseline_2", "baseline_3", "case_1"]
    args = dict(scores=programs, group_key=None, symbol_key=None, batch_size=None, nnls_iterations=20, device="cpu")
    with caplog.at_level(logging.INFO):
        tables, _, _ = case_control_tables(prepared, programs, names, 3, DEFAULTS.report, **args)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [CELL_WARNING] and "data.sample_key" in warnings[0]
    assert all((t["test_unit"] == "cell").all() for t in tables.values())
    caplog.clear()
    with caplog.at_level(logging.INFO):
        tables, _, _ = case_control_tables(prepared, programs, names, 3, DEFAULTS.report, sample_key="donor", **args)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    left_out = [r.getMessage() for r in caplog.records if "left out" in r.getMessage()]
    assert len(left_out) == 2 and "c3 (3 cells)" in left_out[0] and "x3 (3 cells)" in left_out[1]
    assert (tables["usage_shift"]["n_control_samples"] == 3).all()
    assert tables["usage_shift"]["permutation_p_value"].notna().all()  # 3 samples a side: exact permutations


def _screen(seed=0, n_donors=4):
    """A small simulated dataset with donors (4 per condition) and two perturbation groups."""
    return deltanmf.simulate_case_control(n_genes=120, n_programs=3, n_case_programs=1, n_control=160, n_case=160,
                                          n_groups=2, markers_per_program=20, n_control_samples=n_donors,
                                          n_case_samples=n_donors, sample_sigma=0.3, seed=seed)


def _refused(adata, tmp_path, match, *overrides, **kwargs):
    out = tmp_path / "out"
    with pytest.raises(InputError, match=match):
        deltanmf.fit_twostage(adata, K=3, K_case=1, out_dir=out, overrides=[*FAST, *overrides], **kwargs)
    # refused before any training: no checkpoint, no result
    assert not (out / "checkpoints").exists() and not (out / "results").exists()


def test_bad_sample_designs_are_refused_before_training(tmp_path):
    adata = _screen()
    _refused(adata, tmp_path, r"^sample_key='donor' is not a column of .obs.*sample_key=None tests cells",
             sample_key="donor")
    changed = adata.copy()
    changed.obs["mixed"] = np.where(np.arange(changed.n_obs) % 2, "d1", "d2")
    changed.obs["one"] = np.where(changed.obs["condition"] == "case", "all", changed.obs["sample"].astype(str))
    changed.obs["gap"] = changed.obs["sample"].astype(object)
    changed.obs.iloc[:3, changed.obs.columns.get_loc("gap")] = np.nan
    _refused(changed, tmp_path, r"'mixed': 2 samples hold both control and case cells.*belong to one condition",
             sample_key="mixed")
    _refused(changed, tmp_path, r"the case condition has 1 sample .*at least 2 per condition", sample_key="one")
    _refused(changed, tmp_path, r"'gap': 3 cells have no sample", sample_key="gap")
    _refused(adata, tmp_path, r"the control condition has 0 samples with at least report.min_cells_per_sample=1000",
             "report.min_cells_per_sample=1000", sample_key="sample")


def test_bad_covariates_are_refused_before_training(tmp_path):
    adata = _screen()
    donor = adata.obs["sample"].astype(str)
    adata.obs["sex"] = np.where(np.arange(adata.n_obs) % 2, "F", "M")  # varies within every donor
    adata.obs["status"] = adata.obs["condition"].astype(str)  # the condition itself
    adata.obs["site"] = np.where(donor.isin(["control_1", "control_2", "case_1", "case_2"]), "north", "south")
    adata.obs["missing"] = np.where(donor == "case_3", np.nan, 1.0)
    # guides as samples (one per target and donor); TARGET1's guides ran on lane L2, the control guides on L1,
    # TARGET2's on both: overall the lane does not follow the condition, within TARGET1's comparison it does
    case = (adata.obs["condition"] == "case").to_numpy()
    target = adata.obs["perturbation"].astype(str)
    adata.obs["guide"] = np.where(case, target + "_" + donor, donor)
    adata.obs["lane"] = np.where(~case, "L1", np.where(target == "TARGET1", "L2",
                                                        np.where(donor.isin(["case_1", "case_2"]), "L1", "L2")))
    _refused(adata, tmp_path, r"report.covariates=\[sex\] are properties of samples: set data.sample_key",
             "report.covariates=[sex]")
    _refused(adata, tmp_path, r"report.covariates: 'sex' varies within samples", "report.covariates=[sex]",
             sample_key="sample")
    _refused(adata, tmp_path, r"report.covariates: 'age' is not a column of .obs", "report.covariates=[age]",
             sample_key="sample")
    _refused(adata, tmp_path, r"'missing' is missing \(NaN\) for 40 cells", "report.covariates=[missing]",
             sample_key="sample")
    _refused(adata, tmp_path, r"\['status'\] are collinear with the condition.*drop the covariate",
             "report.covariates=[status]", sample_key="sample")
    _refused(adata, tmp_path, r"collinear with membership of 1 group of group_key='perturbation' \('TARGET1'\)",
             "report.covariates=[lane]", sample_key="guide", group_key="perturbation")
    # a covariate that is a property of the donors and not the condition passes the checks
    result = deltanmf.fit_twostage(adata, K=3, K_case=1, sample_key="sample", group_key="perturbation",
                                   overrides=[*FAST, "report.covariates=[site]"])
    assert (result.usage_shift["test"] == "moderated_ols").all()
    assert (result.group_usage["test_unit"] == "sample").all()


def test_train_py_refuses_a_missing_sample_key_with_exit_code_2(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "data.sample_key=donor", "K=3",
                           "data.simulation.n_genes=120", "data.simulation.n_programs=3", "data.simulation.n_control=60",
                           "data.simulation.n_case=60", "data.simulation.markers_per_program=20",
                           f"data.cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={tmp_path / 'out'}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "deltanmf: error: data.sample_key='donor' is not a column of .obs" in proc.stderr
    assert not (tmp_path / "out" / "checkpoints").exists()


@pytest.mark.slow
def test_donors_demo_calls_the_planted_shifts_across_samples_where_cells_call_donor_noise(tmp_path):
    """``python train.py experiment=donors`` at full size, and the same data tested across cells."""
    import json

    recovery = {}
    for unit, extra in (("sample", []), ("cell", ["data.sample_key=null"])):
        proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "experiment=donors", *extra, "logger=none",
                               f"data.cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={tmp_path / unit}",
                               "trainer.enable_progress_bar=false"], capture_output=True, text=True, timeout=3000)
        assert proc.returncode == 0, proc.stderr[-3000:]
        recovery[unit] = json.loads((tmp_path / unit / "results" / "metrics.json").read_text())["recovery"]
        shift = pd.read_csv(tmp_path / unit / "results" / "usage_shift.csv")
        assert (shift["test_unit"] == unit).all()
    assert recovery["sample"]["shifts_called_correctly"] == recovery["sample"]["shifts_planted"] == 3
    assert recovery["sample"]["shifts_false"] == 0
    assert recovery["cell"]["shifts_false"] > 0  # cells as replicates: donor noise called as shifts


@pytest.mark.slow
def test_sample_level_calibration_holds_through_counts_and_nnls():
    """Pseudo-splits of 16 control donors, with the usage measured as the tables measure it:
    Poisson counts refitted by NNLS on the planted programs (exact zeros, noise)."""
    import torch
    from scipy import stats

    from deltanmf.core import CellMatrix, refit_usage
    from deltanmf.tl.casecontrol import usage_shift_table

    seeds, p_values = 100, []
    for seed in range(seeds):
        sim = deltanmf.simulate_case_control(n_genes=300, n_programs=6, n_case_programs=0, n_control=1600, n_case=16,
                                             n_groups=1, n_shifted=0, markers_per_program=30, n_control_samples=16,
                                             n_case_samples=1, sample_sigma=0.5, seed=seed)
        control = (sim.obs["condition"] == "control").to_numpy()
        truth = deltanmf.simulation_truth(sim)
        matrix = CellMatrix(sim.X[control].astype(np.float32), batch_size=None, device="cpu")
        usage = refit_usage(matrix, torch.from_numpy(truth.programs.astype(np.float32)), 100).numpy()
        donor = sim.obs["sample"].astype(str).to_numpy()[control]
        pseudo = np.isin(donor, np.random.default_rng(seed).permutation(np.unique(donor))[:8])
        table = usage_shift_table(usage[~pseudo], usage[pseudo], [f"b{i}" for i in range(6)], 6,
                                  control_samples=donor[~pseudo], case_samples=donor[pseudo])
        p_values.append(table["p_value"].to_numpy()[seed % 6])
    p_values = np.array(p_values)
    assert stats.kstest(p_values, "uniform").pvalue > 0.01
    assert (p_values < 0.05).mean() < 0.05 + 3 * np.sqrt(0.05 * 0.95 / seeds)
