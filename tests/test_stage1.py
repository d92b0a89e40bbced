"""Stage 1 on simulated data: planted programs recovered, the prior does what it claims."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from deltanmf.core import GeneGraph, matched_cosine
from deltanmf.data import prepare, simulate_case_control, simulation_truth
from deltanmf.errors import InputError, NonFiniteLossError
from deltanmf.resources import similarity_from_embeddings
from deltanmf.tl.fit import fit_stage1
from deltanmf.train import ConvergenceStop, Stage1Module
from deltanmf.workflow.config import default_settings, load_settings
from deltanmf.workflow.run import training_plan
from helpers import data, datamodule, module_args, stop


def _fit_stage1(make_cfg, x, *overrides, graph=None):
    """Stage 1 of ``x`` as a run with ``overrides`` fits it: ``(fit, settings, run directory)``."""
    cfg, run_dir = make_cfg(*overrides)
    settings = load_settings(cfg)
    plan = training_plan(settings, run_dir)
    return fit_stage1(x, settings.K, settings.model, plan, seed=settings.seed, graph=graph), settings, run_dir


@pytest.fixture(scope="module")
def dataset():
    adata = simulate_case_control(n_genes=300, n_programs=5, n_case_programs=2, n_control=300, n_case=100,
                                  markers_per_program=30, embedding_noise=0.2, seed=3)
    prepared = prepare(adata, data(), use_case=False)
    return prepared, simulation_truth(prepared.source)


def _recovery(fit, prepared, truth):
    return matched_cosine(fit.programs * prepared.gene_scale[:, None], truth.programs)


@pytest.mark.smoke
@pytest.mark.parametrize("batch_size", [None, 64], ids=["full-batch", "minibatch"])
def test_stage1_recovers_planted_programs(make_cfg, dataset, batch_size):
    prepared, truth = dataset
    fit, settings, run_dir = _fit_stage1(make_cfg, prepared.control, "logger=none",
                                         f"data.batch_size={'null' if batch_size is None else batch_size}")
    cos = _recovery(fit, prepared, truth)
    assert cos.min() >= 0.95, cos
    assert fit.programs.shape == (prepared.n_genes, 5)
    assert fit.usage.shape == (prepared.control.shape[0], 5)
    assert (fit.programs >= 0).all() and (fit.usage >= 0).all()
    np.testing.assert_allclose(fit.programs.sum(axis=0), 1.0, rtol=1e-5)
    assert fit.stats["converged"] and 0 < fit.stats["steps"] < settings.trainer["max_steps"]
    assert fit.stats["stop_reason"] == "converged"
    assert (run_dir / "checkpoints" / "stage1.ckpt").exists()


def _graphs(truth):
    """The simulated embeddings' graph, and the same graph on shuffled gene labels (no information)."""
    informative = GeneGraph(torch.from_numpy(similarity_from_embeddings(truth.embedding)))
    order = np.random.default_rng(0).permutation(len(truth.embedding))
    shuffled = GeneGraph(torch.from_numpy(similarity_from_embeddings(truth.embedding[order])))
    return informative, shuffled


def _smoothness(graph, programs) -> float:
    return float(graph.rayleigh(torch.as_tensor(programs, dtype=torch.float32)).mean())


def test_the_prior_makes_the_programs_smoother_in_the_graphs_sense(make_cfg, dataset):
    """At the default strength on plentiful data (300 cells): the programs' normalised Rayleigh
    quotient (scale-invariant: only a change of shape lowers it) falls, recovery stays."""
    prepared, truth = dataset
    informative, _ = _graphs(truth)
    plain, settings, _ = _fit_stage1(make_cfg, prepared.control, "logger=none", "model.stage1.rel_alpha=0",
                                     graph=informative)
    smooth, *_ = _fit_stage1(make_cfg, prepared.control, "logger=none", graph=informative)
    assert settings.model.stage1.rel_alpha == 0 and smooth.stats["laplacian_alpha"] > 0
    # metrics.json's term is the measure of the programs written out
    assert smooth.stats["loss"]["laplacian"] == pytest.approx(_smoothness(informative, smooth.programs), rel=1e-5)
    before, after = _smoothness(informative, plain.programs), _smoothness(informative, smooth.programs)
    assert after < before - 0.004, (before, after)  # 0.822 -> 0.814 (unrelated programs: 1)
    assert _recovery(smooth, prepared, truth).mean() >= _recovery(plain, prepared, truth).mean() - 0.001


