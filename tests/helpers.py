"""What the tests share besides fixtures: the real configuration's defaults as typed settings.

The defaults live in ``conf/`` (composed once here); a test changes only what it names,
as ``consensus(replicates=3)`` or ``data("condition", "ctrl", min_cells=0)``.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from deltanmf.settings import ConsensusSettings, DataSettings, ModelSettings, RunSettings, StopSettings
from deltanmf.workflow.config import default_settings, load_settings

DEFAULTS: RunSettings = default_settings("logger=none")


def consensus(**changes) -> ConsensusSettings:
    """``model.consensus`` with ``changes``."""
    return replace(DEFAULTS.model.consensus, **changes)


def stop(**changes) -> StopSettings:
    """``model.stop`` with ``changes``."""
    return replace(DEFAULTS.model.stop, **changes)


def model(**changes) -> ModelSettings:
    """``model`` with ``changes``; a dict for a sub-group (``consensus={...}``) changes only its keys."""
    groups = {}
    for name in ("consensus", "stop", "stage1", "stage2"):
        if isinstance(changes.get(name), dict):
            groups[name] = replace(getattr(DEFAULTS.model, name), **changes.pop(name))
    return replace(DEFAULTS.model, **changes, **groups)


def data(condition_key: str = "condition", control="control", **changes) -> DataSettings:
    """``data`` settings for an AnnData given in memory (``data.source=anndata``)."""
    return replace(DEFAULTS.data, source="anndata", path=None, simulation=None, cache_dir=None,
                   condition_key=condition_key, control=control, **changes)


def plan(run_dir: Path, **changes):
    """A :class:`~deltanmf.train.TrainingPlan` on the CPU without a progress bar or logger."""
    from deltanmf.train import TrainingPlan

    trainer = {**DEFAULTS.trainer, "accelerator": "cpu", "enable_progress_bar": False,
               **changes.pop("trainer", {})}
    base = dict(trainer=trainer, stop=DEFAULTS.model.stop, checkpoint=DEFAULTS.checkpoint, batch_size=None,
                num_workers=0, transposed_copy="auto", max_cells=DEFAULTS.model.consensus.max_cells,
                run_dir=Path(run_dir))
    return TrainingPlan(**{**base, **changes})


def module_args(**changes) -> dict:
    """Keyword arguments of :class:`~deltanmf.train.Stage1Module` at the defaults."""
    m = DEFAULTS.model
    args = dict(activation=m.activation, beta=m.beta, lr=m.lr, graph=None, rel_alpha=m.stage1.rel_alpha,
                laplacian_steps=m.stage1.laplacian_steps, minibatch=False, window=m.stop.check_every,
                prior_from=m.stage1.prior_from)
    return {**args, **changes}


def datamodule(x, **changes):
    """A :class:`~deltanmf.train.CellDataModule` at the defaults (full batch)."""
    from deltanmf.train import CellDataModule

    args = dict(batch_size=None, num_workers=0, seed=0, steps_per_epoch=DEFAULTS.model.stop.check_every,
                transposed_copy=False)
    return CellDataModule(x, **{**args, **changes})


def run(cfg, run_dir, **kwargs):
    """:func:`deltanmf.workflow.run.run` of a composed config (as ``train.py`` runs it)."""
    from deltanmf.workflow.run import run as run_settings

    return run_settings(load_settings(cfg), run_dir, **kwargs)
