"""The bundled demo: a seeded simulated case-control dataset, generated once and cached."""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from ..files import atomic_write
from .simulate import SIMULATOR_VERSION, simulate_case_control

log = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    """``$DELTANMF_CACHE_DIR``, else ``~/.cache/deltanmf``."""
    return Path(os.environ.get("DELTANMF_CACHE_DIR", Path.home() / ".cache" / "deltanmf"))


def demo_path(simulation: dict, cache_dir: str | Path | None = None) -> Path:
    """Path of the demo h5ad for these simulation parameters, simulating and caching it if needed.

    The file name carries a hash of the parameters and of the simulator's version, so
    changing either gives a new file rather than a stale one. The file is written atomically.
    """
    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    params = dict(simulation)
    keyed = {**params, "simulator_version": SIMULATOR_VERSION}
    key = hashlib.sha256(json.dumps(keyed, sort_keys=True, default=str).encode()).hexdigest()[:12]
    path = cache / f"demo-{key}.h5ad"
    if path.exists():
        return path
    cache.mkdir(parents=True, exist_ok=True)
    log.info("simulating the demo dataset into %s", path)
    adata = simulate_case_control(**params)
    return atomic_write(path, adata.write_h5ad)
