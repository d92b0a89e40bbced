"""Faults: kills at any moment, two commands in one directory, checkpoints of another run,
damaged files. Whatever happens, the results are one run's complete set or absent, never a
mix of runs or settings; bad input ends in one line."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pytest

import deltanmf
from deltanmf.errors import InputError
from deltanmf.files import commit_results, remove_stale, results_dir
from deltanmf.workflow.rundir import RunLock
from helpers import run

ROOT = Path(__file__).resolve().parents[1]
QUICK = ["stage=onestage", "K=4", "model.consensus.replicates=2", "model.consensus.iterations=30",
         "trainer.max_steps=200", "trainer.accelerator=cpu", "trainer.enable_progress_bar=false", "logger=none",
         "checkpoint.every_n_steps=5", "data.simulation.n_genes=300", "data.simulation.n_programs=4",
         "data.simulation.n_case_programs=1", "data.simulation.n_control=300", "data.simulation.n_case=100",
         "data.simulation.markers_per_program=30"]

# A child that writes a set of six results, sleeping after each file: the parent kills it anywhere.
WRITER = """
import sys, time
from pathlib import Path
from deltanmf.workflow.outputs import write_outputs
run_dir, tag, delay = Path(sys.argv[1]), sys.argv[2], float(sys.argv[3])
files = {f"part{i}.txt": (lambda path, i=i: path.write_text(f"{tag} {i}")) for i in range(6)}
write_outputs(run_dir, files, progress=lambda name: time.sleep(delay))
"""


def _tags(run_dir: Path) -> set[str]:
    """The runs the visible results come from (one tag per file)."""
    folder = results_dir(run_dir)
    return {path.read_text().split()[0] for path in folder.glob("part*.txt")}


def _complete(run_dir: Path) -> bool:
    return sorted(p.name for p in results_dir(run_dir).glob("part*.txt")) == [f"part{i}.txt" for i in range(6)]


def test_a_kill_at_any_moment_of_the_commit_leaves_one_complete_set(tmp_path):
    """Kill the writer of set B at 12 moments over its write: every time, results/ holds set A
    whole or set B whole (never files of both, never a part of one), and the next command
    removes what the killed writer left."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    commit_results(run_dir, lambda folder: [(folder / f"part{i}.txt").write_text(f"A {i}") for i in range(6)])
    delay = 0.04
    for moment in np.linspace(0.0, 8 * delay + 0.4, 12):
        child = subprocess.Popen([sys.executable, "-c", WRITER, str(run_dir), "B", str(delay)])
        time.sleep(float(moment))
        child.send_signal(signal.SIGKILL)
        child.wait()
        tags = _tags(run_dir)
        assert len(tags) == 1 and _complete(run_dir), (moment, tags)
        remove_stale(run_dir)  # what the next command does first
        assert len(list((run_dir / ".results").iterdir())) == 1
        if tags == {"B"}:  # B was committed: start from A again
            commit_results(run_dir, lambda folder: [(folder / f"part{i}.txt").write_text(f"A {i}") for i in range(6)])
    child = subprocess.run([sys.executable, "-c", WRITER, str(run_dir), "B", "0"], check=True)
    assert _tags(run_dir) == {"B"} and _complete(run_dir)
    assert len(list((run_dir / ".results").iterdir())) == 1  # the replaced set is gone


def test_a_failing_writer_leaves_the_previous_results(tmp_path):
    commit_results(tmp_path, lambda folder: (folder / "part0.txt").write_text("A 0"))

    def broken(folder):
        (folder / "part0.txt").write_text("B 0")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        commit_results(tmp_path, broken)
    assert _tags(tmp_path) == {"A"} and len(list((tmp_path / ".results").iterdir())) == 1


def test_a_second_command_in_a_locked_directory_is_refused_at_once(tmp_path, cache_dir):
    """The holder's PID and start time are named; nothing in the directory changes but the log."""
    out = tmp_path / "out"
    with RunLock(out):
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *QUICK, f"data.cache_dir={cache_dir}",
                               f"hydra.run.dir={out}"], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert f"another DeltaNMF command is running in {out} (PID {os.getpid()}, started " in proc.stderr
        assert time.perf_counter() - start < 60  # at once: no data read, nothing trained
        assert sorted(p.name for p in out.iterdir()) == [".lock", "train.log"]
        with pytest.raises(InputError, match="another DeltaNMF command is running"):  # in this process too
            with RunLock(out):
                pass
    assert not (out / ".lock").exists()  # released with the lock


