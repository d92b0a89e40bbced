"""The Hydra app: composition, every output written, bad input exits with one message."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

from deltanmf.data import simulate_case_control
from deltanmf.workflow.config import load_settings
from helpers import run

ROOT = Path(__file__).resolve().parents[1]
OUTPUTS = ["results/results.h5ad", "results/programs.csv", "results/programs.spectra.tsv", "results/usage.csv",
           "results/top_genes.csv", "results/metrics.json", "checkpoints/stage1.ckpt"]


def test_config_composes_with_overrides(make_cfg):
    cfg, _ = make_cfg("K=7", "data.batch_size=128", "model.lr=0.005", "stage=onestage")
    settings = load_settings(cfg)
    assert settings.K == 7 and settings.data.batch_size == 128
    assert settings.model.lr == 0.005  # one learning rate, for both stages' modules
    assert settings.trainer["accelerator"] == "cpu" and "_target_" not in settings.trainer
    assert settings.resource is None and settings.stage.name == "onestage" and not settings.twostage
    settings = load_settings(make_cfg()[0])
    assert settings.twostage and settings.K_case == 3 and settings.stage1_from is None
    assert settings.data.path is None and settings.data.simulation["n_programs"] == 5


@pytest.mark.smoke
def test_onestage_demo_run_writes_every_output(make_cfg):
    cfg, run_dir = make_cfg("stage=onestage")
    metrics = run(cfg, run_dir).metrics
    for name in OUTPUTS:
        assert (run_dir / name).is_file(), name
    assert (run_dir / "results").is_symlink() and len(list((run_dir / ".results").iterdir())) == 1

    result = ad.read_h5ad(run_dir / "results" / "results.h5ad")
    assert result.X is None
    assert result.n_obs == 250 and (result.obs["condition"] == "control").all()
    assert result.obsm["X_deltanmf"].shape == (250, 5)
    assert result.varm["deltanmf_programs"].shape == (result.n_vars, 5)
    info = result.uns["deltanmf"]
    assert list(info["program_names"]) == [f"baseline_{i}" for i in range(1, 6)]
    assert list(info["program_kind"]) == ["baseline"] * 5
    assert "K: 5" in info["config"]
    assert info["gene_counts"]["input"] == 300 and info["gene_counts"]["min_cells"] == result.n_vars
    assert set(info["loss"]["stage1"]) >= {"recon", "total"}
    assert (result.var["deltanmf_gene_scale"] > 0).all()

    # programs.csv in expression units: the fitted (scaled) programs times each gene's scale
    programs = pd.read_csv(run_dir / "results" / "programs.csv", index_col=0)
    np.testing.assert_allclose(programs.to_numpy(), result.varm["deltanmf_programs"], rtol=1e-5)
    np.testing.assert_allclose(result.varm["deltanmf_programs"], result.varm["deltanmf_programs_scaled"]
                               * result.var["deltanmf_gene_scale"].to_numpy()[:, None], rtol=1e-5)
    assert list(programs.index) == list(result.var_names)
    spectra = pd.read_csv(run_dir / "results" / "programs.spectra.tsv", sep="\t", index_col=0)  # as starCAT reads it
    assert list(spectra.index) == list(info["program_names"]) and list(spectra.columns) == list(result.var_names)
    np.testing.assert_allclose(spectra.to_numpy().T, result.varm["deltanmf_programs_scaled"], rtol=1e-5)
    usage = pd.read_csv(run_dir / "results" / "usage.csv", index_col=0)
    assert list(usage.index) == list(result.obs_names)
    top = pd.read_csv(run_dir / "results" / "top_genes.csv")
    assert list(top.columns) == ["program", "rank", "gene", "symbol", "specificity", "weight"]
    assert len(top) == 5 * 50
    first = top[top["program"] == "baseline_1"]
    assert first["specificity"].is_monotonic_decreasing and first["rank"].tolist() == list(range(1, 51))
    position = result.var_names.get_indexer(first["gene"])
    np.testing.assert_allclose(first["weight"], result.varm["deltanmf_programs"][position, 0], rtol=1e-5)
    np.testing.assert_allclose(first["specificity"], result.varm["deltanmf_specificity"][position, 0], rtol=1e-5)

    saved = json.loads((run_dir / "results" / "metrics.json").read_text())
    assert saved["stage1"]["steps"] == metrics["stage1"]["steps"] > 0
    assert 0 < saved["stage1"]["relative_error"] < 1
    assert len(saved["recovery"]["baseline_matched_cosine"]) == 5
    assert saved["recovery"]["baseline_min"] >= 0.95
    events = list((run_dir / "tensorboard" / "stage1").glob("events.out.tfevents.*"))
    assert events


def test_tensorboard_has_the_loss_terms(make_cfg):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg, run_dir = make_cfg("model.stage2.rel_gamma=0.1")
    run(cfg, run_dir)
    for stage, terms in (("stage1", {"train/loss", "train/recon"}),
                         ("stage2", {"train/loss", "train/recon", "train/ortho"})):
        acc = EventAccumulator(str(run_dir / "tensorboard" / stage))
        acc.Reload()
        assert terms <= set(acc.Tags()["scalars"]), stage
        assert len(acc.Scalars("train/loss")) >= 2


@pytest.mark.smoke
def test_twostage_demo_run_writes_every_output(make_cfg):
    cfg, run_dir = make_cfg()
    metrics = run(cfg, run_dir).metrics
    for name in [*OUTPUTS, "checkpoints/stage2.ckpt", *(f"results/{f}" for f in (
            "usage_shift.csv", "case_programs.csv", "group_usage.csv", "usage_share.png", "group_usage.png",
            "top_genes.png", "program_similarity.png"))]:
        assert (run_dir / name).is_file(), name
    result = ad.read_h5ad(run_dir / "results" / "results.h5ad")
    assert result.n_obs == 500 and result.obsm["X_deltanmf"].shape == (500, 8)
    assert list(result.uns["deltanmf"]["program_kind"]) == ["baseline"] * 5 + ["case"] * 3
    assert "deltanmf_novelty" in result.obs and "stage2" in result.uns["deltanmf"]
    shift = pd.read_csv(run_dir / "results" / "usage_shift.csv")
    assert list(shift["program"]) == [f"baseline_{i}" for i in range(1, 6)]
    assert {"control_share", "case_share", "log2_fold_change", "p_value", "q_value", "control_total_share",
            "case_total_share", "shift"} <= set(shift.columns)
    groups = pd.read_csv(run_dir / "results" / "group_usage.csv")
    assert len(groups) == 3 * 8 and set(groups["group"]) == {"TARGET1", "TARGET2", "TARGET3"}
    saved = json.loads((run_dir / "results" / "metrics.json").read_text())
    assert saved["stage2"]["explained_variance_gain"] > 0
    assert saved["recovery"]["shifts_planted"] == 3 and "case_matched_cosine" in saved["recovery"]
    assert metrics["stage2"]["steps"] > 0


def _train(*args, cwd=ROOT, env_extra=None):
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def test_train_py_on_a_user_h5ad(tmp_path):
    adata = simulate_case_control(n_genes=200, n_programs=4, n_case_programs=1, n_control=200, n_case=60,
                                  markers_per_program=30, seed=5)
    adata.obs["guide"] = np.where(adata.obs["condition"] == "control", "NTC", "KO").astype(str)
    adata.layers["counts"] = adata.X.copy()
    adata.X = adata.X * 0  # the layer, not .X, must be used
    path = tmp_path / "screen.h5ad"
    adata.write_h5ad(path)
    out = tmp_path / "out"
    proc = _train("stage=onestage", "K=4", "data=h5ad", f"data.path={path}", "data.layer=counts",
                  "data.condition_key=guide", "data.control=NTC", "data.batch_size=64",
                  "model.consensus.replicates=2", "model.consensus.iterations=60", "trainer.max_steps=200",
                  "trainer.accelerator=cpu", f"hydra.run.dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = ad.read_h5ad(out / "results" / "results.h5ad")
    assert result.n_obs == 200 and set(result.obs["guide"]) == {"NTC"}
    assert result.varm["deltanmf_programs"].shape[1] == 4
    metrics = json.loads((out / "results" / "metrics.json").read_text())
    assert metrics["recovery"]["baseline_min"] >= 0.9  # the simulated truth travels in the file
    assert (out / ".hydra" / "config.yaml").exists() and (out / "train.log").exists()
    assert not (ROOT / "screen.h5ad").exists()
    assert "litlogger" not in proc.stdout + proc.stderr  # no advertising in a user's log


BAD_INPUT = [
    (["data=h5ad", "data.path=/no/such/file.h5ad"], "file not found: /no/such/file.h5ad"),
    (["data.condition_key=guide"], "data.condition_key='guide' is not a column of .obs"),
    (["data.control=NTC"], "data.control='NTC': no cell has this value"),
    (["K=5000"], "K=5000 must be smaller than"),
    (["K_case=0"], "K_case=0: stage=twostage needs at least 1 case program"),
    (["data.group_key=guide"], "data.group_key='guide' is not a column of .obs"),
    (["data.symbol_key=symbol"], "data.symbol_key='symbol' is not a column of .var"),
    (["data.path=/no/such/file.h5ad"], "was given with the demo's data settings; add data=h5ad"),
    (["data.simulation.n_genes=50"], "data.simulation: n_genes"),
    (["data.transposed_copy=maybe"], "data.transposed_copy=maybe must be one of auto, true, false"),
    (["model.consensus.tol=2"], "model.consensus.tol=2 must be a number in [0, 1)"),
    (["model.stop.patience=0"], "model.stop.patience=0 must be a whole number >= 1 (checks without progress"),
    (["+k=20"], "unknown setting k (did you mean K?)"),  # Hydra's own hint for k=20 leads here
    (["K=2.5"], "K=2.5 must be a whole number >= 1"),
    (["data.n_top_genes=100000"], "data.n_top_genes=100000 is more than the"),
]


@pytest.mark.smoke
@pytest.mark.parametrize("args, message", BAD_INPUT)
def test_bad_input_exits_with_one_clear_message(make_cfg, capsys, args, message):
    """In process, as train.py runs it: exit code 2, the message on one line, nothing written."""
    from deltanmf.workflow import main as cli

    cfg, run_dir = make_cfg(*args, "experiment=quick", small="data=h5ad" not in args)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(cfg)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("deltanmf: error: ") and message in err[0]
    assert not run_dir.exists() or not any(run_dir.iterdir())  # caught before any work


def test_bad_input_on_the_command_line_leaves_only_the_log(tmp_path, cache_dir):
    """The same exit path through train.py (one case): Hydra's log holds the error, nothing else is written."""
    args, message = BAD_INPUT[2]
    proc = _train(*args, "experiment=quick", "trainer.accelerator=cpu", f"data.cache_dir={cache_dir}",
                  f"hydra.run.dir={tmp_path / 'out'}")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"deltanmf: error: {proc.stderr.split('deltanmf: error: ')[1].strip()}"]
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["train.log"]
    assert message in (tmp_path / "out" / "train.log").read_text()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_trainer_gpu_without_a_gpu_is_a_settings_error(tmp_path, cache_dir):
    out = tmp_path / "out"
    proc = _train("trainer=gpu", "experiment=quick", "stage=onestage", f"data.cache_dir={cache_dir}",
                  f"hydra.run.dir={out}")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "the trainer settings cannot run here: No supported gpu backend found!" in proc.stderr
    assert "trainer=cpu never does" in proc.stderr and "Traceback" not in proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["train.log"]  # refused before any work


