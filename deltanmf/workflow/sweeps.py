"""Hydra multirun sweeps: job folder names, the HParams record of a run, and the end-of-sweep summary.

Job folders are named by the swept keys only (``K=10``), never a path. Hydra's
``override_dirname`` joins every command-line override, so fixed settings such as
``data.path=/data/screen.h5ad`` end up in each job's folder name and their slashes nest
folders. ``sweep_subdir`` keeps the overrides whose key is swept (Hydra's own override
parser tells: a comma list or a sweep function such as ``range(...)``); it is the OmegaConf
resolver ``deltanmf_sweep_subdir``, registered by :class:`SweepCallback`, which Hydra
creates before it names any job's folder.

:class:`SweepCallback` (configured in ``conf/hydra/default.yaml``) tells the jobs which keys
are swept, also when a launcher runs them in other processes or on other machines, and writes
the K-selection summary (:func:`deltanmf.tl.select_k.select_k`) when the sweep ends.
"""
from __future__ import annotations

import logging
import math
import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from ..settings import RunSettings

log = logging.getLogger(__name__)

# Set by SweepCallback.on_multirun_start; inherited by launcher worker processes (joblib's loky
# workers, submitit jobs), whose own sys.argv is not the user's command line.
SWEPT_KEYS_ENV = "DELTANMF_SWEPT_KEYS"


def _parse(overrides: Sequence[str]):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create().parse_overrides(list(overrides))


def _key(override: str) -> str:
    return _parse([override])[0].key_or_group


def swept_keys(argv: Sequence[str]) -> set[str]:
    """Keys given a sweep (``K=5,10``, ``seed=range(3)``) among command-line overrides
    (arguments that are not overrides, such as ``-m``, are skipped)."""
    overrides = [arg for arg in argv if "=" in arg and not arg.startswith("-")]
    try:
        return {o.key_or_group for o in _parse(overrides) if o.is_sweep_override()}
    except Exception:  # noqa: BLE001 - Hydra reports a malformed override itself
        return set()


def _current_swept_keys() -> set[str]:
    recorded = os.environ.get(SWEPT_KEYS_ENV)
    if recorded is not None:
        return {k for k in recorded.split(",") if k}
    return swept_keys(sys.argv[1:])


def sweep_subdir(task_overrides: Sequence[str], job_num: int | str = 0) -> str:
    """Folder name of one job: its swept overrides joined by commas (``/`` made safe)."""
    swept = _current_swept_keys()
    parts = sorted(o for o in task_overrides if _key(o) in swept)
    name = ",".join(parts) if parts else f"job{job_num}"
    return name.replace("/", "_")


def register_resolver() -> None:
    """Register :func:`sweep_subdir` as the resolver ``deltanmf_sweep_subdir`` (once)."""
    if not OmegaConf.has_resolver("deltanmf_sweep_subdir"):
        OmegaConf.register_new_resolver("deltanmf_sweep_subdir", sweep_subdir)


