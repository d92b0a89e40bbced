"""The two stages' LightningModules: optimiser, steps, logging. The math is in :mod:`deltanmf.core`.

:class:`Stage1Module` fits baseline programs and usage of the control cells;
:class:`Stage2Module` keeps those programs frozen (a buffer, never a parameter) and fits
case programs and the usage of the case cells. Both share :class:`NMFStageModule`: the
late-switching Laplacian prior, logging every loss term, the loss averaged over windows
of steps for the convergence stop, and the results.
"""
from __future__ import annotations

import math

import lightning as L
import torch

from ..core import Activation, GeneGraph, LazyAdam, LossTerms, NeuralNMF, adaptive_strength
from ..core.holdout import EntryMask, held_out_error
from ..core.losses import laplacian_penalty, orthogonality_penalty, reconstruction_loss, squared_error

# The training loss averaged over a window of ``window`` steps (whole epochs in minibatch
# mode), logged at the window's last step: what :class:`~deltanmf.train.callbacks.ConvergenceStop` watches.
WINDOW_LOSS = "train/loss_window"


class NMFStageModule(L.LightningModule):
    """Base of :class:`Stage1Module` and :class:`Stage2Module`.

    Subclasses build ``self.model`` (a :class:`~deltanmf.core.NeuralNMF`) and implement
    :meth:`loss_terms`, calling :meth:`prior_term` for the Laplacian term.

    The Laplacian prior exists only with a gene graph and ``rel_alpha > 0``. With
    ``prior_from="converged"`` it switches on late, for at most ``laplacian_steps`` steps at
    the end: when the rest of the loss has converged (:meth:`advance_phase`, called by the
    convergence stop, which then checks the prior's phase for convergence from scratch), or
    when the step cap (``trainer.max_steps``) is that close. With ``prior_from="start"`` it is
    on from the first step, and the fit has one phase. At the switch ``alpha`` is set so that
    the term equals ``rel_alpha`` times the reconstruction loss.

    With ``holdout`` (an :class:`~deltanmf.core.holdout.EntryMask`) the reconstruction loss
    leaves the held-out entries out (its mean is over the other entries). The term (:func:`~deltanmf.core.laplacian_penalty`) is
    scale-invariant per program, so it is met by changing the programs' shapes only.

    ``stop_reason`` says why training ended: ``converged`` (the loss stopped improving; with a
    prior, also in the prior's phase), ``prior_steps`` (the rest of the loss had converged and
    the prior's ``laplacian_steps`` ran out before its phase converged) or ``step_cap``
    (``trainer.max_steps``).
    """

    model: NeuralNMF

    def __init__(self, *, graph: GeneGraph | None, lr: float, rel_alpha: float, laplacian_steps: int, window: int,
                 prior_from: str = "start", holdout: EntryMask | None = None):
        super().__init__()
        self.graph = graph
        self.lr = lr
        self.rel_alpha = rel_alpha
        self.laplacian_steps = laplacian_steps
        self.window = window
        self.prior_from = prior_from
        self.holdout = holdout
        self.register_buffer("alpha", torch.zeros(()))
        # step at which the Laplacian switched on; -1 while off (a buffer so checkpoints keep it)
        self.register_buffer("prior_start", torch.tensor(-1))
        # its value on the host, so the per-step checks never read the device (None: read it once)
        self._prior_start_host: int | None = -1
        self.register_load_state_dict_post_hook(_forget_prior_start)
        self._switch_requested = prior_from == "start"  # switches on at the first step
        self._logged, self._batch_cells = True, 0  # whether this step's terms were logged (training_step)
        self._reporting = True  # whether this step's terms are reported (logged, or step 0 written)
        self._window_sum, self._window_steps = None, 0
        self.window_ended = False  # whether this step closed a window (WINDOW_LOSS logged)
        self.converged = False
        self.stop_reason = "step_cap"
        # what the stage's initialisation reported (time, stability) and the settings it was made
        # with: kept in checkpoints, so a continued stage need not initialise again
        self.init_record: dict = {}
        self.settings_record: str = ""

    # -- the prior's phases ---------------------------------------------------------
    @property
    def has_prior(self) -> bool:
        return self.graph is not None and self.rel_alpha > 0

    @property
    def prior_on(self) -> bool:
        return self._prior_start() >= 0

    @property
    def prior_start_step(self) -> int | None:
        """The step at which the prior switched on, or None."""
        start = self._prior_start()
        return start if start >= 0 else None

    def _prior_start(self) -> int:
        if self._prior_start_host is None:  # after loading a state dict: one read of the buffer
            self._prior_start_host = int(self.prior_start)
        return self._prior_start_host

    def advance_phase(self) -> bool:
        """Called on convergence: start the prior phase if there is one still to run.

        ``converged`` then records that the rest of the loss converged (the prior phase
        that follows has a fixed length); a prior started by the step cap leaves it False.
        """
        if self.has_prior and not self.prior_on:
            self._switch_requested = True
            self.converged = True
            return True
        return False

    def attached_trainer(self) -> L.Trainer | None:
        """The Trainer fitting this module, or None outside a fit (Lightning's ``trainer``
        property raises there)."""
        try:
            return self.trainer
        except RuntimeError:
            return None

    def _cap_reached(self) -> bool:
        trainer = self.attached_trainer()
        cap = trainer.max_steps if trainer is not None else -1
        return cap is not None and cap > 0 and self.global_step >= cap - self.laplacian_steps

    def prior_strength(self, recon: torch.Tensor, laplacian: torch.Tensor) -> torch.Tensor:
        """The Laplacian's weight this step (0 until it switches on; set when it does)."""
        if self.has_prior and not self.prior_on and (self._switch_requested or self._cap_reached()):
            self.alpha.copy_(adaptive_strength(self.rel_alpha, recon, laplacian))
            self.prior_start.fill_(self.global_step)
            self._prior_start_host = self.global_step
            self._switch_requested = False
        return self.alpha if self.prior_on else torch.zeros_like(self.alpha)

    def prior_term(self, recon: torch.Tensor,
                   programs: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(alpha * laplacian, laplacian)`` for the programs the prior acts on.

        While the prior is off the term has no weight: it is then evaluated only on the steps
        whose terms are reported, without gradient (one ``S @ W`` product, not three), and the
        first element is None. Without a gene graph both are None.
        """
        if self.graph is None:
            return None, None
        if self.has_prior and (self.prior_on or self._switch_requested or self._cap_reached()):
            laplacian = laplacian_penalty(self.graph, programs)
            return self.prior_strength(recon, laplacian) * laplacian, laplacian
        if not self._reporting:
            return None, None
        with torch.no_grad():
            return None, laplacian_penalty(self.graph, programs)

    # -- Lightning hooks -------------------------------------------------------------
    def on_fit_start(self) -> None:
        if self.graph is not None:
            self.graph = self.graph.to(self.device)

    def loss_terms(self, x: torch.Tensor, index: torch.Tensor) -> LossTerms:
        raise NotImplementedError

    def training_step(self, batch, batch_idx):
        x, index = batch
        self._batch_cells = x.shape[0]
        self._logged = self._loggers_write()
        start = self.global_step == 0 and not self._logged
        # a step that may be the last (a convergence check, the step cap) is logged if training stops there
        self._reporting = self._logged or start or self._may_stop()
        terms = self.loss_terms(x, index)
        # kept (detached, no sync) so a non-finite loss can be traced to its term
        self.last_terms = {name: value.detach() for name, value in terms.items()}
        self._close_window(self.last_terms["loss"])
        if self._logged:
            self._log_terms()
        elif start:
            self._write_start()
        return terms.total

    def _may_stop(self) -> bool:
        """Whether training may stop after this step: it closes a convergence window, or it is
        the step cap's last."""
        trainer = self.attached_trainer()
        cap = trainer.max_steps if trainer is not None else -1
        return self._window_steps + 1 >= self.window_length() or (cap is not None and 0 < cap <= self.global_step + 1)

    def _write_start(self) -> None:
        """Write step 0's terms through the loggers' own ``log_metrics``: Lightning writes only
        every ``log_every_n_steps`` steps, and a curve that starts there hides the start. One
        host read of a few scalars, on this step only."""
        trainer = self.attached_trainer()
        if trainer is None or not trainer.loggers:
            return
        values = {f"train/{name}": float(value) for name, value in self.last_terms.items()}
        if self.graph is not None:
            values["train/alpha"] = float(self.alpha)
        for logger in trainer.loggers:  # Lightning's loggers write on rank 0 only
            logger.log_metrics(values, step=0)

    def window_length(self) -> int:
        """Steps per convergence window: whole epochs of at least ``window`` steps (in full-batch
        mode an epoch is ``window`` steps), so every window sees every cell equally often."""
        trainer = self.attached_trainer()
        per_epoch = max(int(trainer.num_training_batches), 1) if trainer is not None else 1
        return -(-self.window // per_epoch) * per_epoch

    def _close_window(self, loss: torch.Tensor) -> None:
        """Add the step's loss to the window; at its last step, log the window's mean
        (:data:`WINDOW_LOSS`). Decided on the step, not at the epoch's end: Lightning does not
        replay an epoch's end for a fit resumed from a checkpoint of its last step."""
        self._window_sum = loss if self._window_sum is None else self._window_sum + loss
        self._window_steps += 1
        self.window_ended = self._window_steps >= self.window_length()
        if self.window_ended:
            trainer = self.attached_trainer()
            several = trainer is not None and trainer.world_size > 1
            # with several processes, every one decides on the mean of all
            self.log(WINDOW_LOSS, self._window_sum / self._window_steps, on_step=True, on_epoch=False,
                     batch_size=1, sync_dist=several)
            self._window_sum, self._window_steps = None, 0

    def _loggers_write(self) -> bool:
        """Whether Lightning writes this step's metrics: every ``trainer.log_every_n_steps``
        steps (counted as Lightning counts them, from 1), every step of a fast dev run, and
        when training stops (see :meth:`on_train_batch_end`).

        ``self.log`` costs about half a millisecond per call in Lightning (it moves its
        stored metric to the value's device every time), a tenth of a full-batch step on
        the CPU, so the terms are logged on the steps that are written only.
        """
        trainer = self.attached_trainer()
        if trainer is None or trainer.fast_dev_run:
            return True
        every = trainer.log_every_n_steps
        return bool(every) and ((self.global_step + 1) % every == 0 or trainer.should_stop)

    def _log_terms(self) -> None:
        for name, value in self.last_terms.items():
            self.log(f"train/{name}", value, prog_bar=(name == "loss"), on_step=True, on_epoch=False,
                     batch_size=self._batch_cells)
        if self.graph is not None:
            self.log("train/alpha", self.alpha, on_step=True, on_epoch=False, batch_size=self._batch_cells)

    def reconstruction(self, x: torch.Tensor, programs: torch.Tensor, usage: torch.Tensor,
                       index: torch.Tensor) -> torch.Tensor:
        """The batch's mean squared error, over the entries not held out (all without ``holdout``)."""
        if self.holdout is None:
            return reconstruction_loss(x, programs, usage)
        held, _, count = held_out_error(x, programs, usage, index, self.holdout)
        kept = x.shape[0] * x.shape[1] - count.sum()
        return (squared_error(x, programs, usage) - held.sum()) / kept

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        late = self.prior_from == "converged"
        if late and self.prior_on and self.global_step - self._prior_start() >= self.laplacian_steps:
            # a prior the step cap started ends with the cap; one convergence started, with its own steps
            self.stop_reason = "prior_steps" if self.converged else "step_cap"
            self.trainer.should_stop = True
        trainer = self.attached_trainer()
        if not self._logged and trainer is not None and trainer.should_stop:
            # the last step (the convergence stop decided in its callback, which Lightning calls
            # before this hook): Lightning writes it whatever the step, so it gets its own values
            self._log_terms()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        window = None if self._window_sum is None else float(self._window_sum)
        loss = getattr(self, "last_terms", {}).get("loss")
        checkpoint["deltanmf"] = {"converged": self.converged, "stop_reason": self.stop_reason,
                                  "loss_finite": loss is None or bool(torch.isfinite(loss)),
                                  "init": dict(self.init_record), "settings": self.settings_record,
                                  "window": [window, self._window_steps]}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        saved = checkpoint.get("deltanmf", {})
        self.converged = bool(saved.get("converged", False))
        self.stop_reason = saved.get("stop_reason", self.stop_reason)
        self.init_record = dict(saved.get("init") or self.init_record)
        window, steps = saved.get("window", [None, 0])
        self._window_sum = None if window is None else torch.tensor(window)
        self._window_steps = int(steps)

    def configure_optimizers(self):
        return LazyAdam(self.parameters(), lr=self.lr)

    # -- results ---------------------------------------------------------------------
    @torch.no_grad()
    def programs(self) -> torch.Tensor:
        """All programs, genes x K (stage 2: baseline then case)."""
        return self.model.programs().detach()

    @torch.no_grad()
    def usage(self) -> torch.Tensor:
        """Usage of every cell, cells x K."""
        return self.model.usage().detach()


def _forget_prior_start(module, incompatible_keys) -> None:
    """A loaded state dict may carry another ``prior_start``: re-read it on next use."""
    module._prior_start_host = None


class Stage1Module(NMFStageModule):
    """Neural NMF of the control cells: ``X_ctrl ~ W_base H``.

    Loss: ``mean((X - W H)^2) + alpha * laplacian``, the second term only with a gene graph,
    switched on late (see :class:`NMFStageModule`); ``laplacian`` is the mean over programs
    of the normalised Rayleigh quotient (:func:`deltanmf.core.laplacian_penalty`).

    Parameters
    ----------
    programs, usage
        Initial W (genes x K) and usage (cells x K), e.g. from the consensus initialisation.
    activation, beta
        Non-negative map (``"softplus"`` with sharpness ``beta``, or ``"relu"``).
    lr
        Adam learning rate.
    graph
        Gene-gene similarity over the same genes, or None.
    rel_alpha
        Relative strength of the Laplacian term.
    laplacian_steps
        Steps trained with the Laplacian term on (``prior_from="converged"``).
    prior_from
        When the prior switches on: ``"converged"`` (late) or ``"start"`` (from the first step).
    holdout
        Entries left out of the reconstruction loss, or None.
    minibatch
        Train on batches of cells (usage updated lazily, only for the batch's cells).
    window
        Steps over which the loss is averaged for the convergence stop (``model.stop.check_every``).
    """

    def __init__(self, programs: torch.Tensor, usage: torch.Tensor, *, activation: str, beta: float, lr: float,
                 graph: GeneGraph | None, rel_alpha: float, laplacian_steps: int, minibatch: bool, window: int,
                 prior_from: str = "start", holdout: EntryMask | None = None):
        super().__init__(graph=graph, lr=lr, rel_alpha=rel_alpha, laplacian_steps=laplacian_steps, window=window,
                         prior_from=prior_from, holdout=holdout)
        self.save_hyperparameters(dict(activation=activation, beta=beta, lr=lr, rel_alpha=rel_alpha,
                                       laplacian_steps=laplacian_steps, minibatch=minibatch, prior_from=prior_from,
                                       holdout=None if holdout is None else holdout.fraction))
        self.model = NeuralNMF(programs, usage, Activation(activation, beta), sparse_usage_grad=minibatch)

    def loss_terms(self, x: torch.Tensor, index: torch.Tensor) -> LossTerms:
        programs = self.model.programs()
        recon = self.reconstruction(x, programs, self.model.usage(index), index)
        # In minibatch mode the batch's mean reconstruction is an unbiased estimate of
        # the full one, so the prior keeps its full weight and every batch's loss
        # estimates the full objective (weighting both terms by the batch's share of
        # cells would sum to it exactly over an epoch; Adam ignores that constant).
        prior, laplacian = self.prior_term(recon, programs)
        total = recon if prior is None else recon + prior
        return LossTerms(total=total, recon=recon, laplacian=laplacian)


class Stage2Module(NMFStageModule):
    """Neural NMF of the case cells with the baseline programs frozen.

    ``X_case ~ [W_base, W_case] H``; W_base is a buffer (never a parameter, so it stays
    bit-for-bit what stage 1 produced); only W_case and H are trained. Loss:
    ``mean((X - [W_base, W_case] H)^2) + alpha * laplacian(W_case) + gamma * mean((B^T C)^2)``
    with B, C the column-L2-normalised baseline and case programs. ``gamma`` is set at the
    first step so the orthogonality term equals ``rel_gamma`` times the reconstruction loss;
    the Laplacian switches on late, as in stage 1. The start comes from
    :func:`deltanmf.core.stage2`.

    Parameters
    ----------
    baseline
        Frozen W_base, genes x K.
    case_programs
        Initial W_case, genes x K_case.
    usage
        Initial usage of the case cells, cells x (K + K_case).
    activation, beta, lr, graph, rel_alpha, laplacian_steps, minibatch, window, prior_from, holdout
        As for :class:`Stage1Module`.
    rel_gamma
        Relative strength of the orthogonality penalty (0 turns it off).
    """

    def __init__(self, baseline: torch.Tensor, case_programs: torch.Tensor, usage: torch.Tensor, *, activation: str,
                 beta: float, lr: float, graph: GeneGraph | None, rel_alpha: float, rel_gamma: float,
                 laplacian_steps: int, minibatch: bool, window: int, prior_from: str = "start",
                 holdout: EntryMask | None = None):
        super().__init__(graph=graph, lr=lr, rel_alpha=rel_alpha, laplacian_steps=laplacian_steps, window=window,
                         prior_from=prior_from, holdout=holdout)
        self.save_hyperparameters(dict(activation=activation, beta=beta, lr=lr, rel_alpha=rel_alpha,
                                       rel_gamma=rel_gamma, laplacian_steps=laplacian_steps, minibatch=minibatch,
                                       prior_from=prior_from, holdout=None if holdout is None else holdout.fraction))
        self.model = NeuralNMF(case_programs, usage, Activation(activation, beta), sparse_usage_grad=minibatch,
                               fixed_programs=baseline)
        self.rel_gamma = rel_gamma
        # set from the first batch (NaN until then; a buffer so checkpoints keep it)
        self.register_buffer("gamma", torch.full((), math.nan))
        self._gamma_ready = False

    @property
    def baseline(self) -> torch.Tensor:
        return self.model.fixed_programs

    def loss_terms(self, x: torch.Tensor, index: torch.Tensor) -> LossTerms:
        programs = self.model.programs()  # [baseline, case]
        case = programs[:, self.baseline.shape[1]:]
        recon = self.reconstruction(x, programs, self.model.usage(index), index)
        total = recon
        ortho = None
        if self.rel_gamma > 0:
            ortho = orthogonality_penalty(self.baseline, case)
            if not self._gamma_ready:  # one host sync, on the first step only
                if torch.isnan(self.gamma):
                    self.gamma.copy_(adaptive_strength(self.rel_gamma, recon, ortho))
                self._gamma_ready = True
            total = total + self.gamma * ortho
        prior, laplacian = self.prior_term(recon, case)
        if prior is not None:
            total = total + prior
        return LossTerms(total=total, recon=recon, laplacian=laplacian, ortho=ortho)
