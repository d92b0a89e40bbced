"""The command line's entry point, called by ``train.py``: settings first, then the run.

The order matters to a user who mistyped: the composed configuration is checked
(:func:`~deltanmf.workflow.config.load_settings`) before torch and Lightning are imported or
any data is read, so a refused command returns in about the time Python takes to start.
Bad input ends with one line, ``deltanmf: error: ...``, and exit code 2; a NaN loss with
exit code 3; an interruption with 128 + the signal's number.
"""
from __future__ import annotations

import logging
import signal
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from ..errors import InputError, NonFiniteLossError, TrainingInterrupted
from .config import check_override_keys, load_settings

log = logging.getLogger(__name__)

RECORD = ".hydra"  # Hydra's record of a run (config.yaml, hydra.yaml, overrides.yaml)


def _no_advertising(record: logging.LogRecord) -> bool:
    """Drop Lightning's suggestion to install its cloud logger, printed once per Trainer, and
    its note that a checkpoint it reads back (our own) is loaded with ``weights_only=False``."""
    message = str(record.msg)
    return "litlogger" not in message and "`weights_only` was not set" not in message


def quiet_lightning() -> None:
    """What Lightning prints that a user can do nothing about: its logger advertisement, a note
    on loading our own checkpoints, a warning about a torch API it calls itself, and a second
    copy of each of its lines (its own console handler, beside the logging already configured
    by Hydra or the user: the lines still reach that, and the run's log file)."""
    import warnings

    import lightning  # adds a console handler to the "lightning" logger on import

    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero",
                 "lightning.pytorch.trainer.connectors.checkpoint_connector"):
        logging.getLogger(name).addFilter(_no_advertising)
    if logging.getLogger().handlers:
        own = logging.getLogger(lightning.__name__)
        for handler in list(own.handlers):
            if type(handler) is logging.StreamHandler:
                own.removeHandler(handler)
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")


def write_record(run_dir: Path, cfg: DictConfig) -> None:
    """Hydra's record of this run, written once the command has passed its checks (Hydra's own
    writing is off, ``hydra.output_subdir: null``): a command refused in the directory of an
    earlier run leaves that run's record as it was."""
    from hydra.core.hydra_config import HydraConfig

    from ..files import atomic_write_text

    hydra_cfg = HydraConfig.get()
    record = run_dir / RECORD
    record.mkdir(parents=True, exist_ok=True)
    atomic_write_text(record / "config.yaml", OmegaConf.to_yaml(cfg))
    atomic_write_text(record / "hydra.yaml", OmegaConf.to_yaml({"hydra": hydra_cfg}))
    atomic_write_text(record / "overrides.yaml", OmegaConf.to_yaml(list(hydra_cfg.overrides.task)))


class Terminated(BaseException):
    """SIGTERM outside training (training stops by Lightning's own handling)."""


def _last_words(level: int, message: str, prefix: str = "") -> None:
    """``deltanmf: message`` on stderr, once, and the same line in the run's log file (not
    again on the console, where Hydra's handler would repeat it)."""
    print(f"deltanmf: {prefix}{message}", file=sys.stderr)
    record = log.makeRecord(log.name, level, __file__, 0, "%s", (message,), None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def check_command_line(argv: list[str]) -> None:
    """Refuse an unknown key among the command's overrides before Hydra composes anything
    (Hydra would answer with its ``+key`` hint): one line and exit code 2."""
    try:
        check_override_keys(argv)
    except InputError as err:
        print(f"deltanmf: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def _terminate(signum, frame) -> None:
    from ..train import trainer

    if not trainer.FITTING:
        raise Terminated


def main(cfg: DictConfig) -> float:
    """Run into Hydra's output directory; bad input exits with one message.

    Returns the final relative reconstruction error (of stage 2 when it ran), the value a
    Hydra sweeper would minimise.
    """
    from hydra.core.hydra_config import HydraConfig

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        settings = load_settings(cfg)  # every value checked: nothing heavy imported yet
        quiet_lightning()
        from .run import run  # torch, Lightning

        signal.signal(signal.SIGTERM, _terminate)
        given = frozenset(item.split("=", 1)[0].lstrip("+~") for item in HydraConfig.get().overrides.task)
        result = run(settings, run_dir, on_checked=lambda: write_record(run_dir, cfg), given=given)
    except (InputError, NonFiniteLossError) as err:
        _last_words(logging.ERROR, str(err), prefix="error: ")
        raise SystemExit(2 if isinstance(err, InputError) else 3) from None
    except TrainingInterrupted as err:
        _last_words(logging.WARNING, str(err))
        raise SystemExit(128 + err.signum) from None  # the shell's convention for death by signal
    except (KeyboardInterrupt, Terminated) as err:  # outside training (reading, initialising, writing)
        from .resume import what_is_kept

        signum = signal.SIGTERM if isinstance(err, Terminated) else signal.SIGINT
        message = f"interrupted ({signum.name}) outside training; {what_is_kept(run_dir)}"
        _last_words(logging.WARNING, message)
        raise SystemExit(128 + signum) from None
    last = result.metrics.get("stage2", result.metrics["stage1"])
    return float(last.get("relative_error", float("nan")))