def test_a_refused_command_leaves_the_runs_record_alone(tmp_path, cache_dir):
    out = tmp_path / "out"
    common = ["stage=onestage", "experiment=quick", "model.consensus.replicates=2", "trainer.accelerator=cpu",
              f"data.cache_dir={cache_dir}", f"hydra.run.dir={out}"]
    proc = _train("K=4", *common)
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = {f.name: f.read_bytes() for f in (out / ".hydra").iterdir()}
    assert set(record) == {"config.yaml", "hydra.yaml", "overrides.yaml"} and b"K=4" in record["overrides.yaml"]
    results = (out / "results" / "results.h5ad").read_bytes()
    for refused in (["K=5"], ["K=5", "resume=true"]):  # the results exist; resume: the run has finished
        proc = _train(*refused, *common)
        assert proc.returncode == 2 and "deltanmf: error:" in proc.stderr, proc.stderr[-2000:]
        assert {f.name: f.read_bytes() for f in (out / ".hydra").iterdir()} == record  # still says K=4
        assert (out / "results" / "results.h5ad").read_bytes() == results
    proc = _train("K=5", "overwrite=true", *common)  # replacing the results replaces the record
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert b"K=5" in (out / ".hydra" / "overrides.yaml").read_bytes()
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".hydra")) == [".hydra"]


