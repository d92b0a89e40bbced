"""Experiment presets: ``experiment=published`` is the published schedule, run step for step."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from deltanmf.errors import NonFiniteLossError
from deltanmf.train import Stage1Module, build_trainer
from deltanmf.workflow.config import default_settings, load_settings
from deltanmf.workflow.run import training_plan
from helpers import datamodule, module_args, run


def test_published_preset_is_the_published_schedule():
    default = default_settings("logger=none")
    published = default_settings("logger=none", "experiment=published")
    # Adam at lr 0.01 (both stages' modules), a fixed 10,000 full-batch steps, no early stop
    assert published.model.lr == 0.01
    assert published.trainer["max_steps"] == 10_000
    assert published.data.batch_size is None
    assert published.model.stop.enabled is False and default.model.stop.enabled is True
    # the same initialisation and everything else as the defaults: the preset lists only the schedule
    assert published.model.consensus == default.model.consensus
    assert published.model.activation == default.model.activation and published.model.beta == default.model.beta
    assert published.data.simulation == default.data.simulation and published.K == default.K
    # command-line overrides still win over the preset
    assert default_settings("experiment=published", "trainer.max_steps=40").trainer["max_steps"] == 40


def test_published_runs_exactly_max_steps_where_the_default_stops_early(make_cfg):
    # tol=1 counts every check after the first as "no progress": the convergence stop ends each stage
    # after 3 checks of 10 steps; with the stop disabled both stages run the full 45 steps
    stall = ["logger=none", "model.stop.tol=1.0", "model.stop.patience=2", "model.stop.check_every=10",
             "trainer.max_steps=45"]
    cfg, run_dir = make_cfg(*stall)
    stopped = run(cfg, run_dir).metrics
    assert stopped["stage1"]["steps"] == 30 and stopped["stage2"]["steps"] == 30
    assert stopped["stage1"]["converged"]

    cfg, run_dir = make_cfg(*stall, "experiment=published", "overwrite=true")
    assert cfg.trainer.max_steps == 45 and cfg.model.stop.enabled is False
    metrics = run(cfg, run_dir).metrics
    assert metrics["stage1"]["steps"] == 45 and metrics["stage2"]["steps"] == 45
    assert not metrics["stage1"]["converged"] and not metrics["stage2"]["converged"]
    # the extra steps continue from the same NNLS-refined start, already near the optimum: the fit is
    # no worse than the one stopped early beyond Adam's jitter, within the stop's own relative
    # tolerance (1e-4; the jitter measured 2e-5 to 4e-5 of the error)
    for stage in ("stage1", "stage2"):
        assert metrics[stage]["relative_error"] <= stopped[stage]["relative_error"] * (1 + 1e-4)
    assert metrics["recovery"]["baseline_min"] > 0.9


def test_published_schedule_still_stops_on_a_non_finite_loss(make_cfg):
    cfg, run_dir = make_cfg("logger=none", "experiment=published", "trainer.max_steps=100")
    settings = load_settings(cfg)
    rng = np.random.default_rng(0)
    x = rng.random((40, 30), dtype=np.float32)
    x[5, 3] = 3e38  # its square overflows float32: the loss is inf from the first step
    module = Stage1Module(torch.rand(30, 3), torch.rand(40, 3), **module_args(window=10))
    with pytest.raises(NonFiniteLossError, match="between steps 1 and 10"):
        build_trainer(training_plan(settings, run_dir), "stage1").fit(module, datamodule(x, steps_per_epoch=10))


def test_no_progress_bar_when_stderr_is_not_a_terminal(tmp_path, monkeypatch):
    """python train.py > run.log: the bar's carriage-return updates would fill the log."""
    import sys

    from deltanmf.train.trainer import build_trainer
    from helpers import plan

    trainer_settings = {"accelerator": "cpu", "enable_progress_bar": True}
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    assert not build_trainer(plan(tmp_path, trainer=trainer_settings), "stage1").progress_bar_callback
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    assert build_trainer(plan(tmp_path, trainer=trainer_settings), "stage1").progress_bar_callback is not None
