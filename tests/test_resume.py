"""Checkpoints and resuming: an interrupted run continues to the result of an uninterrupted one."""
from __future__ import annotations

import os
import signal
import warnings

import lightning as L
import numpy as np
import pytest
import torch

import deltanmf.tl.fit as fit
from deltanmf.errors import InputError, NonFiniteLossError, TrainingInterrupted
from deltanmf.workflow import main as cli
from helpers import run

FAST = ("model.consensus.replicates=2", "model.consensus.iterations=50", "checkpoint.every_n_steps=10")


class _AtStep(L.Callback):
    """Does ``action(module)`` at the end of global step ``step`` of the stage named ``stage``."""

    def __init__(self, step: int, action):
        self.step, self.action = step, action

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            self.action(pl_module)


@pytest.fixture
def inject(monkeypatch):
    """Add a callback to the trainer of one stage of the next run."""

    def _inject(stage: str, callback: L.Callback):
        original = fit.build_trainer

        def trainer_with(plan, name):
            trainer = original(plan, name)
            if name == stage:
                trainer.callbacks.append(callback)
            return trainer

        monkeypatch.setattr(fit, "build_trainer", trainer_with)

    return _inject


def _boom(module):
    raise RuntimeError("simulated crash")


def _programs(result) -> np.ndarray:
    return np.asarray(result.results.varm["deltanmf_programs"])


@pytest.mark.parametrize("stage, interruption", [
    ("stage2", "crash"),                       # a crash right after a periodic checkpoint
    ("stage1", signal.SIGINT),                 # Ctrl+C
    ("stage2", signal.SIGTERM),                # a scheduler's time limit
])
def test_interrupted_run_resumes_to_the_uninterrupted_result(make_cfg, inject, monkeypatch, stage, interruption):
    cfg, run_dir = make_cfg(*FAST)
    expected = run(cfg, run_dir.with_name("whole"))

    cfg, run_dir = make_cfg(*FAST)
    if interruption == "crash":
        inject(stage, _AtStep(20, _boom))
        with pytest.raises(RuntimeError, match="simulated crash"):
            run(cfg, run_dir)
    else:
        inject(stage, _AtStep(15, lambda m: os.kill(os.getpid(), interruption)))
        # Ctrl+C is acted on at the end of the next step; SIGTERM (Lightning) at the end of the step it arrived in
        step = 16 if interruption == signal.SIGINT else 15
        with pytest.raises(TrainingInterrupted, match=f"{interruption.name} received: stopped {stage} after step {step}"):
            run(cfg, run_dir)
    assert (run_dir / "checkpoints" / f"{stage}-last.ckpt").is_file()
    assert not (run_dir / "results" / "results.h5ad").exists()
    assert signal.getsignal(signal.SIGINT) is not None  # handlers restored, not left pointing at a dead trainer
    if stage == "stage2":
        assert (run_dir / "checkpoints" / "stage1.ckpt").is_file()

    monkeypatch.undo()
    cfg, _ = make_cfg(*FAST, "resume=true")
    inits = _count_initialisations(monkeypatch)
    resumed = run(cfg, run_dir)
    np.testing.assert_array_equal(_programs(resumed), _programs(expected))
    for key in ("stage1", "stage2"):
        assert resumed.metrics[key]["steps"] == expected.metrics[key]["steps"]
        assert resumed.metrics[key]["converged"] == expected.metrics[key]["converged"]
    # a stage with a checkpoint is not initialised again; its record comes from the checkpoint
    assert inits == {"stage1": 0, "stage2": 1 if stage == "stage1" else 0}
    assert resumed.metrics["stage1"]["consensus_stability"] == expected.metrics["stage1"]["consensus_stability"]
    assert not list((run_dir / "checkpoints").glob("*-last.ckpt"))  # superseded by the final ones


