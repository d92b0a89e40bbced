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


def test_laplacian_prior_lowers_the_laplacian_of_programs(make_cfg, dataset):
    prepared, truth = dataset
    emb = truth.embedding
    graph = GeneGraph(torch.from_numpy(similarity_from_embeddings(emb)))
    plain, *_ = _fit_stage1(make_cfg, prepared.control, "logger=none")
    smooth, *_ = _fit_stage1(make_cfg, prepared.control, "logger=none", "model.stage1.rel_alpha=1.0",
                            "model.stage1.laplacian_steps=100", graph=graph)

    def trace(p):
        return float(graph.trace(torch.as_tensor(p, dtype=torch.float32)))

    assert trace(smooth.programs) < 0.9 * trace(plain.programs)
    assert smooth.stats["laplacian_alpha"] > 0
    assert "laplacian" in smooth.stats["loss"]
    # the prior is applied late and briefly: the programs are still the planted ones
    assert _recovery(smooth, prepared, truth).min() >= 0.9


def test_prior_switches_on_before_the_step_cap(make_cfg, dataset):
    prepared, _ = dataset
    graph = GeneGraph(torch.from_numpy(similarity_from_embeddings(dataset[1].embedding)))
    # a patience that is never exhausted: the step cap decides
    fit, *_ = _fit_stage1(make_cfg, prepared.control, "logger=none", "model.stop.patience=100000",
                         "trainer.max_steps=120", "model.stage1.laplacian_steps=50", "model.stage1.rel_alpha=0.5",
                         graph=graph)
    assert fit.stats["steps"] == 120
    assert not fit.stats["converged"] and fit.stats["stop_reason"] == "step_cap"
    assert fit.stats["laplacian_alpha"] > 0


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
    module.training_step = lambda *a, **kw: (steps.append(1), step(*a, **kw))[1]
    module.log = lambda name, value, **kw: (calls.append((len(steps), name)), log(name, value, **kw))[1]
    # convergence: windows of 7 steps, any gain too small: stops after the second window, at step 14
    stopping = ConvergenceStop(stop(tol=1e9, patience=1, check_every=7) if stop_by == "convergence" else stop())
    trainer = L.Trainer(max_steps=14 if stop_by == "step cap" else 100, accelerator="cpu", log_every_n_steps=5,
                        logger=CSVLogger(tmp_path), enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[stopping])
    trainer.fit(module, datamodule(x, steps_per_epoch=7))
    assert trainer.global_step == 14
    # Lightning writes steps 5 and 10 (log_every_n_steps) and, when a callback stops training, the last
    # step; self.log (about 0.5 ms a call) runs on those steps only
    logged = sorted({step for step, name in calls if name == "train/loss"})
    assert logged == ([5, 10, 14] if stop_by == "convergence" else [5, 10])
    rows = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text().strip().splitlines()
    header = rows[0].split(",")
    written = [dict(zip(header, row.split(","))) for row in rows[1:]]
    assert [int(r["step"]) + 1 for r in written] == logged
    if stop_by == "convergence":  # the last row written holds the last step's own loss, not an earlier step's
        assert float(written[-1]["train/loss"]) == pytest.approx(float(module.last_terms["loss"]), rel=1e-6)
