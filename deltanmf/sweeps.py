"""Names of Hydra multirun job folders: only the swept keys (``K=10``), never a path.

Hydra's ``override_dirname`` joins every command-line override, so fixed settings such
as ``data.path=/data/screen.h5ad`` end up in each job's folder name and their slashes nest
folders. ``sweep_subdir`` keeps the overrides whose key is swept on the command line
(a top-level comma, or a sweep function such as ``range(...)``); it is registered as the
OmegaConf resolver ``deltanmf_sweep_subdir`` when :mod:`deltanmf.pipeline` is imported.
"""
from __future__ import annotations

import re
import sys
from collections.abc import Sequence

from omegaconf import OmegaConf

_SWEEP_FUNCTION = re.compile(r"^\s*(range|choice|glob|interval|tag|shuffle|sort)\(")


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _is_sweep(value: str) -> bool:
    if _SWEEP_FUNCTION.match(value):
        return True
    depth, quote = 0, None
    for char in value:
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "[{(":
            depth += 1
        elif char in "]})":
            depth -= 1
        elif char == "," and depth == 0:
            return True
    return False


def swept_keys(argv: Sequence[str]) -> set[str]:
    """Keys given a sweep (``K=5,10``, ``seed=range(3)``) among command-line overrides."""
    return {_key(arg) for arg in argv if "=" in arg and _is_sweep(arg.split("=", 1)[1])}


def sweep_subdir(task_overrides: Sequence[str], job_num: int | str = 0) -> str:
    """Folder name of one job: its swept overrides joined by commas (``/`` made safe)."""
    swept = swept_keys(sys.argv[1:])
    parts = sorted(o for o in task_overrides if _key(o) in swept)
    name = ",".join(parts) if parts else f"job{job_num}"
    return name.replace("/", "_")


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("deltanmf_sweep_subdir"):
        OmegaConf.register_new_resolver("deltanmf_sweep_subdir", sweep_subdir)
