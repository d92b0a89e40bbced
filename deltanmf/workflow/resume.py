"""Continuing an interrupted run: where its checkpoints are, and whether its settings match.

``resume=true`` continues from the run directory's ``checkpoints/``; ``ckpt_path=FILE``
continues FILE's stage from FILE and takes finished earlier stages from FILE's directory.
The settings a continuation must share with the interrupted run are recorded beside the
checkpoints (``checkpoints/settings.yaml``) and compared before any work.
"""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from ..errors import InputError
from ..files import atomic_write_text
from ..settings import RunSettings
from ..train.trainer import Resume, stage_of

SETTINGS_FILE = "settings.yaml"
# settings that must match between an interrupted run and its continuation
RESUME_KEYS = ("stage", "K", "K_case", "seed", "stage1_from", "data", "model", "resource")


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
    return OmegaConf.to_yaml({key: values[key] for key in RESUME_KEYS})


def check_resumable(settings: RunSettings, run_dir: Path, source: Resume | None) -> None:
    """When continuing, require the settings recorded beside the checkpoints; then record
    this run's settings there."""
    from omegaconf import OmegaConf

    record = settings_record(settings)
    if source is not None:
        recorded = source.directory / SETTINGS_FILE
        if recorded.is_file() and recorded.read_text() != record:
            before, now = OmegaConf.create(recorded.read_text()), OmegaConf.create(record)
            changed = [k for k in RESUME_KEYS if before.get(k) != now.get(k)]
            raise InputError(f"cannot resume from {source.directory}: it was run with different settings "
                             f"({', '.join(changed)}); resume with the interrupted run's settings, or start a new run")
    directory = run_dir / "checkpoints"
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_text(directory / SETTINGS_FILE, record)


def what_is_kept(run_dir: Path) -> str:
    """What an interrupted run leaves to continue from, said for the user."""
    kept = sorted(p.name for p in (run_dir / "checkpoints").glob("stage*.ckpt"))
    if kept:
        return (f"kept {', '.join(kept)} in {run_dir / 'checkpoints'}: continue with resume=true in the same "
                f"run directory (hydra.run.dir={run_dir})")
    return "no stage had started training, so nothing was saved: run the command again"