def test_on_scarce_data_an_informative_graph_raises_recovery_and_a_shuffled_one_does_not(make_cfg):
    """40 cells of 150 counts, seeds 0-4 (benchmarks/prior_strength.py's design): the prior
    (rel_alpha 0.3) raises recovery of the planted programs on every seed with the simulated
    embeddings' graph (+0.008 on average in the benchmark) and leaves it, on average, with the
    same graph on shuffled genes (0.0000): the gain comes from the graph's information."""
    gain, shuffled_change = [], []
    for seed in range(5):
        adata = simulate_case_control(n_genes=600, n_programs=6, n_case_programs=1, n_control=40, n_case=20,
                                      markers_per_program=40, library_size=150, embedding_noise=0.3, seed=seed)
        prepared = prepare(adata, data(), use_case=False)
        truth = simulation_truth(prepared.source)
        informative, shuffled = _graphs(truth)
        fits = {name: _fit_stage1(make_cfg, prepared.control, "K=6", "logger=none",
                                  f"model.stage1.rel_alpha={alpha}", graph=graph)[0]
                for name, graph, alpha in (("none", informative, 0), ("informative", informative, 0.3),
                                           ("shuffled", shuffled, 0.3))}
        recovery = {name: float(_recovery(fit, prepared, truth).mean()) for name, fit in fits.items()}
        smooth = {name: _smoothness(informative, fit.programs) for name, fit in fits.items()}
        assert recovery["informative"] > recovery["none"], (seed, recovery)
        assert smooth["informative"] < smooth["none"] - 0.02, (seed, smooth)
        gain.append(recovery["informative"] - recovery["none"])
        shuffled_change.append(recovery["shuffled"] - recovery["none"])
    # half the benchmark's mean gain; a shuffled graph within a quarter of it
    assert np.mean(gain) > 0.004, gain
    assert abs(np.mean(shuffled_change)) < 0.002, shuffled_change


def test_prior_switches_on_before_the_step_cap(make_cfg, dataset):
    prepared, _ = dataset
    graph = GeneGraph(torch.from_numpy(similarity_from_embeddings(dataset[1].embedding)))
    # a patience that is never exhausted: the step cap decides
    fit, *_ = _fit_stage1(make_cfg, prepared.control, "logger=none", "model.stop.patience=100000",
                         "trainer.max_steps=120", "model.stage1.laplacian_steps=50", "model.stage1.rel_alpha=0.5",
                         "model.stage1.prior_from=converged",
                         graph=graph)
    assert fit.stats["steps"] == 120
    assert not fit.stats["converged"] and fit.stats["stop_reason"] == "step_cap"
    assert fit.stats["laplacian_alpha"] > 0


def test_the_prior_phase_has_its_own_convergence_check(make_cfg, dataset, caplog):
    """Convergence starts the prior's phase and resets the stop's record: the phase stops on its own
    convergence (the best window before the switch, which the loss with its new term cannot beat,
    would stop it after exactly ``patience`` windows: 3 x 10 steps), and the log says so."""
    prepared, truth = dataset
    informative, _ = _graphs(truth)
    caplog.set_level("INFO", logger="deltanmf.tl.fit")
    fit, settings, _ = _fit_stage1(make_cfg, prepared.control, "logger=none", "model.stage1.laplacian_steps=1000",
                                   "trainer.max_steps=3000", "model.stage1.prior_from=converged", graph=informative)
    stop = settings.model.stop
    start = fit.stats["laplacian_start_step"]
    assert fit.stats["stop_reason"] == "converged" and fit.stats["converged"] and start is not None
    assert start % stop.check_every == 0 and start >= (stop.patience + 1) * stop.check_every
    phase = fit.stats["steps"] - start
    assert (stop.patience + 1) * stop.check_every <= phase < 1000
    assert f"converged, then the prior on from step {start} until it converged too" in caplog.text


def test_a_stage_stopped_by_the_prior_steps_says_so(make_cfg, dataset, caplog):
    prepared, truth = dataset
    informative, _ = _graphs(truth)
    caplog.set_level("INFO", logger="deltanmf.tl.fit")
    fit, *_ = _fit_stage1(make_cfg, prepared.control, "logger=none", "model.stage1.laplacian_steps=15",
                          "model.stage1.prior_from=converged", graph=informative)
    start = fit.stats["laplacian_start_step"]
    assert fit.stats["stop_reason"] == "prior_steps" and fit.stats["steps"] == start + 15
    assert fit.stats["converged"]  # the rest of the loss did, before the prior's phase
    line = next(m for m in (r.getMessage() for r in caplog.records) if m.startswith("stage 1:") and "steps (" in m)
    assert (f"stage 1: {start + 15} steps (converged, then the prior on from step {start} until its "
            "laplacian_steps=15 ran out before converging)") in line
    loss = fit.stats["loss"]
    assert f"recon {loss['recon']:.6g}, laplacian {loss['laplacian']:.4f}" in line  # the terms of metrics.json