def _count_initialisations(monkeypatch) -> dict:
    """Count the calls of each stage's initialisation from now on."""
    counts = {"stage1": 0, "stage2": 0}

    def counting(module, attr, key):
        original = getattr(module, attr)

        def wrapper(*args, **kwargs):
            counts[key] += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(module, attr, wrapper)

    counting(fit, "consensus_init", "stage1")
    counting(fit, "stage2_init", "stage2")
    return counts


def test_ckpt_path_continues_into_a_new_run_directory(make_cfg, inject, monkeypatch):
    cfg, run_dir = make_cfg(*FAST, "stage=onestage")
    expected = run(cfg, run_dir.with_name("whole"))
    inject("stage1", _AtStep(20, _boom))
    with pytest.raises(RuntimeError):
        run(cfg, run_dir)
    monkeypatch.undo()
    cfg, _ = make_cfg(*FAST, "stage=onestage", f"ckpt_path={run_dir / 'checkpoints' / 'stage1-last.ckpt'}")
    resumed = run(cfg, run_dir.with_name("continued"))
    np.testing.assert_array_equal(_programs(resumed), _programs(expected))


def test_a_non_finite_loss_keeps_the_last_finite_checkpoint(make_cfg, inject):
    def poison(module):
        with torch.no_grad():
            module.model.programs_raw.fill_(float("nan"))

    cfg, run_dir = make_cfg(*FAST, "stage=onestage")
    inject("stage1", _AtStep(25, poison))
    with pytest.raises(NonFiniteLossError, match="last checkpoint with a finite loss is .*stage1-last.ckpt"):
        run(cfg, run_dir)
    state = torch.load(run_dir / "checkpoints" / "stage1-last.ckpt", weights_only=False)
    assert state["global_step"] == 20
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values() if v.is_floating_point())
    assert not (run_dir / "results" / "results.h5ad").exists()


def test_resume_errors_name_the_problem(make_cfg, tmp_path):
    cfg, run_dir = make_cfg("resume=true")
    with pytest.raises(InputError, match=r"resume=true: no checkpoints in .*hydra.run.dir"):
        run(cfg, run_dir)
    cfg, run_dir = make_cfg(f"ckpt_path={tmp_path / 'nope.ckpt'}")
    with pytest.raises(InputError, match="ckpt_path=.*nope.ckpt: no such file"):
        run(cfg, run_dir)
    (tmp_path / "model.ckpt").write_bytes(b"")
    cfg, run_dir = make_cfg(f"ckpt_path={tmp_path / 'model.ckpt'}")
    with pytest.raises(InputError, match="not a DeltaNMF stage checkpoint"):
        run(cfg, run_dir)


def test_resume_refuses_changed_settings_and_finished_runs(make_cfg, inject, monkeypatch):
    cfg, run_dir = make_cfg(*FAST, "stage=onestage")
    inject("stage1", _AtStep(10, _boom))
    with pytest.raises(RuntimeError):
        run(cfg, run_dir)
    monkeypatch.undo()
    cfg, _ = make_cfg(*FAST, "stage=onestage", "resume=true", "K=4")
    with pytest.raises(InputError, match=r"different settings \(K\)"):
        run(cfg, run_dir)
    cfg, _ = make_cfg(*FAST, "stage=onestage", "resume=true")
    run(cfg, run_dir)
    with pytest.raises(InputError, match="has already finished"):
        run(cfg, run_dir)


