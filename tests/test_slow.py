"""Long checks, skipped by default; run with ``python -m pytest -m slow``."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.parametrize("batch", ["null", "256"], ids=["full-batch", "minibatch"])
def test_default_demo_recovers_the_planted_truth(tmp_path, batch):
    """The bare ``python train.py`` demo at full size: everything planted is found."""
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), f"data.batch_size={batch}",
                           f"data.cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={tmp_path / 'run'}",
                           "trainer.enable_progress_bar=false"], capture_output=True, text=True, timeout=3000)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rec = json.loads((tmp_path / "run" / "results" / "metrics.json").read_text())["recovery"]
    assert rec["baseline_min"] >= 0.99 and rec["case_min"] >= 0.95
    assert rec["shifts_called_correctly"] == rec["shifts_planted"] == 3 and rec["shifts_false"] == 0
    assert all(rec["planted_case_programs_emergent"])


@pytest.mark.slow
def test_prior_on_the_default_demo(tmp_path):
    """resource=demo on the full demo: the prior switches on and recovery stays high."""
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "resource=demo",
                           f"data.cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={tmp_path / 'run'}",
                           "trainer.enable_progress_bar=false"], capture_output=True, text=True, timeout=3000)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "results" / "metrics.json").read_text())
    assert metrics["stage1"]["laplacian_alpha"] > 0 and metrics["resource"]["coverage"] == 1.0
    assert metrics["recovery"]["baseline_min"] >= 0.99
