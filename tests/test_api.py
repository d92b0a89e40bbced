"""The Python API as a notebook user meets it: Python keyword names in errors, the summary
logged (or not), labelled tables, defaults from conf/, nothing heavy on import, and an
installed wheel that works outside the source tree."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

import deltanmf
from deltanmf.errors import InputError
from deltanmf.workflow.api import for_python

ROOT = Path(__file__).resolve().parents[1]
FAST = ["model.consensus.replicates=2", "model.consensus.iterations=30", "trainer.max_steps=100",
        "trainer.accelerator=cpu", "trainer.enable_progress_bar=false"]


def _small(**kw):
    args = dict(n_genes=200, n_programs=3, n_case_programs=1, n_control=120, n_case=80, markers_per_program=30,
                n_shifted=1, seed=3)
    return deltanmf.simulate_case_control(**{**args, **kw})


@pytest.mark.parametrize("message, expected", [
    ("data.layer=counts not found; the other matrices: data.layer=null (.X), data.use_raw=true (.raw)",
     "layer='counts' not found; the other matrices: layer=None (.X), use_raw=True (.raw)"),
    ("data.control='NTC': no cell has this value", "control='NTC': no cell has this value"),
    ("K=5000 must be smaller than both", "K=5000 must be smaller than both"),
    ("choose another directory (hydra.run.dir=...) or replace", "choose another directory (out_dir=...) or replace"),
    ("data.sample_key='donor' is not a column of .obs (...; data.sample_key=null tests cells as replicates)",
     "sample_key='donor' is not a column of .obs (...; sample_key=None tests cells as replicates)"),
    ("model.lr=0 must be a number > 0", "model.lr=0 must be a number > 0"),  # no keyword: as in overrides=[...]
])
def test_errors_name_this_apis_keywords(message, expected):
    assert for_python(message) == expected


@pytest.mark.smoke
def test_a_wrong_layer_is_refused_in_python_terms():
    adata = _small()
    with pytest.raises(InputError, match=r"^layer='counts' not found; the other matrices of this AnnData: "
                                         r"layer=None \(\.X\)$"):
        deltanmf.fit_onestage(adata, K=3, layer="counts", overrides=FAST)


@pytest.mark.smoke
def test_summary_logged_unless_quiet_and_tables_labelled(caplog):
    adata = _small()
    with caplog.at_level("INFO", logger="deltanmf"):
        result = deltanmf.fit_twostage(adata, K=3, K_case=1, overrides=FAST)
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("deltanmf")]
    assert any(line.startswith("stage 1: consensus initialisation of K=3 programs") for line in lines)
    assert any(line.startswith("summary: ") for line in lines)
    names = [f"baseline_{i}" for i in (1, 2, 3)] + ["case_1"]
    for table in (result.programs, result.usage, result.usage_refit):
        assert isinstance(table, pd.DataFrame) and list(table.columns) == names
    assert list(result.usage.index) == list(adata.obs_names)
    caplog.clear()
    with caplog.at_level("DEBUG"):
        deltanmf.fit_onestage(adata, K=3, overrides=FAST, verbose=False)
    assert not [r for r in caplog.records if r.name.startswith("deltanmf") and r.levelname == "INFO"]


def test_keywords_left_out_take_the_configurations_defaults():
    defaults = deltanmf.default_settings()
    result = deltanmf.fit_onestage(_small(), K=3, overrides=FAST)
    assert result.metrics["K"] == 3
    assert f"seed: {defaults.seed}" in result.results.uns["deltanmf"]["config"]
    assert f"condition_key: {defaults.data.condition_key}" in result.results.uns["deltanmf"]["config"]


@pytest.mark.smoke
def test_importing_deltanmf_loads_nothing_heavy():
    code = ("import sys, deltanmf, deltanmf.settings, deltanmf.workflow.config; "
            "heavy = [m for m in ('torch', 'lightning', 'matplotlib', 'anndata') if m in sys.modules]; "
            "print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def _can_build_wheels() -> bool:
    import importlib.util

    return importlib.util.find_spec("setuptools.command.bdist_wheel") is not None  # setuptools >= 70.1


@pytest.mark.slow
@pytest.mark.skipif(not _can_build_wheels(), reason="this environment's setuptools cannot build wheels offline")
def test_an_installed_wheel_works_outside_the_source_tree(tmp_path):
    """pip install of a wheel (not editable): the configuration ships inside the package, and
    fit_twostage runs from another directory."""
    wheels, target = tmp_path / "wheels", tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(wheels), str(ROOT)], check=True)
    wheel = next(wheels.glob("deltanmf-*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True)
    assert (target / "deltanmf" / "conf" / "config.yaml").is_file()
    code = ("import deltanmf, numpy as np; "
            "assert deltanmf.__file__.startswith(%r), deltanmf.__file__; "
            "a = deltanmf.simulate_case_control(n_genes=200, n_programs=3, n_case_programs=1, n_control=120, "
            "n_case=80, markers_per_program=30, n_shifted=1); "
            "r = deltanmf.fit_twostage(a, K=3, K_case=1, overrides=%r, verbose=False); "
            "print(r.programs.shape[1], r.usage_shift.shape[0])") % (str(target), FAST)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(target)
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["4", "3"]  # 3 baseline + 1 case programs; a shift test per baseline program


def test_api_errors_name_settings_without_a_keyword_as_overrides():
    from deltanmf.workflow.api import for_python

    message = for_python("replace them with overwrite=true; data.layer=counts not found")
    assert 'overrides=["overwrite=true"]' in message and "layer='counts'" in message
