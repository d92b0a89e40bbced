"""Stop training when the loss stops improving, instead of after a fixed step count."""
from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.callbacks import TQDMProgressBar

from ..data.errors import InputError, real_number, whole_number


def check_stop_settings(enabled=True, tol=1e-4, patience=3, check_every=10, **unknown) -> None:
    """Raise :class:`~deltanmf.data.InputError` unless the ``model.stop`` settings are usable:
    ``enabled`` a boolean, ``tol`` a number >= 0, ``patience`` and ``check_every`` whole
    numbers >= 1. Called before any work, so a bad value costs nothing."""
    if unknown:
        raise InputError(f"model.stop has no setting {sorted(unknown)}: its settings are enabled, tol, "
                         "patience and check_every")
    if not isinstance(enabled, bool):
        raise InputError(f"model.stop.enabled={enabled!r} must be true or false")
    if not real_number(tol) or not tol >= 0:
        raise InputError(f"model.stop.tol={tol!r} must be a number >= 0: give e.g. model.stop.tol=1e-4 "
                         "(the default); 0 stops only when a check does not improve at all")
    if not whole_number(patience) or patience < 1:
        raise InputError(f"model.stop.patience={patience!r} must be a whole number >= 1: give e.g. "
                         "model.stop.patience=3 (the default), or model.stop.enabled=false for no stop")
    if not whole_number(check_every) or check_every < 1:
        raise InputError(f"model.stop.check_every={check_every!r} must be a whole number >= 1: give e.g. "
                         "model.stop.check_every=10 (the default)")


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss; the message names the steps and the term."""


class ConvergenceStop(L.Callback):
    """Stop when the loss's relative improvement stays below ``tol`` for ``patience`` checks.

    The loss is averaged over windows of ``check_every`` steps (whole epochs in
    minibatch mode, so a check compares whole passes over the cells). A check makes
    progress when its mean beats the best mean so far by the relative margin ``tol``;
    comparing against the best, not the previous window, keeps minibatch noise from
    counting as progress for ever. Only one host-device synchronisation happens
    per window. When the module has a further phase (the late-switching Laplacian
    prior), convergence starts that phase instead of stopping. A window whose loss is
    not finite stops training with :class:`NonFiniteLossError`.

    Parameters
    ----------
    tol
        Relative improvement ``(previous - current) / previous`` counted as no progress.
    patience
        Consecutive checks without progress before stopping.
    check_every
        Window length in steps.
    """

    def __init__(self, tol: float = 1e-4, patience: int = 3, check_every: int = 10):
        if tol < 0 or patience < 1 or check_every < 1:
            raise ValueError("convergence needs tol >= 0, patience >= 1 and check_every >= 1")
        self.tol, self.patience, self.check_every = tol, patience, check_every
        self._finished = False
        self._reset()

    def _reset(self) -> None:
        self._sum = None
        self._count = 0
        self._best = None
        self._stalled = 0

    # -- resuming: the window, the best loss and whether the stage already finished ---------
    def state_dict(self) -> dict:
        return {"sum": None if self._sum is None else float(self._sum), "count": self._count,
                "best": self._best, "stalled": self._stalled, "finished": self._finished}

    def load_state_dict(self, state: dict) -> None:
        self._sum = state["sum"]  # a float; adding the next step's loss makes it a tensor again
        self._count, self._best, self._stalled = state["count"], state["best"], state["stalled"]
        self._finished = state["finished"]

    def on_train_start(self, trainer, pl_module) -> None:
        if self._finished:  # restored from a finished stage's checkpoint: nothing left to train
            trainer.should_stop = True

    def on_train_end(self, trainer, pl_module) -> None:
        self._finished = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self._sum = loss.detach() if self._sum is None else self._sum + loss.detach()
        self._count += 1
        # whole epochs in minibatch mode, so every window sees every cell equally often
        per_epoch = max(int(trainer.num_training_batches), 1)
        window = -(-self.check_every // per_epoch) * per_epoch
        if self._count < window:
            return
        # with several processes (DDP) every rank sees other cells: decide on the mean of all
        # ranks, so they all stop at the same step (identity on one device)
        mean = torch.as_tensor(self._sum, dtype=torch.float32, device=pl_module.device) / self._count
        current = float(trainer.strategy.reduce(mean, reduce_op="mean"))
        self._sum, self._count = None, 0
        if not torch.isfinite(torch.tensor(current)):
            terms = getattr(pl_module, "last_terms", {})
            bad = [name for name, value in terms.items() if not torch.isfinite(value)] or ["loss"]
            first = trainer.global_step - window + 1
            raise NonFiniteLossError(
                f"the loss became NaN or infinite between steps {max(first, 1)} and {trainer.global_step} "
                f"(non-finite term: {', '.join(bad)}); no results were written. Lower model.lr, keep "
                "data.scale_genes=true, or check the input for extreme values.")
        if self._best is None or (self._best - current) > self.tol * abs(self._best):
            self._best, self._stalled = current, 0
        else:
            self._stalled += 1
            self._best = min(self._best, current)
        if self._stalled >= self.patience:
            if pl_module.advance_phase():
                self._reset()
            else:
                pl_module.converged = True
                trainer.should_stop = True


class ProgressBar(TQDMProgressBar):
    """Lightning's bar without the logger version (``v_num``), which means nothing here."""

    def get_metrics(self, trainer, pl_module):
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        return items
