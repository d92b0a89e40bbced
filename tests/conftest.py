"""Shared fixtures: the real Hydra config, composed and shrunk for fast tests."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"

# A small demo: 5 planted programs, 300 genes, 250 + 250 cells; a light consensus.
SMALL = [
    "K=5",
    "data.simulation.n_genes=300",
    "data.simulation.n_programs=5",
    "data.simulation.n_case_programs=2",
    "data.simulation.n_control=250",
    "data.simulation.n_case=250",
    "data.simulation.markers_per_program=30",
    "model.consensus.replicates=3",
    "model.consensus.iterations=100",
    "trainer.max_steps=400",
    "trainer.accelerator=cpu",
    "trainer.enable_progress_bar=false",
]


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("demo-cache")


@pytest.fixture
def make_cfg(tmp_path, cache_dir):
    """Compose conf/config.yaml with the small overrides plus ``overrides``; returns (cfg, run_dir)."""

    def _make(*overrides: str, small: bool = True):
        """``small=False``: without the shrunk demo (e.g. for data=h5ad)."""
        shrink = SMALL if small else [o for o in SMALL if not o.startswith("data.simulation.")]
        GlobalHydra.instance().clear()
        with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
            cfg = compose("config", overrides=[*shrink, *overrides], return_hydra_config=True)
        run_dir = tmp_path / "run"
        with open_dict(cfg):
            cfg.hydra.runtime.output_dir = str(run_dir)
            if "cache_dir" in cfg.data:
                cfg.data.cache_dir = str(cache_dir)
        HydraConfig.instance().set_config(cfg)
        GlobalHydra.instance().clear()
        return cfg, run_dir

    return _make


def write_similarity(folder: Path, genes, s, sparse: bool = False, name: str = "S") -> tuple[Path, Path]:
    """Write a similarity resource as the loader reads it: ``S.npy`` (or ``S.npz``) and ``genes.json``."""
    folder.mkdir(parents=True, exist_ok=True)
    genes_path = folder / "genes.json"
    genes_path.write_text(json.dumps([str(g) for g in genes]))
    if sparse:
        path = folder / f"{name}.npz"
        sp.save_npz(path, sp.csr_matrix(s))
    else:
        path = folder / f"{name}.npy"
        np.save(path, s)
    return path, genes_path


@pytest.fixture
def similarity_files():
    """The :func:`write_similarity` writer, for tests that need resource files."""
    return write_similarity
