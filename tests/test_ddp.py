"""Data-parallel training: two CPU processes (DDP, gloo) find what one process finds."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["K=5", "data.simulation.n_genes=300", "data.simulation.n_programs=5", "data.simulation.n_case_programs=2",
         "data.simulation.n_control=250", "data.simulation.n_case=250", "data.simulation.markers_per_program=30",
         "model.consensus.replicates=3", "model.consensus.iterations=100", "trainer.max_steps=600",
         "trainer.accelerator=cpu", "trainer.enable_progress_bar=false", "K_case=2"]


def _run(out: Path, cache: Path, *args: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *SMALL, f"data.cache_dir={cache}",
                           f"hydra.run.dir={out}", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "results" / "metrics.json").read_text())


@pytest.mark.parametrize("mode", [[], ["data.batch_size=100"]], ids=["full_batch", "minibatch"])
def test_two_processes_recover_what_one_process_recovers(tmp_path, cache_dir, mode):
    one = _run(tmp_path / "one", cache_dir, *mode)
    two = _run(tmp_path / "two", cache_dir, "trainer=ddp", "trainer.devices=2", *mode)
    assert two["stage1"]["device"] == "cpu"
    for key in ("baseline_min", "case_min"):
        assert two["recovery"][key] > 0.97, key
        assert abs(two["recovery"][key] - one["recovery"][key]) < 0.02, key
    assert two["recovery"]["shifts_called_correctly"] == one["recovery"]["shifts_called_correctly"]
    for stage in ("stage1", "stage2"):
        assert np.isclose(two[stage]["relative_error"], one[stage]["relative_error"], rtol=0.02)
    # one set of outputs, written once, by the first process
    assert (tmp_path / "two" / "results" / "results.h5ad").is_file()
    assert (tmp_path / "two" / "checkpoints" / "stage2.ckpt").is_file()
