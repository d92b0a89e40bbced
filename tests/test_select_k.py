"""Choosing K: the select_k rules and files, HParams records, the sweep callback and launchers."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from helpers import run

from deltanmf.select_k import main as select_k_main
from deltanmf.tl import select_k as sk
from deltanmf.workflow.config import load_settings
from deltanmf.workflow.sweeps import SWEPT_KEYS_ENV, SweepCallback, hparams_record, sweep_subdir

ROOT = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# Stability and error against K as measured on the quick demo (10 planted programs; README "Choosing K")
MEASURED = {6: (0.420, 0.5643), 7: (0.537, 0.5396), 8: (0.685, 0.5135), 9: (0.812, 0.4845), 10: (0.964, 0.4568),
            11: (0.910, 0.4554), 12: (0.802, 0.4542), 13: (0.713, 0.4529), 14: (0.691, 0.4510)}


def _write_run(folder: Path, K: int, stability: float, error: float, K_case: int | None = None,
               gain: float | None = None, null: float | None = None, replicates: int = 1) -> None:
    stage1 = {"relative_error": error, "consensus_stability": 0.5}
    if replicates > 1:
        stage1.update(replicates=replicates, replicate_stability=stability)
    else:
        stage1["consensus_stability"] = stability
    metrics = {"stage": "onestage" if K_case is None else "twostage", "K": K, "stage1": stage1}
    if K_case is not None:
        metrics["K_case"] = K_case
        metrics["stage2"] = {"relative_error": error - 0.01, "explained_variance_gain": gain}
        if null is not None:
            metrics["stage2"]["null_explained_variance_gain"] = null
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps(metrics))


def _check_png(path: Path) -> None:
    import matplotlib.image as mpimg

    assert path.read_bytes()[:8] == PNG_SIGNATURE
    image = mpimg.imread(path)
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 300
    assert image[..., :3].std() > 0.05  # something is drawn


# -- the rules ----------------------------------------------------------------------------------
@pytest.mark.smoke
def test_k_rule_on_the_measured_curve_picks_the_planted_k(tmp_path):
    for K, (stability, error) in MEASURED.items():
        _write_run(tmp_path / f"K={K}", K, stability, error)
    choice = sk.select_k(tmp_path)
    assert choice.k == 10
    assert "largest K whose stability (0.964) is within 0.05 of the best (0.964, K=10)" in choice.k_reason
    assert "bends at K=10" in choice.k_reason  # the error elbow agrees
    table = pd.read_csv(tmp_path / "k_selection.csv")
    assert list(table.columns) == sk.COLUMNS
    assert list(table["K"]) == sorted(MEASURED) and list(table["run_dir"]) == [f"K={k}" for k in sorted(MEASURED)]
    assert (table["stability_source"] == "initialisation").all()
    _check_png(tmp_path / "k_selection.png")


def test_k_rule_takes_the_largest_k_within_the_margin():
    table = pd.DataFrame({"K": [4, 6, 8, 10], "stability": [0.99, 0.97, 0.955, 0.80],
                          "stage1_relative_error": [0.5, 0.45, 0.44, 0.43]})
    assert sk.suggest_k(table, margin=0.05)[0] == 8
    assert sk.suggest_k(table, margin=0.01)[0] == 4
    assert sk.suggest_k(table, margin=0.5)[0] == 10
    # runs sharing K are averaged (K=6: (0.99 + 0.90) / 2 = 0.945 is outside 0.99 - 0.03)
    repeated = pd.DataFrame({"K": [4, 6, 6], "stability": [0.99, 0.99, 0.90], "stage1_relative_error": [0.5, 0.4, 0.4]})
    assert sk.suggest_k(repeated, margin=0.03)[0] == 4
    assert sk.suggest_k(table.iloc[:1])[0] is None  # one K: nothing to choose


def test_a_suggestion_at_the_edge_of_the_sweep_says_to_extend_it():
    """K=4 or K=10, the ends of a sweep over 4..10, may be cut short by the sweep: the reason says
    so and proposes the next values; a K inside the range does not."""
    rows = lambda stabilities: pd.DataFrame(  # noqa: E731
        [{"K": k, "stability": s, "stage1_relative_error": 0.6 - 0.01 * k, "stage": "onestage"}
         for k, s in zip((4, 6, 8, 10), stabilities)])
    k, reason = sk.suggest_k(rows([0.7, 0.8, 0.9, 0.95]))
    assert k == 10 and "K=10 is the largest K the sweep tried: extend the sweep past it" in reason
    assert "e.g. K=10,12,14,16" in reason
    k, reason = sk.suggest_k(rows([0.99, 0.6, 0.5, 0.4]))
    assert k == 4 and "K=4 is the smallest K the sweep tried" in reason and reason.endswith("e.g. K=2,4")
    k, reason = sk.suggest_k(rows([0.7, 0.95, 0.8, 0.6]))
    assert k == 6 and "extend" not in reason


@pytest.mark.smoke
def test_k_case_rule_uses_the_gain_over_the_null(tmp_path):
    # measured on the quick demo (3 planted case programs): gain and null per K_case
    gain = {1: 0.0751, 2: 0.1400, 3: 0.2020, 4: 0.2038, 5: 0.2046, 6: 0.2065}
    null = {1: 0.0031, 2: 0.0054, 3: 0.0070, 4: 0.0085, 5: 0.0100, 6: 0.0118}
    for kc in gain:
        _write_run(tmp_path / f"K_case={kc}", 10, 0.96, 0.45, K_case=kc, gain=gain[kc], null=null[kc])
    choice = sk.select_k(tmp_path)
    assert choice.k is None and choice.k_case == 3
    assert "gain over the null (0.1950)" in choice.k_case_reason
    table = pd.read_csv(tmp_path / "k_selection.csv")
    np.testing.assert_allclose(table["gain_over_null"], [gain[k] - null[k] for k in sorted(gain)])
    _check_png(tmp_path / "k_selection.png")


def test_k_case_rule_without_a_null_and_without_an_effect():
    base = {"stage": "twostage", "K": 10}
    rows = [dict(base, K_case=kc, explained_variance_gain=g, null_explained_variance_gain=np.nan,
                 gain_over_null=np.nan) for kc, g in ((1, 0.07), (2, 0.14), (3, 0.20), (4, 0.201))]
    k_case, reason = sk.suggest_k_case(pd.DataFrame(rows))
    assert k_case == 3 and "no null" in reason
    rows = [dict(base, K_case=kc, explained_variance_gain=g, null_explained_variance_gain=n,
                 gain_over_null=g - n) for kc, g, n in ((1, 0.002, 0.003), (2, 0.004, 0.005))]
    k_case, reason = sk.suggest_k_case(pd.DataFrame(rows))
    assert k_case is None and "no evidence of case-specific programs" in reason


def test_replicate_stability_is_preferred_and_hidden_folders_are_skipped(tmp_path):
    _write_run(tmp_path / "K=3", 3, 0.9, 0.5, replicates=3)
    _write_run(tmp_path / "K=4", 4, 0.7, 0.4, replicates=3)
    _write_run(tmp_path / "K=4" / ".results" / "set-2", 4, 0.1, 0.9)  # an unfinished write
    table = sk.collect(tmp_path)
    assert len(table) == 2 and (table["stability_source"] == "replicates").all()
    assert list(table["stability"]) == [0.9, 0.7] and list(table["replicates"]) == [3, 3]


def test_runs_with_committed_results_are_found_once_under_their_own_name(tmp_path):
    """A run's results sit in <run>/results/ (a link to .results/<set>): the table names the run
    directory, and neither the link's target nor an unfinished set counts again."""
    from deltanmf.files import commit_results

    _write_run(tmp_path / "scratch", 5, 0.8, 0.45)
    for job in ("K=5", "K=6"):
        (tmp_path / job).mkdir()
        commit_results(tmp_path / job, lambda folder: (folder / "metrics.json").write_bytes(
            (tmp_path / "scratch" / "metrics.json").read_bytes()))
    _write_run(tmp_path / "K=6" / ".results" / "unfinished", 6, 0.1, 0.9)
    table = sk.collect(tmp_path)
    assert sorted(table["run_dir"]) == ["K=5", "K=6", "scratch"]