def test_the_lock_survives_a_late_opener_so_two_commands_cannot_both_hold_it(tmp_path):
    """A command that opened the lock just before the holder released it must not hold it
    while the next command does too. With the lock on .lock, which release removed, the late
    opener locked the removed file and the next command a new one (this test's first form,
    flocking the .lock it had opened, passed that way); the lock is now the directory's."""
    import fcntl

    out = tmp_path / "out"
    first = RunLock(out).__enter__()
    late = os.open(out, os.O_RDONLY)  # what a second command opens, before the first releases
    first.__exit__(None, None, None)
    with RunLock(out):  # the next command
        with pytest.raises(BlockingIOError):
            fcntl.flock(late, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.close(late)


def _crash_at(monkeypatch, step: int):
    """Make the next run's stage 1 crash at the end of ``step`` (after that step's checkpoint)."""
    import lightning as L

    import deltanmf.tl.fit as fit

    class Crash(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == step:
                raise RuntimeError("simulated crash")

    original = fit.build_trainer

    def with_crash(plan, name):
        trainer = original(plan, name)
        trainer.callbacks.append(Crash())
        return trainer

    monkeypatch.setattr(fit, "build_trainer", with_crash)


def test_another_runs_checkpoints_are_never_continued_under_other_settings(make_cfg, monkeypatch):
    """Run A (K=4) is interrupted. A new command with K=5 in its directory is refused; resuming
    with K=5 is refused (the checkpoint says K=4); overwrite=true clears A's checkpoints and
    gives exactly what a clean K=5 run gives."""
    cfg, run_dir = make_cfg(*QUICK)
    _crash_at(monkeypatch, 10)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(cfg, run_dir)
    monkeypatch.undo()
    assert (run_dir / "checkpoints" / "stage1-last.ckpt").is_file()
    record = (run_dir / "checkpoints" / "stage1-last.ckpt").read_bytes()
    cfg5, _ = make_cfg(*QUICK, "K=5")
    with pytest.raises(InputError, match=r"holds the checkpoints of an interrupted run \(stage1-last\.ckpt\)"):
        run(cfg5, run_dir)
    cfg5_resume, _ = make_cfg(*QUICK, "K=5", "resume=true")
    with pytest.raises(InputError, match=r"stage1-last\.ckpt: it was made with different settings \(K\)"):
        run(cfg5_resume, run_dir)
    assert (run_dir / "checkpoints" / "stage1-last.ckpt").read_bytes() == record  # refused: nothing changed
    cfg5_over, _ = make_cfg(*QUICK, "K=5", "overwrite=true")
    replaced = run(cfg5_over, run_dir)
    clean = run(cfg5, run_dir.with_name("clean"))
    np.testing.assert_array_equal(replaced.results.varm["deltanmf_programs"], clean.results.varm["deltanmf_programs"])
    assert replaced.metrics["K"] == 5


def test_a_damaged_checkpoint_is_named_with_the_fix(make_cfg, monkeypatch):
    cfg, run_dir = make_cfg(*QUICK)
    _crash_at(monkeypatch, 10)
    with pytest.raises(RuntimeError):
        run(cfg, run_dir)
    monkeypatch.undo()
    path = run_dir / "checkpoints" / "stage1-last.ckpt"
    path.write_bytes(path.read_bytes()[:1000])  # cut short, as by a full disk
    cfg, _ = make_cfg(*QUICK, "resume=true")
    with pytest.raises(InputError, match=r"cannot read the checkpoint .*stage1-last\.ckpt .*damaged: delete it"):
        run(cfg, run_dir)


@pytest.mark.smoke
def test_damaged_result_and_cache_files(make_cfg, tmp_path, cache_dir):
    """stage1_from a damaged results.h5ad: one line naming it; a damaged cached demo: simulated again."""
    damaged = tmp_path / "results.h5ad"
    damaged.write_bytes(b"not an h5ad")
    cfg, run_dir = make_cfg(*QUICK, "stage=twostage", f"stage1_from={damaged}")
    with pytest.raises(InputError, match=r"stage1_from: cannot read .*results\.h5ad .*damaged"):
        run(cfg, run_dir)
    from deltanmf.data import demo_path
    from deltanmf.workflow.config import load_settings

    settings = load_settings(make_cfg(*QUICK)[0])
    cached = demo_path(settings.data.simulation, settings.data.cache_dir)
    cached.write_bytes(cached.read_bytes()[:500])
    result = run(make_cfg(*QUICK)[0], tmp_path / "again")
    assert result.metrics["recovery"]["baseline_min"] > 0.9 and ad.read_h5ad(cached).n_obs == 400


@pytest.mark.parametrize("seed", [0, pytest.param(1, marks=pytest.mark.slow), pytest.param(2, marks=pytest.mark.slow)])
def test_sigkill_at_a_random_moment_then_resume_gives_the_uninterrupted_result(tmp_path, cache_dir, seed):
    """A run killed (SIGKILL: no handler, no cleanup) at a random moment, then continued
    (resume=true, or a fresh start when nothing was kept), ends with the results of a run that
    was never interrupted, whatever moment the kill hit."""
    def train(out: Path, *extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(ROOT / "train.py"), *QUICK, f"data.cache_dir={cache_dir}",
                               f"hydra.run.dir={out}", *extra], capture_output=True, text=True, timeout=300)

    reference = tmp_path / "reference"
    assert train(reference).returncode == 0
    out = tmp_path / "killed"
    child = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *QUICK, f"data.cache_dir={cache_dir}",
                              f"hydra.run.dir={out}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(float(np.random.default_rng(seed).uniform(2.0, 9.0)))  # imports, data, init, training, writing
    child.send_signal(signal.SIGKILL)
    child.wait()
    proc = train(out, "resume=true")
    if proc.returncode == 2 and "no checkpoints" in proc.stderr:  # killed before any checkpoint
        proc = train(out)
    assert proc.returncode == 0 or "has already finished" in proc.stderr, proc.stderr[-2000:]
    final = ad.read_h5ad(out / "results" / "results.h5ad")
    np.testing.assert_array_equal(final.varm["deltanmf_programs"],
                                  ad.read_h5ad(reference / "results" / "results.h5ad").varm["deltanmf_programs"])
    assert json.loads((out / "results" / "metrics.json").read_text())["K"] == 4


def test_an_unwritable_run_directory_is_refused_with_one_line(tmp_path, cache_dir):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *QUICK, f"data.cache_dir={cache_dir}",
                           f"hydra.run.dir={blocker / 'run'}"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith(f"deltanmf: error: cannot write the run directory "
                                                           f"{blocker / 'run'}")
    assert "Traceback" not in proc.stderr and "with hydra.run.dir=" in proc.stderr
    adata = deltanmf.simulate_case_control(n_genes=100, n_programs=2, n_case_programs=1, n_control=50, n_case=30,
                                           markers_per_program=20, n_shifted=1)
    with pytest.raises(InputError, match=r"cannot write the run directory .*a-file/api"):
        deltanmf.fit_onestage(adata, K=2, out_dir=blocker / "api")


def test_the_api_refuses_a_backed_anndata(tmp_path):
    adata = deltanmf.simulate_case_control(n_genes=100, n_programs=2, n_case_programs=1, n_control=50, n_case=30,
                                           markers_per_program=20, n_shifted=1)
    adata.write_h5ad(tmp_path / "x.h5ad")
    backed = ad.read_h5ad(tmp_path / "x.h5ad", backed="r")
    with pytest.raises(InputError, match=r"backed mode .*anndata\.read_h5ad\(path\).*data\.backed=true"):
        deltanmf.fit_onestage(backed, K=2)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_outside_training_ends_with_one_line(make_cfg, monkeypatch, capsys, signum):
    """SIGTERM while a stage initialises ends as Ctrl+C does: exit 128 + signal and one line
    saying what is kept (not a traceback, not Lightning's handling, which is for training)."""
    import deltanmf.tl.fit as fit
    from deltanmf.workflow import main as cli

    def interrupted(*args, **kwargs):
        os.kill(os.getpid(), signum)
        time.sleep(5)  # the handler interrupts this
        raise AssertionError("the signal was not handled")

    monkeypatch.setattr(fit, "consensus_init", interrupted)
    cfg, run_dir = make_cfg(*QUICK)
    previous = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(SystemExit) as exit_info:
            cli.main(cfg)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert exit_info.value.code == 128 + signum
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"deltanmf: interrupted ({signal.Signals(signum).name}) outside training; no stage had "
                       "started training, so nothing was saved: run the command again")
