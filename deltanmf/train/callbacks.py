"""Stopping on convergence (Lightning's EarlyStopping with a relative tolerance), and the progress bar."""
from __future__ import annotations

import math

import torch
from lightning.pytorch.callbacks import EarlyStopping, TQDMProgressBar
from lightning.pytorch.callbacks.early_stopping import EarlyStoppingReason

from ..errors import NonFiniteLossError
from ..settings import StopSettings
from .modules import WINDOW_LOSS


class ConvergenceStop(EarlyStopping):
    """Stop when the loss's relative improvement stays below ``tol`` for ``patience`` checks.

    Lightning's :class:`~lightning.pytorch.callbacks.EarlyStopping` on the stage's loss
    averaged over windows of ``check_every`` steps (``train/loss_window``, logged by the
    module: whole epochs in minibatch mode, so a check compares whole passes over the cells;
    one host-device synchronisation per window). EarlyStopping's check runs at each window's
    last step, before that step's checkpoint is written, instead of at an epoch's end: a fit
    resumed from a checkpoint of an epoch's last step never sees that epoch end again, and
    the check would be lost. A check makes progress when its mean beats
    the best mean so far by the relative margin ``tol`` (EarlyStopping's ``min_delta``, set to
    ``tol`` times the best before each check). The best is the lowest mean seen, also when it
    fell by less than ``tol`` (EarlyStopping alone would keep the last mean that made
    progress, and a slow steady fall would then count as progress every few checks, on the
    demo 80 steps instead of 50 for the same error); comparing against the best, not the
    previous window, keeps minibatch noise from counting as progress for ever.

    What it adds: when the module has a further phase (the late-switching Laplacian prior),
    convergence starts that phase, with a convergence check of its own, instead of stopping;
    a window whose loss is not finite stops training with :class:`NonFiniteLossError` naming
    the term; and a stage restored from the checkpoint of a finished stage trains no further.
    With ``enabled=False`` (the published schedule) it never stops on convergence, but still
    on a non-finite loss.
    """

    def __init__(self, settings: StopSettings):
        super().__init__(monitor=WINDOW_LOSS, mode="min", patience=settings.patience if settings.enabled else math.inf,
                         check_finite=False, strict=False, check_on_train_epoch_end=True)
        self.tol = settings.tol
        self.finished = False

    def state_dict(self) -> dict:
        return {**super().state_dict(), "finished": self.finished}

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self.finished = bool(state_dict.get("finished", False))

    def on_train_start(self, trainer, pl_module) -> None:
        if self.finished:  # restored from a finished stage's checkpoint: nothing left to train
            trainer.should_stop = True

    def on_train_end(self, trainer, pl_module) -> None:
        self.finished = True

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        """Checked at the windows' last steps instead (:meth:`on_train_batch_end`)."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not pl_module.window_ended:
            return
        current = trainer.callback_metrics[WINDOW_LOSS]
        if not torch.isfinite(current):
            terms = getattr(pl_module, "last_terms", {})
            bad = [name for name, value in terms.items() if not torch.isfinite(value)] or ["loss"]
            first = max(trainer.global_step - pl_module.window_length() + 1, 1)
            raise NonFiniteLossError(
                f"the loss became NaN or infinite between steps {first} and {trainer.global_step} (non-finite "
                f"term: {', '.join(bad)}); no results were written. Lower model.lr, keep data.scale_genes=true, "
                "or check the input for extreme values.")
        best = float(self.best_score)
        # EarlyStopping keeps min_delta negated in "min" mode: progress is current - min_delta < best
        self.min_delta = -self.tol * abs(best) if math.isfinite(best) else 0.0
        stopping = trainer.should_stop
        super().on_train_epoch_end(trainer, pl_module)  # EarlyStopping's check on the window's mean
        self.best_score = torch.minimum(self.best_score.to(current.device), current)
        if trainer.should_stop and not stopping and self.stopping_reason == EarlyStoppingReason.PATIENCE_EXHAUSTED:
            if pl_module.advance_phase():  # the prior phase starts, its convergence checked from scratch
                trainer.should_stop = False
                self.wait_count, self.best_score = 0, torch.tensor(math.inf)
                self.stopping_reason = EarlyStoppingReason.NOT_STOPPED
            else:
                pl_module.converged = True
                pl_module.stop_reason = "converged"


class ProgressBar(TQDMProgressBar):
    """Lightning's bar without the logger version (``v_num``), which means nothing here."""

    def get_metrics(self, trainer, pl_module):
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        return items