def test_command_line(tmp_path):
    for K, (stability, error) in MEASURED.items():
        _write_run(tmp_path / "sweep" / f"K={K}", K, stability, error)
    proc = subprocess.run([sys.executable, "-m", "deltanmf.select_k", str(tmp_path / "sweep")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "suggested K=10: the largest K whose stability" in proc.stdout
    assert (tmp_path / "sweep" / "k_selection.csv").is_file()
    (tmp_path / "empty").mkdir()
    assert select_k_main([str(tmp_path / "empty")]) == 2
    with pytest.raises(ValueError, match="not a directory"):
        sk.select_k(tmp_path / "missing")


# -- HParams ------------------------------------------------------------------------------------
def _hparams_events(folder: Path) -> tuple[dict, dict]:
    """(hyperparameters, final scalar values) read back from a run's TensorBoard events."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    acc = EventAccumulator(str(folder))
    acc.Reload()
    content = acc.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    params = {k: (v.number_value if v.HasField("number_value") else v.string_value)
              for k, v in start.session_start_info.hparams.items()}
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"])
    metric_tags = {m.name.tag for m in experiment.experiment.metric_infos}
    values = {tag: acc.Scalars(tag)[-1].value for tag in acc.Tags()["scalars"]}
    assert metric_tags <= set(values)  # every HParams metric has its value in the same run
    return params, values


def test_each_run_records_hparams_with_its_final_metrics(make_cfg):
    cfg, run_dir = make_cfg("stage=onestage", "K=4", "model.lr=0.02")
    metrics = run(cfg, run_dir).metrics
    params, values = _hparams_events(run_dir / "tensorboard" / "hparams")
    assert params["K"] == 4 and params["model/lr"] == pytest.approx(0.02) and params["stage"] == "onestage"
    assert values["final/stage1_relative_error"] == pytest.approx(metrics["stage1"]["relative_error"], rel=1e-6)
    assert values["final/stage1_stability"] == pytest.approx(metrics["stage1"]["consensus_stability"], rel=1e-6)


def test_hparams_record_of_a_twostage_run(make_cfg):
    cfg, _ = make_cfg("K_case=4", "model.null_fit=true")
    metrics = {"stage": "twostage", "K": 5, "K_case": 4,
               "stage1": {"relative_error": 0.4, "consensus_stability": float("nan")},
               "stage2": {"relative_error": 0.35, "explained_variance_gain": 0.1,
                          "null_explained_variance_gain": 0.01, "baseline_only_relative_error": 0.45}}
    params, final = hparams_record(load_settings(cfg), metrics)
    assert params["K_case"] == 4 and params["model/null_fit"] is True and params["data/batch_size"] == "full"
    assert final == {"final/stage1_relative_error": 0.4, "final/stage2_relative_error": 0.35,
                     "final/baseline_only_relative_error": 0.45, "final/explained_variance_gain": 0.1,
                     "final/null_explained_variance_gain": 0.01}  # NaN stability left out


# -- the callback and the launchers -------------------------------------------------------------
def test_callback_tells_jobs_in_other_processes_which_keys_are_swept(monkeypatch, tmp_path):
    from omegaconf import OmegaConf

    monkeypatch.setattr(sys, "argv", ["worker.py"])  # a launcher's worker: not the user's command line
    monkeypatch.delenv(SWEPT_KEYS_ENV, raising=False)
    assert sweep_subdir(["K=5", "data.path=/x/y.h5ad"], 3) == "job3"
    config = OmegaConf.create({"hydra": {"overrides": {"task": ["K=5,10", "data.path=/x/y.h5ad", "seed=range(2)"]},
                                         "sweep": {"dir": str(tmp_path)}}})
    callback = SweepCallback(select_k=True, margin=sk.MARGIN, gain_tolerance=sk.GAIN_TOLERANCE)
    callback.on_multirun_start(config)
    assert os.environ[SWEPT_KEYS_ENV] == "K,seed"
    assert sweep_subdir(["K=5", "data.path=/x/y.h5ad", "seed=1"], 0) == "K=5,seed=1"
    callback.on_multirun_end(config)  # no finished run: logs that K selection was skipped
    assert SWEPT_KEYS_ENV not in os.environ
    assert not (tmp_path / "k_selection.csv").exists()


def test_slurm_launcher_config_composes(make_cfg):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    cfg, _ = make_cfg("hydra/launcher=slurm", "hydra.launcher.partition=gpu")
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert launcher.partition == "gpu" and launcher.tasks_per_node == 1 and launcher.timeout_min == 240


def test_joblib_sweep_writes_one_run_per_value_and_the_k_selection(tmp_path, cache_dir):
    """Two jobs at once (joblib, n_jobs=2) in a subprocess: one folder per value, TensorBoard events
    with an HParams record in each, and the summary written by the callback at the end."""
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    sweep = tmp_path / "sweep"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
         "stage=onestage", "K=3,4", "data.simulation.n_genes=200", "data.simulation.n_programs=4",
         "data.simulation.n_control=150", "data.simulation.n_case=30", "data.simulation.markers_per_program=25",
         "model.consensus.replicates=2", "model.consensus.iterations=40", "trainer.max_steps=60",
         "trainer.accelerator=cpu", "trainer.enable_progress_bar=false", f"data.cache_dir={cache_dir}",
         f"hydra.sweep.dir={sweep}"],
        cwd=tmp_path, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Joblib.Parallel(n_jobs=2" in proc.stderr + proc.stdout
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["K=3", "K=4"]
    for K in (3, 4):
        run_dir = sweep / f"K={K}"
        assert list((run_dir / "tensorboard" / "stage1").glob("events.out.tfevents.*"))
        params, values = _hparams_events(run_dir / "tensorboard" / "hparams")
        assert params["K"] == K and "final/stage1_relative_error" in values
    table = pd.read_csv(sweep / "k_selection.csv")
    assert list(table["K"]) == [3, 4] and list(table["run_dir"]) == ["K=3", "K=4"]
    _check_png(sweep / "k_selection.png")
    assert "suggested K=" in proc.stderr + proc.stdout


@pytest.mark.slow
def test_suggested_k_is_near_the_planted_number_of_programs(make_cfg, tmp_path):
    """A K sweep on simulated data with 5 planted programs: the suggestion is within +-2 of 5."""
    sweep = tmp_path / "sweep"
    for K in range(2, 10):
        cfg, _ = make_cfg("stage=onestage", f"K={K}", "logger=none")
        run(cfg, sweep / f"K={K}")
    choice = sk.select_k(sweep)
    assert abs(choice.k - 5) <= 2, choice.report()
