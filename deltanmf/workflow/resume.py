"""Continuing an interrupted run: where its checkpoints are, and whether its settings match.

``resume=true`` continues from the run directory's ``checkpoints/``; ``ckpt_path=FILE``
continues FILE's stage from FILE and takes finished earlier stages from FILE's directory.
Every checkpoint carries the settings it was made with (the keys a continuation must share,
:data:`RESUME_KEYS`); each one a continuation would read is compared with the current
settings before any work.
"""
from __future__ import annotations

import logging

from dataclasses import asdict
from pathlib import Path

from ..errors import InputError
from ..settings import RunSettings
from ..train.trainer import Resume, stage_of

# settings that must match between an interrupted run and its continuation
RESUME_KEYS = ("stage", "K", "K_case", "seed", "stage1_from", "data", "model", "resource")
NOT_COMPARED = ("num_workers", "cache_dir")  # data settings a continuation may change

log = logging.getLogger(__name__)


def resume_source(settings: RunSettings, run_dir: Path) -> Resume | None:
    """Where an interrupted run's checkpoints are (``resume=true`` / ``ckpt_path=FILE``), or None.

    Raises
    ------
    InputError
        No such checkpoint file, not a stage checkpoint, or no checkpoints to resume from.
    """
    if settings.ckpt_path:
        file = Path(settings.ckpt_path).expanduser()
        if not file.is_file():
            raise InputError(f"ckpt_path={settings.ckpt_path}: no such file; give a checkpoint from a run's "
                             "checkpoints/ directory (e.g. .../checkpoints/stage1-last.ckpt)")
        if not stage_of(file).startswith(("stage1", "stage2")):
            raise InputError(f"ckpt_path={settings.ckpt_path}: not a DeltaNMF stage checkpoint (expected a name like "
                             "stage1-last.ckpt or stage2.ckpt)")
        return Resume(file.parent, file)
    if settings.resume:
        directory = run_dir / "checkpoints"
        if not list(directory.glob("*.ckpt")):
            raise InputError(f"resume=true: no checkpoints in {directory}; run in the interrupted run's directory "
                             "(hydra.run.dir=<its directory>) or give a checkpoint with ckpt_path=...")
        return Resume(directory)
    return None


def settings_record(settings: RunSettings) -> str:
    """The settings a continuation must share with the run, as YAML."""
    from omegaconf import OmegaConf

    values = asdict(settings)
    record = {key: values[key] for key in RESUME_KEYS}
    # how cells are loaded or where the demo is cached does not change a batch: not compared
    record["data"] = {key: value for key, value in record["data"].items() if key not in NOT_COMPARED}
    return OmegaConf.to_yaml(record)


def _saved_settings(path: Path) -> tuple[str | None, int]:
    """The settings record a checkpoint carries and its step (memory-mapped: only these small
    records are read)."""
    import torch

    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as err:  # noqa: BLE001 - torch raises many types for a damaged file
        raise InputError(f"cannot read the checkpoint {path} ({type(err).__name__}: {err}); the file is damaged: "
                         "delete it to fit that stage again, or start a new run (overwrite=true)") from None
    return checkpoint.get("deltanmf", {}).get("settings"), int(checkpoint.get("global_step", 0))


def check_resumable(settings: RunSettings, source: Resume | None) -> None:
    """Refuse to continue from a checkpoint made with other settings (naming the keys that
    differ), or from one that cannot be read."""
    if source is None:
        return
    from omegaconf import OmegaConf

    record = settings_record(settings)
    files = sorted(set(source.directory.glob("*.ckpt")) | ({source.file} if source.file else set()))
    cap = (settings.trainer or {}).get("max_steps")
    for path in files:
        saved, step = _saved_settings(path)
        if saved == record:
            # the step cap may change on a resume (a longer run): say which one applies now
            log.info("resume: %s continues from step %d; trainer.max_steps=%s now caps it", path.name, step, cap)
            continue
        if saved is None:
            raise InputError(f"cannot resume from {path}: it does not say which settings it was made with (an "
                             "older DeltaNMF wrote it); start a new run (overwrite=true)")
        before, now = OmegaConf.create(saved), OmegaConf.create(record)
        changed = [k for k in RESUME_KEYS if before.get(k) != now.get(k)]
        raise InputError(f"cannot resume from {path}: it was made with different settings ({', '.join(changed)}); "
                         "resume with the interrupted run's settings, or start a new run")


def what_is_kept(run_dir: Path) -> str:
    """What an interrupted run leaves to continue from, said for the user."""
    kept = sorted(p.name for p in (run_dir / "checkpoints").glob("stage*.ckpt"))
    if kept:
        return (f"kept {', '.join(kept)} in {run_dir / 'checkpoints'}: continue with resume=true in the same "
                f"run directory (hydra.run.dir={run_dir})")
    return "no stage had started training, so nothing was saved: run the command again"

