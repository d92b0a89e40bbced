"""What both stages' LightningModules share: the late-switching Laplacian prior, logging
every loss term, the optimiser, and reading results back."""
from __future__ import annotations

import lightning as L
import torch

from ..nmf import GeneGraph, LazyAdam, LossTerms, NeuralNMF, adaptive_strength


def _forget_prior_start(module, incompatible_keys) -> None:
    """A loaded state dict may carry another ``prior_start``: re-read it on next use."""
    module._prior_start_host = None


class NMFStageModule(L.LightningModule):
    """Base of :class:`Stage1Module` and :class:`Stage2Module`.

    Subclasses build ``self.model`` (a :class:`~deltanmf.nmf.NeuralNMF`) and implement
    :meth:`loss_terms`, calling :meth:`prior_strength` for the Laplacian term's weight.

    The Laplacian prior exists only with a gene graph and ``rel_alpha > 0``. It switches
    on late, for the last ``laplacian_steps`` steps: when the rest of the loss has
    converged (:meth:`advance_phase`, called by the convergence stop), or when the step
    cap (``trainer.max_steps``) is that close. At that moment ``alpha`` is set so that
    the term equals ``rel_alpha`` times the reconstruction loss.
    """

    model: NeuralNMF

    def __init__(self, *, graph: GeneGraph | None, lr: float, rel_alpha: float, laplacian_steps: int):
        super().__init__()
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if rel_alpha < 0:
            raise ValueError(f"rel_alpha must be >= 0, got {rel_alpha}")
        if laplacian_steps < 1:
            raise ValueError(f"laplacian_steps must be >= 1, got {laplacian_steps}")
        self.graph = graph
        self.lr = lr
        self.rel_alpha = rel_alpha
        self.laplacian_steps = laplacian_steps
        self.register_buffer("alpha", torch.zeros(()))
        # step at which the Laplacian switched on; -1 while off (a buffer so checkpoints keep it)
        self.register_buffer("prior_start", torch.tensor(-1))
        # its value on the host, so the per-step checks never read the device (None: read it once)
        self._prior_start_host: int | None = -1
        self.register_load_state_dict_post_hook(_forget_prior_start)
        self._switch_requested = False
        self._logged, self._batch_cells = True, 0  # whether this step's terms were logged (training_step)
        self.converged = False
        # what the stage's initialisation reported (time, stability): kept in checkpoints, so a
        # stage continued from one need not initialise again
        self.init_record: dict = {}

    # -- the prior's phases ---------------------------------------------------------
    @property
    def has_prior(self) -> bool:
        return self.graph is not None and self.rel_alpha > 0

    @property
    def prior_on(self) -> bool:
        return self._prior_start() >= 0

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

    def _cap_reached(self) -> bool:
        cap = self.trainer.max_steps if self._trainer is not None else -1
        return cap is not None and cap > 0 and self.global_step >= cap - self.laplacian_steps

    def prior_strength(self, recon: torch.Tensor, laplacian: torch.Tensor) -> torch.Tensor:
        """The Laplacian's weight this step (0 until it switches on)."""
        if self.has_prior and not self.prior_on and (self._switch_requested or self._cap_reached()):
            self.alpha.copy_(adaptive_strength(self.rel_alpha, recon, laplacian))
            self.prior_start.fill_(self.global_step)
            self._prior_start_host = self.global_step
            self._switch_requested = False
        return self.alpha if self.prior_on else torch.zeros_like(self.alpha)

    # -- Lightning hooks -------------------------------------------------------------
    def on_fit_start(self) -> None:
        if self.graph is not None:
            self.graph = self.graph.to(self.device)

    def loss_terms(self, x: torch.Tensor, index: torch.Tensor) -> LossTerms:
        raise NotImplementedError

    def training_step(self, batch, batch_idx):
        x, index = batch
        terms = self.loss_terms(x, index)
        # kept (detached, no sync) so a non-finite loss can be traced to its term
        self.last_terms = {name: value.detach() for name, value in terms.items()}
        self._batch_cells = x.shape[0]
        self._logged = self._loggers_write()
        if self._logged:
            self._log_terms()
        return terms.total

    def _loggers_write(self) -> bool:
        """Whether Lightning writes this step's metrics: every ``trainer.log_every_n_steps``
        steps (its own rule, which its monitoring callbacks consult too), every step of a
        fast dev run, and when training stops (see :meth:`on_train_batch_end`).

        ``self.log`` costs about half a millisecond per call in Lightning (it moves its
        stored metric to the value's device every time), a tenth of a full-batch step on
        the CPU here, so the terms are logged on the steps that are written only.
        """
        trainer = self._trainer
        connector = getattr(trainer, "_logger_connector", None)
        return connector is None or bool(trainer.fast_dev_run) or connector.should_update_logs

    def _log_terms(self) -> None:
        for name, value in self.last_terms.items():
            self.log(f"train/{name}", value, prog_bar=(name == "loss"), on_step=True, on_epoch=False,
                     batch_size=self._batch_cells)
        if self.graph is not None:
            self.log("train/alpha", self.alpha, on_step=True, on_epoch=False, batch_size=self._batch_cells)

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if self.prior_on and self.global_step - self._prior_start() >= self.laplacian_steps:
            self.trainer.should_stop = True
        if not self._logged and self._trainer is not None and self._trainer.should_stop:
            # the last step (the convergence stop decided in its callback, which Lightning calls
            # before this hook): Lightning writes it whatever the step, so it gets its own values
            self._log_terms()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["deltanmf"] = {"converged": self.converged, "init": dict(self.init_record)}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        saved = checkpoint.get("deltanmf", {})
        self.converged = bool(saved.get("converged", False))
        self.init_record = dict(saved.get("init") or self.init_record)

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