@pytest.mark.parametrize("backed, workers", [(False, 0), (True, 0), (False, 1)])
@pytest.mark.parametrize("every, crash", [(10, 20), (21, 21)])  # 3 batches per epoch: mid-epoch, epoch end
def test_minibatch_resume_equals_the_uninterrupted_fit(make_cfg, inject, monkeypatch, backed, workers, every, crash):
    """Each epoch's batches depend on (seed, epoch) alone, and a fit resumed mid-epoch
    continues with the rest of that epoch's batches: the result is the uninterrupted one.
    (A DataLoader worker draws its batches before Lightning resets its loop: covered too.)"""
    args = [*FAST, f"checkpoint.every_n_steps={every}", "stage=onestage", "data.batch_size=100",
            f"data.num_workers={workers}"]
    if backed:
        args.append("data.backed=true")  # streamed from the demo's h5ad on disk
    cfg, run_dir = make_cfg(*args)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        expected = run(cfg, run_dir.with_name("whole"))
    assert not [w for w in caught if "logging interval" in str(w.message)]  # 3 batches an epoch: no noise
    inject("stage1", _AtStep(crash, _boom))
    with pytest.raises(RuntimeError):
        run(cfg, run_dir)
    assert torch.load(run_dir / "checkpoints" / "stage1-last.ckpt", weights_only=False)["global_step"] == crash
    monkeypatch.undo()
    cfg, _ = make_cfg(*args, "resume=true")
    resumed = run(cfg, run_dir)
    assert resumed.metrics["stage1"]["steps"] == expected.metrics["stage1"]["steps"]
    np.testing.assert_array_equal(_programs(resumed), _programs(expected))
    np.testing.assert_array_equal(np.asarray(resumed.results.obsm["X_deltanmf"]),
                                  np.asarray(expected.results.obsm["X_deltanmf"]))



def test_ctrl_c_outside_training_says_what_is_kept(make_cfg, monkeypatch, capsys):
    """Ctrl+C while a stage initialises: exit code 130 and one line saying which checkpoints
    are kept and how to continue (not a traceback)."""
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    cfg, run_dir = make_cfg(*FAST, "logger=none")
    monkeypatch.setattr(fit, "consensus_init", interrupt)  # stage 1's initialisation
    with pytest.raises(SystemExit) as exit_info:
        cli.main(cfg)
    assert exit_info.value.code == 130
    assert "nothing was saved: run the command again" in capsys.readouterr().err
    monkeypatch.undo()

    monkeypatch.setattr(fit, "fit_stage2", interrupt)  # after stage 1 finished
    with pytest.raises(SystemExit) as exit_info:
        cli.main(cfg)
    assert exit_info.value.code == 130
    err = capsys.readouterr().err
    assert "kept stage1.ckpt" in err and "resume=true" in err and str(run_dir) in err
    monkeypatch.undo()
    cfg, _ = make_cfg(*FAST, "logger=none", "resume=true")
    assert cli.main(cfg) > 0  # continues from stage 1's checkpoint to the end
    assert (run_dir / "results" / "results.h5ad").is_file()


def test_loader_settings_do_not_block_a_resume(make_cfg):
    """data.num_workers and data.cache_dir give the same batches: a continuation may change them
    (data.backed changes the batches and stays compared)."""
    from dataclasses import replace

    from deltanmf.workflow.config import load_settings
    from deltanmf.workflow.resume import settings_record

    cfg, _ = make_cfg(*FAST, "stage=onestage")
    settings = load_settings(cfg)
    same = replace(settings, data=replace(settings.data, num_workers=3, cache_dir="/elsewhere"))
    assert settings_record(same) == settings_record(settings)
    other = replace(settings, data=replace(settings.data, normalize="median"))
    assert settings_record(other) != settings_record(settings)


def test_stage1_from_run_resumes_with_k_left_at_its_default(make_cfg, inject, monkeypatch):
    """stage1_from a run with another number of programs, K not given: K is the programs' count,
    and an interrupted stage 2 resumes (the checkpoint used to record the configured K and the
    resume was refused with 'different settings (K)')."""
    cfg, base_dir = make_cfg(*FAST, "stage=onestage", "K=4")
    run(cfg, base_dir.with_name("base"))
    reuse = (*FAST, f"stage1_from={base_dir.with_name('base')}")
    cfg, run_dir = make_cfg(*reuse)  # K left at the small config's 5
    inject("stage2", _AtStep(20, _boom))
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(cfg, run_dir)
    monkeypatch.undo()
    cfg, _ = make_cfg(*reuse, "resume=true")
    resumed = run(cfg, run_dir)
    assert resumed.metrics["K"] == 4 and resumed.metrics["stage2"]["steps"] > 20
