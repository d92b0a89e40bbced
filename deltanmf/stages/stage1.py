"""Stage 1: the baseline programs of the control cells, as a LightningModule."""
from __future__ import annotations

import lightning as L
import torch

from ..nmf import Activation, GeneGraph, LazyAdam, LossTerms, NeuralNMF, adaptive_strength
from ..nmf.losses import laplacian_penalty, reconstruction_loss


class Stage1Module(L.LightningModule):
    """Neural NMF of the control cells: ``X_ctrl ~ W_base H``.

    Loss: ``mean((X - W H)^2) + alpha * tr(W^T L W) / (n_genes K)``. The Laplacian term
    exists only with a gene graph and ``rel_alpha > 0``; it switches on late, for the last
    ``laplacian_steps`` steps: when the reconstruction has converged, or when the step cap
    (``trainer.max_steps``) is that close. At that moment ``alpha`` is set so that the
    term equals ``rel_alpha`` times the reconstruction loss.

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
        Steps trained with the Laplacian term on.
    minibatch
        Train on batches of cells (usage updated lazily, only for the batch's cells).
    """

    def __init__(self, programs: torch.Tensor, usage: torch.Tensor, *, activation: str = "softplus",
                 beta: float = 5.0, lr: float = 0.01, graph: GeneGraph | None = None, rel_alpha: float = 0.0,
                 laplacian_steps: int = 200, minibatch: bool = False):
        super().__init__()
        if rel_alpha < 0:
            raise ValueError(f"rel_alpha must be >= 0, got {rel_alpha}")
        if laplacian_steps < 1:
            raise ValueError(f"laplacian_steps must be >= 1, got {laplacian_steps}")
        self.save_hyperparameters(dict(activation=activation, beta=beta, lr=lr, rel_alpha=rel_alpha,
                                       laplacian_steps=laplacian_steps, minibatch=minibatch))
        self.model = NeuralNMF(programs, usage, Activation(activation, beta), sparse_usage_grad=minibatch)
        self.graph = graph
        self.lr = lr
        self.rel_alpha = rel_alpha
        self.laplacian_steps = laplacian_steps
        self.register_buffer("alpha", torch.zeros(()))
        # step at which the Laplacian switched on; -1 while off (a buffer so checkpoints keep it)
        self.register_buffer("prior_start", torch.tensor(-1))
        self._switch_requested = False
        self.converged = False

    # -- the prior's phases ---------------------------------------------------------
    @property
    def has_prior(self) -> bool:
        return self.graph is not None and self.rel_alpha > 0

    @property
    def prior_on(self) -> bool:
        return int(self.prior_start) >= 0

    def advance_phase(self) -> bool:
        """Called on convergence: start the prior phase if there is one still to run."""
        if self.has_prior and not self.prior_on:
            self._switch_requested = True
            return True
        return False

    def _cap_reached(self) -> bool:
        cap = self.trainer.max_steps if self._trainer is not None else -1
        return cap is not None and cap > 0 and self.global_step >= cap - self.laplacian_steps

    # -- Lightning hooks -------------------------------------------------------------
    def on_fit_start(self) -> None:
        if self.graph is not None:
            self.graph = self.graph.to(self.device)

    def loss_terms(self, x: torch.Tensor, index: torch.Tensor) -> LossTerms:
        programs = self.model.programs()
        recon = reconstruction_loss(x, programs, self.model.usage(index))
        if self.graph is None:
            return LossTerms(total=recon, recon=recon)
        laplacian = laplacian_penalty(self.graph, programs)
        if self.has_prior and not self.prior_on and (self._switch_requested or self._cap_reached()):
            self.alpha.copy_(adaptive_strength(self.rel_alpha, recon, laplacian))
            self.prior_start.fill_(self.global_step)
            self._switch_requested = False
        # In minibatch mode the batch's mean reconstruction is an unbiased estimate of
        # the full one, so the prior keeps its full weight and every batch's loss
        # estimates the full objective (weighting both terms by the batch's share of
        # cells would sum to it exactly over an epoch; Adam ignores that constant).
        total = recon + self.alpha * laplacian if self.prior_on else recon
        return LossTerms(total=total, recon=recon, laplacian=laplacian)

    def training_step(self, batch, batch_idx):
        x, index = batch
        terms = self.loss_terms(x, index)
        for name, value in terms.items():
            self.log(f"train/{name}", value, prog_bar=(name == "loss"), on_step=True, on_epoch=False,
                     batch_size=x.shape[0])
        if self.graph is not None:
            self.log("train/alpha", self.alpha, on_step=True, on_epoch=False, batch_size=x.shape[0])
        return terms.total

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if self.prior_on and self.global_step - int(self.prior_start) >= self.laplacian_steps:
            self.trainer.should_stop = True

    def configure_optimizers(self):
        return LazyAdam(self.parameters(), lr=self.lr)

    # -- results ---------------------------------------------------------------------
    @torch.no_grad()
    def programs(self) -> torch.Tensor:
        return self.model.programs().detach()

    @torch.no_grad()
    def usage(self) -> torch.Tensor:
        return self.model.usage().detach()