def test_sweep_jobs_are_named_by_the_swept_keys(tmp_path, cache_dir):
    sweep = tmp_path / "sweep"
    proc = _train("-m", "stage=onestage", "experiment=quick", "K=3,4", "model.consensus.replicates=2",
                  "trainer.accelerator=cpu", f"data.cache_dir={cache_dir}", f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["K=3", "K=4"]
    for job in ("K=3", "K=4"):
        assert (sweep / job / "results" / "results.h5ad").is_file()
        assert list((sweep / job / "tensorboard" / "stage1").glob("events.out.tfevents.*"))


def test_results_are_not_overwritten_unless_asked(make_cfg):
    cfg, run_dir = make_cfg("stage=onestage")
    run(cfg, run_dir)
    before = (run_dir / "results" / "results.h5ad").stat().st_mtime_ns
    with pytest.raises(ValueError, match="already holds the results of a run.*overwrite=true"):
        run(cfg, run_dir)
    assert (run_dir / "results" / "results.h5ad").stat().st_mtime_ns == before
    cfg, run_dir = make_cfg("stage=onestage", "overwrite=true")
    run(cfg, run_dir)
    assert (run_dir / "results" / "results.h5ad").stat().st_mtime_ns != before


def test_same_seed_same_programs_other_seed_other_start(make_cfg):
    import numpy as np

    programs = {}
    for i, seed in enumerate((0, 0, 1)):
        cfg, run_dir = make_cfg("stage=onestage", f"seed={seed}", "logger=none")
        programs[i] = run(cfg, run_dir / str(i)).results.varm["deltanmf_programs"]
    np.testing.assert_array_equal(programs[0], programs[1])
    assert not np.array_equal(programs[0], programs[2])


@pytest.mark.parametrize("args, message", [
    (["k=20"], "unknown setting k (did you mean K?)"),   # Hydra would hint +k=20, which runs with K=10
    (["Kk=5"], "unknown setting Kk (did you mean K?)"),
    (["-m", "K=8,10", "model.stop.tolerance=0.1"], "unknown setting model.stop.tolerance (did you mean tol?)"),
    (["data=h5ad", "data.bath_size=64"], "unknown setting data.bath_size (did you mean batch_size?)"),
])
def test_unknown_keys_are_refused_before_hydra_composes(capsys, args, message):
    from deltanmf.workflow.main import check_command_line

    with pytest.raises(SystemExit) as exit_info:
        check_command_line(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"deltanmf: error: {message}")


def test_known_keys_group_choices_and_hydras_own_pass_the_key_check():
    from deltanmf.workflow.main import check_command_line

    check_command_line(["-m", "K=8,10", "stage=onestage", "data=h5ad", "data.path=x.h5ad", "resource=demo",
                        "experiment=quick", "hydra/launcher=joblib", "hydra.run.dir=out", "+extra=1",
                        "trainer.max_steps=5", "model.consensus.tol=0.01", "data.simulation.n_genes=300"])


@pytest.mark.parametrize("override, message, code", [
    ("k=20", "deltanmf: error: unknown setting k (did you mean K?)", 2),   # train.py checks keys first
    ("stage=threestage", "Could not find 'stage/threestage'", 1),          # an unknown option of a group: Hydra's
])
def test_unknown_config_keys_and_options_are_named(tmp_path, override, message, code):
    proc = _train(override, f"hydra.run.dir={tmp_path / 'out'}")
    assert proc.returncode == code
    assert message in proc.stderr and "+k=20" not in proc.stderr
    assert not (tmp_path / "out" / "results" / "results.h5ad").exists()