# -- HParams --------------------------------------------------------------------------------
def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def hparams_record(settings: RunSettings, metrics: dict) -> tuple[dict[str, Any], dict[str, float]]:
    """The hyperparameters and final metrics of a run, for TensorBoard's HParams tab.

    Parameters
    ----------
    settings
        The run's settings.
    metrics
        The run's ``metrics.json`` contents.

    Returns
    -------
    (params, final)
        ``params``: ``K``, ``K_case`` (two-stage), ``stage``, ``seed``, ``model/lr``,
        ``model/replicates``, ``model/null_fit``, ``model/activation``,
        ``model/stage1/rel_alpha``, ``model/stage2/rel_alpha``, ``model/stage2/rel_gamma``,
        ``model/stage2/refine_rounds``, ``data/batch_size`` (``full`` for full batch),
        ``resource`` (its name or ``none``), ``stage1_from``. ``final``: the finite values among ``final/stage1_relative_error``,
        ``final/stage1_stability`` (replicate stability, else that of the consensus
        initialisation), ``final/stage2_relative_error``, ``final/baseline_only_relative_error``,
        ``final/explained_variance_gain``, ``final/null_explained_variance_gain``,
        ``final/stage2_stability`` and, on simulated data, ``final/recovery_baseline_mean``
        and ``final/recovery_case_mean``.
    """
    twostage = metrics.get("stage") == "twostage"
    model = settings.model
    resource = settings.resource
    batch = settings.data.batch_size
    params: dict[str, Any] = {
        "K": int(metrics.get("K", settings.K)),
        "stage": str(metrics.get("stage", settings.stage.name)),
        "seed": settings.seed,
        "model/lr": model.lr,
        "model/replicates": model.replicates,
        "model/null_fit": model.null_fit and twostage,
        "model/activation": model.activation,
        "model/stage1/rel_alpha": model.stage1.rel_alpha,
        "data/batch_size": "full" if batch is None else batch,
        "resource": "none" if not resource else str(resource.get("name", "custom")),
        "stage1_from": settings.stage1_from or "",
    }
    if twostage:
        params.update({"K_case": int(metrics.get("K_case", settings.K_case)),
                       "model/stage2/rel_alpha": model.stage2.rel_alpha,
                       "model/stage2/rel_gamma": model.stage2.rel_gamma,
                       "model/stage2/refine_rounds": model.stage2.refine_rounds})
    s1, s2 = metrics.get("stage1", {}), metrics.get("stage2", {})
    recovery = metrics.get("recovery") or {}
    candidates = {
        "final/stage1_relative_error": s1.get("relative_error"),
        "final/stage1_stability": s1.get("replicate_stability", s1.get("consensus_stability")),
        "final/stage2_relative_error": s2.get("relative_error"),
        "final/baseline_only_relative_error": s2.get("baseline_only_relative_error"),
        "final/explained_variance_gain": s2.get("explained_variance_gain"),
        "final/null_explained_variance_gain": s2.get("null_explained_variance_gain"),
        "final/stage2_stability": s2.get("replicate_stability"),
        "final/recovery_baseline_mean": recovery.get("baseline_mean"),
        "final/recovery_case_mean": recovery.get("case_mean"),
    }
    final = {k: float(v) for k, v in candidates.items() if _finite(v)}
    return params, final


# -- the Hydra callback -------------------------------------------------------------------------
def _sweeper_keys(config: DictConfig) -> Iterable[str]:
    params = OmegaConf.select(config, "hydra.sweeper.params")
    return [] if params is None else [str(k) for k in params]


class SweepCallback(Callback):
    """Hydra callback of a multirun: names job folders by the swept keys, and summarises the sweep.

    Parameters
    ----------
    select_k
        Write ``k_selection.csv`` / ``k_selection.png`` into the sweep directory and log the
        suggested K when all jobs have finished (:func:`deltanmf.select_k.select_k`).
    margin, gain_tolerance
        Passed to :func:`deltanmf.select_k.select_k`.
    """

    def __init__(self, select_k: bool, margin: float, gain_tolerance: float) -> None:
        self.select_k = select_k
        self.margin = margin
        self.gain_tolerance = gain_tolerance
        register_resolver()

    def __setstate__(self, state: dict) -> None:  # unpickled in a launcher's worker process
        self.__dict__.update(state)
        register_resolver()

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        task = list(OmegaConf.select(config, "hydra.overrides.task") or [])
        keys = swept_keys(task) | set(_sweeper_keys(config))
        os.environ[SWEPT_KEYS_ENV] = ",".join(sorted(keys))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        os.environ.pop(SWEPT_KEYS_ENV, None)
        if not self.select_k:
            return
        from ..tl.select_k import select_k  # imports matplotlib: only when a sweep ends

        sweep_dir = Path(str(config.hydra.sweep.dir))
        try:
            choice = select_k(sweep_dir, margin=self.margin, gain_tolerance=self.gain_tolerance)
        except ValueError as err:  # e.g. no finished run: the sweep's own results stand
            log.warning("K selection skipped: %s", err)
            return
        for line in choice.report().splitlines():
            log.info("%s", line)