def test_without_prior_the_convergence_stop_ends_training(make_cfg, dataset):
    prepared, _ = dataset
    fit, *_ = _fit_stage1(make_cfg, prepared.control, "logger=none", "model.stop.patience=100000",
                         "trainer.max_steps=90")
    assert fit.stats["steps"] == 90 and not fit.stats["converged"] and fit.stats["stop_reason"] == "step_cap"
    fit, *_ = _fit_stage1(make_cfg, prepared.control, "logger=none", "model.stop.tol=1.0", "model.stop.patience=2",
                         "model.stop.check_every=10")
    # a huge tolerance stops at the first possible check: 3 windows of 10 steps
    assert fit.stats["converged"] and fit.stats["steps"] == 30


@pytest.mark.parametrize("settings, named", [
    ({"patience": 0}, "model.stop.patience=0"), ({"patience": 2.5}, "model.stop.patience=2.5"),
    ({"patience": True}, "model.stop.patience=true"), ({"check_every": 0}, "model.stop.check_every=0"),
    ({"tol": -1e-4}, "model.stop.tol=-0.0001"), ({"tol": "small"}, "model.stop.tol=small"),
    ({"enabled": "yes"}, "model.stop.enabled=yes"),
])
def test_bad_stop_settings_are_refused_by_name(settings, named):
    stop(enabled=False, tol=0, patience=1, check_every=1)  # the smallest usable values
    with pytest.raises(InputError, match=re.escape(named) + " must be"):
        stop(**settings)


def test_an_unknown_stop_setting_is_refused_with_the_known_ones():
    with pytest.raises(InputError, match=r"unknown setting model\.stop\.window; the settings of model\.stop are: "
                                         r"enabled, tol, patience, check_every"):
        default_settings("+model.stop.window=5")


def test_a_non_finite_loss_stops_with_the_step_and_term():
    import lightning as L

    rng = np.random.default_rng(0)
    x = rng.random((40, 30), dtype=np.float32)
    x[5, 3] = 3e38  # its square overflows float32: the reconstruction loss is inf from the first step
    module = Stage1Module(torch.rand(30, 3), torch.rand(40, 3), **module_args(window=10))
    trainer = L.Trainer(max_steps=100, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[ConvergenceStop(stop())])
    with pytest.raises(NonFiniteLossError, match=r"between steps 1 and 10 \(non-finite term: loss, recon\)"):
        trainer.fit(module, datamodule(x, steps_per_epoch=10))


@pytest.mark.parametrize("stop_by", ["convergence", "step cap"])
def test_terms_are_logged_on_the_steps_lightning_writes_and_the_last(tmp_path, stop_by):
    import lightning as L
    from lightning.pytorch.loggers import CSVLogger

    x = np.random.default_rng(1).random((40, 30), dtype=np.float32)
    torch.manual_seed(0)
    window = 7 if stop_by == "convergence" else 10
    module = Stage1Module(torch.rand(30, 3), torch.rand(40, 3), **module_args(window=window))
    calls, steps = [], []
    log, step = module.log, module.training_step
    losses = []

    def counted(*args, **kwargs):
        steps.append(1)
        losses.append(step(*args, **kwargs))
        return losses[-1]

    module.training_step = counted
    module.log = lambda name, value, **kw: (calls.append((len(steps), name)), log(name, value, **kw))[1]
    # convergence: windows of 7 steps, any gain too small: stops after the second window, at step 14
    stopping = ConvergenceStop(stop(tol=1e9, patience=1, check_every=7) if stop_by == "convergence" else stop())
    trainer = L.Trainer(max_steps=14 if stop_by == "step cap" else 100, accelerator="cpu", log_every_n_steps=5,
                        logger=CSVLogger(tmp_path), enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[stopping])
    trainer.fit(module, datamodule(x, steps_per_epoch=7))
    assert trainer.global_step == 14
    # Lightning writes steps 5 and 10 (log_every_n_steps) and, when a callback stops training, the last
    # step; self.log (about 0.5 ms a call) runs on those steps only (counted from 1 here)
    logged = sorted({step for step, name in calls if name == "train/loss"})
    assert logged == ([5, 10, 14] if stop_by == "convergence" else [5, 10])
    rows = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text().strip().splitlines()
    header = rows[0].split(",")
    written = [dict(zip(header, row.split(","))) for row in rows[1:]]
    # and step 0, the start, written through the logger's own log_metrics with step 0's loss
    assert [int(r["step"]) + 1 for r in written] == [1, *logged]
    assert float(written[0]["train/loss"]) == pytest.approx(float(losses[0]), rel=1e-6)
    if stop_by == "convergence":  # the last row written holds the last step's own loss, not an earlier step's
        assert float(written[-1]["train/loss"]) == pytest.approx(float(module.last_terms["loss"]), rel=1e-6)
